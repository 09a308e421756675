"""Post-training quantization (INT8, FP8): calibration, and the accuracy-aware search for the
layers that stay in floating point. Where the quantize/dequantize nodes go is a pass
(``kerasrt.passes.quantize``)."""
