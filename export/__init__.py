"""ONNX export with verified parity, publishing into the model repository."""
