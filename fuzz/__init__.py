"""Fuzzing at scale: random models folded through every FX dialect and both ONNX exporters,
compared with the original. Tooling, not product: not shipped with the ``branchfold`` package.

``generator`` draws model specs and builds them, ``campaign`` folds and checks one model through one path,
``driver`` runs a campaign over worker processes, ``shrink`` turns a failure into a regression test.
"""
