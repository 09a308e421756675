"""Writing converted models out in other formats (ONNX)."""
