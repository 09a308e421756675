"""Dense layers on quantized operands: INT8 x INT8 products on cuBLASLt's integer tensor cores
(``torch._int_mm``), FP8 E4M3 ones on Hopper's FP8 tensor cores (``torch._scaled_mm``), scaled
back by the input's scale times each output channel's, with bias, residual and activation.

The placement pass (``kerasrt.passes.quantize``) leaves a quantized dense layer as
``linear(dequantize(quantize(x, s_x), s_x), dequantize(w_q, s_w))``, which Inductor runs as a
pointwise quantize/dequantize and an FP16 GEMM: the quantized model's values, without the
low-precision math. This family folds the two dequantizes into its scales (TensorRT's Q/DQ
fusion): it reads the quantize's output and the stored quantized weight, accumulates exactly
(INT32; FP32 for FP8) and applies ``s_x * s_w`` once per output. The tactics time it against
Inductor's way per layer shape.
"""

from __future__ import annotations

from typing import Any

import torch

from kerasrt.ir.graph import torch_dtype
from kerasrt.kernels import conv_spec, op_library
from kerasrt.kernels.registry import KernelFamily, Operands, View

SCHEMA = (
    "(Tensor xq, Tensor wq, Tensor scale, Tensor? bias, Tensor? residual, str activation, float[] clip, "
    "ScalarType dtype, int config) -> Tensor"
)
"""act((xq @ wq) * scale + bias + residual) as ``dtype``, for xq (..., K) and wq (K, N) both
int8 or both float8_e4m3fn (wq column-major, as the tensor-core GEMMs read it) and one float32
scale per output column."""
QUANTIZED = (torch.int8, torch.float8_e4m3fn)


def product(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """The exact product of quantized (rows, K) and (K, N) matrices, as float32."""
    if xq.dtype == torch.int8:
        return torch._int_mm(xq, wq).to(torch.float32)
    if xq.device.type == "cpu" or torch.cuda.get_device_capability(xq.device) >= (8, 9):
        one = torch.ones((), dtype=torch.float32, device=xq.device)
        return torch._scaled_mm(xq, wq, scale_a=one, scale_b=one, out_dtype=torch.float32)
    return xq.to(torch.float32) @ wq.to(torch.float32)  # no FP8 tensor cores: the same values


def reference(xq, wq, scale, bias, residual, activation, clip, dtype) -> torch.Tensor:
    """The product, scales, bias, residual and activation in PyTorch ops."""
    rows = xq.reshape(-1, xq.shape[-1])
    y = product(rows, wq) * scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    y = y.reshape(*xq.shape[:-1], wq.shape[1])
    if residual is not None:
        y = y + residual.to(torch.float32)
    return conv_spec.activate(y, activation, clip).to(dtype)


def _output(xq, wq, scale, bias, residual, activation, clip, dtype) -> torch.Tensor:
    return torch.empty((*xq.shape[:-1], wq.shape[1]), dtype=dtype, device=xq.device)


def launch(config: int, out, *args) -> None:
    out.copy_(reference(*args))


def _runs(*args: Any) -> bool:
    return True


OP = op_library.define_kernel("quantized_linear", SCHEMA, _output, reference, launch, _runs, inlinable=False)


def column_major(w: torch.Tensor) -> torch.Tensor:
    """The (K, N) quantized weight stored column-major, as cuBLASLt's integer and FP8 GEMMs
    take their second operand."""
    return w.t().contiguous().t()


def combined_scale(x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``s_x * s_w``: the float32 scale of each output column of the quantized product."""
    return (x_scale.to(torch.float32) * w_scale.to(torch.float32)).contiguous()


def _dequantized(value: Any) -> Any:
    """The dequantize node that makes ``value``, if any."""
    node = value.producer
    return node if node is not None and node.op == "dequantize" else None


def eligible(node: Any, view: View | None = None) -> bool:
    """A linear whose input is a per-tensor dequantize and whose weight is a per-column
    dequantize of a stored 2-D quantized constant of the same dtype; static sizes the
    tensor-core GEMMs take (more than 16 rows, K and N multiples of 16); an epilogue the family
    applies."""
    x_dq, w_dq = _dequantized(node.inputs[0]), _dequantized(node.inputs[1])
    if x_dq is None or w_dq is None or x_dq.attrs.get("axis") is not None or w_dq.attrs.get("axis") != 1:
        return False
    xq, wq = x_dq.inputs[0], w_dq.inputs[0]
    if xq.dtype not in ("int8", "float8_e4m3fn") or wq.dtype != xq.dtype or not wq.is_constant:
        return False
    if not (x_dq.inputs[1].is_constant and w_dq.inputs[1].is_constant) or len(wq.shape) != 2:
        return False
    if not all(isinstance(d, int) for d in xq.shape) or node.outputs[0].dtype not in ("float16", "bfloat16"):
        return False
    rows = 1
    for d in xq.shape[:-1]:
        rows *= d
    k, n = wq.shape
    if rows <= 16 or k % 16 or n % 16:
        return False
    if conv_spec.activation_of(node)[0] not in conv_spec.ACTIVATIONS:
        return False
    bias, residual = conv_spec.epilogue_values(node)
    out = node.outputs[0]
    if residual is not None and (residual.shape != out.shape or residual.dtype != out.dtype):
        return False
    return bias is None or bias.is_constant


def arguments(node: Any, read: Operands, view: View | None = None) -> tuple:
    """(xq, wq, scale, bias, residual, activation, clip, dtype)."""
    x_dq, w_dq = _dequantized(node.inputs[0]), _dequantized(node.inputs[1])
    bias, residual = conv_spec.epilogue_values(node)
    return (
        read(x_dq.inputs[0]), read.constant(column_major, w_dq.inputs[0]),
        read.constant(combined_scale, x_dq.inputs[1], w_dq.inputs[1]),
        conv_spec.optional(read, bias), conv_spec.optional(read, residual),
        *conv_spec.activation_of(node), torch_dtype(node.outputs[0].dtype),
    )  # fmt: skip


def available(device: torch.device) -> bool:
    return device.type == "cuda"


FAMILY = KernelFamily(
    "quantized_linear",
    ("linear",),
    OP,
    eligible,
    arguments,
    available,
    triton=False,
    precisions=("INT8", "FP8"),
)
