"""Adapters: read an FX or ONNX graph into the region walk's neutral ops, and write its regions back.

They sit above the algebra and the walk (``rewriter/``) and the recognizers (``patterns/``), and below
the passes users run (``passes/``), so imports between the folders go one way.
"""
