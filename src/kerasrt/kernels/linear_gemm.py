"""Dense layers (``linear``) with their bias, residual add and activation in one Triton GEMM.

Inductor runs a linear as a cuBLAS product and then a pointwise kernel for what follows it
(GELU, the residual add, a cast): the product's output is written, read back and written
again. In a transformer's MLP (and ConvNeXt's, whose blocks are the same two Dense layers)
that round trip is the size of the 4x-wide hidden activation. ``kerasrt::linear_gemm`` is
the 1x1-convolution GEMM (``triton_kernels.pointwise``) on row-major matrices: it applies the
residual, bias and activation before its single store. The tactics time it against
Inductor's way per layer shape: cuBLAS's product is faster where the epilogue is cheap.
"""

from __future__ import annotations

from typing import Any

import torch

from kerasrt.kernels import conv_spec, op_library, pointwise_conv
from kerasrt.kernels.registry import KernelFamily, Operands, View

CONFIGS = pointwise_conv.CONFIGS
"""(rows per program, output columns per program, reduction step, warps, pipeline stages):
the pointwise convolution's tiles, the same kernel."""
SCHEMA = "(Tensor x, Tensor wt, Tensor? bias, Tensor? residual, str activation, float[] clip, int config) -> Tensor"
"""The op's signature: act(x @ wt^T + residual + bias) for x of shape (..., K) and a
transposed weight wt of shape (N, K); the output (..., N) is contiguous."""


def reference(x, wt, bias, residual, activation, clip) -> torch.Tensor:
    """The product, residual, bias and activation in PyTorch ops."""
    y = torch.nn.functional.linear(x, wt, bias)
    if residual is not None:
        y = y + residual
    return conv_spec.activate(y, activation, clip)


def _output(x, wt, *rest) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], wt.shape[0]))


KERNEL = pointwise_conv.KERNEL


def launch(config: int, out, x, wt, bias, residual, activation, clip) -> None:
    """Run config ``config`` writing ``out`` (all operands row-major)."""
    tiles = conv_spec.pick(CONFIGS, config, "linear_gemm")
    k = x.shape[-1]
    x = x.reshape(-1, k).contiguous()
    if residual is not None:
        residual = residual.contiguous()
    pointwise_conv.launch_rows(
        tiles, out, x, wt, bias, residual, x.shape[0], wt.shape[0], k, activation, clip
    )


OP = op_library.define_kernel("linear_gemm", SCHEMA, _output, reference, launch, KERNEL.runs)


def transposed(w: torch.Tensor) -> torch.Tensor:
    """The IR's (in, out) weight as the kernel reads it: (out, in), row-major."""
    return w.t().contiguous()


def eligible(node: Any, view: View | None = None) -> bool:
    """A linear on FP16/BF16 activations with a constant 2-D weight and bias, an epilogue
    activation the kernel applies, and a residual of the output's shape and dtype."""
    x, w = node.inputs[0], node.inputs[1]
    if x.dtype not in ("float16", "bfloat16") or not w.is_constant or len(w.shape) != 2:
        return False
    if conv_spec.activation_of(node)[0] not in conv_spec.ACTIVATIONS:
        return False
    bias, residual = conv_spec.epilogue_values(node)
    if bias is not None and not bias.is_constant:
        return False
    out = node.outputs[0]
    return residual is None or (residual.shape == out.shape and residual.dtype == out.dtype)


def arguments(node: Any, read: Operands, view: View | None = None) -> tuple:
    """(x, wt, bias, residual, activation, clip)."""
    bias, residual = conv_spec.epilogue_values(node)
    return (
        read(node.inputs[0]), read.constant(transposed, node.inputs[1]),
        conv_spec.optional(read, bias), conv_spec.optional(read, residual),
        *conv_spec.activation_of(node),
    )  # fmt: skip


def fits_rows(config: tuple, args: tuple) -> bool:
    """Whether a config's row tile suits the product's rows: tiles more than twice the rows
    (at least 64) only compute padding (a batch-1 layer's 49 or 197 rows), so they are not
    compiled and timed."""
    rows = args[0].numel() // args[0].shape[-1]
    return config[0] <= max(64, 2 * rows)


FAMILY = KernelFamily(
    "linear_gemm", ("linear",), OP, eligible, arguments, KERNEL.available, configs=CONFIGS, timed=fits_rows
)
