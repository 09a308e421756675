"""1x1 convolutions with their bias, residual add and activation in one Triton GEMM.

A 1x1, stride-1 convolution over channels-last activations is a matrix product: (pixels x C)
times (C x K). In MobileNet/EfficientNet-style blocks these products are thin and
memory-bound: what matters is writing the activated output once. cuDNN fuses ReLU6 and SiLU
epilogues only with runtime-compiled kernels, and Inductor writes the product, then reads it
back for the epilogue; ``kerasrt::pointwise_conv`` applies residual, bias and activation
before its single store.
"""

from __future__ import annotations

from typing import Any

import torch

from kerasrt.kernels import conv_spec, op_library
from kerasrt.kernels.registry import KernelFamily, Operands, View

CONFIGS = (
    (128, 64, 32, 4, 3),
    (128, 128, 32, 8, 3),
    (64, 128, 32, 4, 3),
    (256, 64, 32, 8, 3),
    (128, 32, 32, 4, 4),
    (64, 64, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (256, 128, 64, 8, 3),
)
"""(pixels per program, output channels per program, reduction step, warps, pipeline stages).
The reduction step shrinks to the input channels (at least 16)."""
SCHEMA = (
    "(Tensor x, Tensor w, Tensor? bias, Tensor? residual, str activation, float[] clip, int config) -> Tensor"
)
"""The op's signature: act(conv2d(x, w) + residual + bias) for a (K, C, 1, 1) weight, stride 1,
no padding; NCHW logical shapes, channels-last output."""


def reference(x, w, bias, residual, activation, clip) -> torch.Tensor:
    return conv_spec.reference(x, w, bias, residual, [1, 1], [0, 0], [1, 1], activation, clip)


def _output(x, w, *rest) -> torch.Tensor:
    return conv_spec.empty_output(x, w)


KERNEL = conv_spec.TritonKernel("pointwise")


def launch(config: int, out, x, w, bias, residual, activation, clip) -> None:
    """Run config ``config`` writing ``out`` (x, residual and out channels-last)."""
    tiles = conv_spec.pick(CONFIGS, config, "pointwise_conv")
    x = x.contiguous(memory_format=torch.channels_last)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    w = w.reshape(w.shape[0], -1).contiguous()
    n, c, h, wd = x.shape
    launch_rows(tiles, out, x, w, bias, residual, n * h * wd, w.shape[0], c, activation, clip)


def launch_rows(
    tiles: tuple, out, x, w, bias, residual, rows: int, columns: int, k: int, activation, clip
) -> None:
    """The pointwise kernel on (rows x k) @ (columns x k)^T, with residual, bias and activation,
    writing ``out``'s (rows x columns) row-major memory; ``tiles`` is one of ``CONFIGS``. The
    one launch of a 1x1 convolution (pixels x C over channels-last memory) and of a dense
    layer (``linear_gemm``: tokens x features)."""
    block_m, block_n, block_k, warps, stages = tiles
    block_k = min(block_k, op_library.dot_block(k))
    grid = (((rows + block_m - 1) // block_m) * ((columns + block_n - 1) // block_n),)
    KERNEL[grid](
        x, w, bias if bias is not None else w, residual if residual is not None else x, out,
        rows, columns, k,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, **conv_spec.epilogue_constants(activation, clip),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


OP = op_library.define_kernel("pointwise_conv", SCHEMA, _output, reference, launch, KERNEL.runs)


def eligible(node: Any, view: View | None = None) -> bool:
    """A fusable 1x1, stride-1, unpadded, ungrouped, undilated convolution."""
    return conv_spec.is_plain_1x1(node) and conv_spec.geometry(node)[0] == [1, 1]


def arguments(node: Any, read: Operands, view: View | None = None) -> tuple:
    """(x, w, bias, residual, activation, clip)."""
    bias, residual = conv_spec.epilogue_values(node)
    return (
        read(node.inputs[0]), read(node.inputs[1]),
        None if bias is None else read(bias), None if residual is None else read(residual),
        *conv_spec.activation_of(node),
    )  # fmt: skip


FAMILY = KernelFamily(
    "pointwise_conv", conv_spec.CONV_OPS, OP, eligible, arguments, KERNEL.available, configs=CONFIGS
)
