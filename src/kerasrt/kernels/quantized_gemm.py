"""Dense layers and 1x1 convolutions on quantized operands: INT8 x INT8 products on cuBLASLt's
integer tensor cores (``torch._int_mm``), FP8 E4M3 ones on Hopper's FP8 tensor cores
(``torch._scaled_mm``), scaled back by the input's scale times each output channel's, with
bias, residual and activation. A 1x1, stride-1 convolution over channels-last activations is
the product (pixels x C) @ (C x K), the same GEMM.

The placement pass (``kerasrt.passes.quantize``) leaves a quantized dense layer as
``linear(dequantize(quantize(x, s_x), s_x), dequantize(w_q, s_w))``, which Inductor runs as a
pointwise quantize/dequantize and an FP16 GEMM: the quantized model's values, without the
low-precision math. This family folds the two dequantizes into its scales (TensorRT's Q/DQ
fusion): it reads the quantize's output and the stored quantized weight, accumulates exactly
(INT32; FP32 for FP8) and applies ``s_x * s_w`` once per output. The tactics time it against
Inductor's way per layer shape.
"""

from __future__ import annotations

import math
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
scale per output column; a 4-D xq is an NCHW image (channels-last in memory, as engines lay
images out), its output NCHW channels-last too."""


def product(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """The exact product of quantized (rows, K) and (K, N) matrices, as float32."""
    if xq.dtype == torch.int8:
        return torch._int_mm(xq, wq).to(torch.float32)
    if xq.device.type == "cpu" or torch.cuda.get_device_capability(xq.device) >= (8, 9):
        one = torch.ones((), dtype=torch.float32, device=xq.device)
        return torch._scaled_mm(xq, wq, scale_a=one, scale_b=one, out_dtype=torch.float32)
    return xq.to(torch.float32) @ wq.to(torch.float32)  # no FP8 tensor cores: the same values


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """An NCHW image as NHWC (a view of channels-last memory), other tensors as they are."""
    return t.permute(0, 2, 3, 1) if t.dim() == 4 else t


def reference(xq, wq, scale, bias, residual, activation, clip, dtype) -> torch.Tensor:
    """The product, scales, bias, residual and activation in PyTorch ops."""
    x = _channels_last(xq)
    y = product(x.reshape(-1, x.shape[-1]), wq) * scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    y = y.reshape(*x.shape[:-1], wq.shape[1])
    if residual is not None:
        y = y + _channels_last(residual).to(torch.float32)
    y = conv_spec.activate(y, activation, clip).to(dtype)
    return y.permute(0, 3, 1, 2) if xq.dim() == 4 else y


def _output(xq, wq, scale, bias, residual, activation, clip, dtype) -> torch.Tensor:
    if xq.dim() == 4:
        n, _, h, w = xq.shape
        return torch.empty(
            (n, wq.shape[1], h, w), dtype=dtype, device=xq.device, memory_format=torch.channels_last
        )
    return torch.empty((*xq.shape[:-1], wq.shape[1]), dtype=dtype, device=xq.device)


def launch(config: int, out, *args) -> None:
    out.copy_(reference(*args))


def _runs(*args: Any) -> bool:
    return True


OP = op_library.define_kernel("quantized_gemm", SCHEMA, _output, reference, launch, _runs, inlinable=False)


def column_major(w: torch.Tensor) -> torch.Tensor:
    """The quantized weight as the (K, N) operand of the GEMM, stored column-major as
    cuBLASLt's integer and FP8 GEMMs take it: a dense layer's (in, out) weight, or a 1x1
    convolution's (out, in, 1, 1) one, which is that layout already."""
    if w.dim() == 4:
        return w.reshape(w.shape[0], -1).t()
    return w.t().contiguous().t()


def combined_scale(x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``s_x * s_w``: the float32 scale of each output column of the quantized product."""
    return (x_scale.to(torch.float32) * w_scale.to(torch.float32)).contiguous()


def _dequantized(value: Any) -> Any:
    """The dequantize node that makes ``value``, if any."""
    node = value.producer
    return node if node is not None and node.op == "dequantize" else None


def _gemm_weight(node: Any) -> bool:
    """Whether the node's weight makes it a GEMM: a dense layer's 2-D weight (per output
    column: axis 1), or a 1x1 convolution's with stride 1, no padding, one group (per output
    channel: axis 0)."""
    w_dq = node.inputs[1].producer
    shape = w_dq.inputs[0].shape
    if node.op == "linear":
        return len(shape) == 2 and w_dq.attrs.get("axis") == 1
    attrs = node.attrs
    return (
        len(shape) == 4
        and tuple(shape[2:]) == (1, 1)
        and w_dq.attrs.get("axis") == 0
        and attrs.get("groups", 1) == 1
        and all(s == 1 for s in attrs["stride"])
        and all(p == 0 for p in attrs["padding"])
    )


def eligible(node: Any, view: View | None = None) -> bool:
    """A dense layer or 1x1 convolution whose input is a per-tensor dequantize and whose
    weight is a per-channel dequantize of a stored quantized constant of the same dtype;
    static sizes the tensor-core GEMMs take (more than 16 rows, both channel counts multiples
    of 16); an epilogue the family applies."""
    x_dq, w_dq = _dequantized(node.inputs[0]), _dequantized(node.inputs[1])
    if x_dq is None or w_dq is None or x_dq.attrs.get("axis") is not None:
        return False
    xq, wq = x_dq.inputs[0], w_dq.inputs[0]
    if xq.dtype not in ("int8", "float8_e4m3fn") or wq.dtype != xq.dtype or not wq.is_constant:
        return False
    if not (x_dq.inputs[1].is_constant and w_dq.inputs[1].is_constant) or not _gemm_weight(node):
        return False
    if not all(isinstance(d, int) for d in xq.shape) or node.outputs[0].dtype not in ("float16", "bfloat16"):
        return False
    image = node.op != "linear"
    if image and len(xq.shape) != 4:
        return False
    channel = 1 if image else len(xq.shape) - 1
    rows = math.prod(d for i, d in enumerate(xq.shape) if i != channel)
    k, n = xq.shape[channel], node.outputs[0].shape[channel]
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
    "quantized_gemm",
    ("linear", *conv_spec.CONV_OPS),
    OP,
    eligible,
    arguments,
    available,
    triton=False,
    precisions=("INT8", "FP8"),
)
