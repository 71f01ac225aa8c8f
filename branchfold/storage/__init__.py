"""How an ONNX model's bytes are read and written: the weights left where they lie (``onnx_wire``,
``onnx_weights``), folded weights computed as they are written (``onnx_folded``), safe file I/O
(``onnx_io``) and the read-back that proves a written file holds the model that was checked
(``onnx_readback``)."""
