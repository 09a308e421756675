"""Convolutions over few input channels (a network's stem) as one Triton implicit GEMM with
their bias and activation.

An image stem (ResNet's 7x7/2 over RGB, MobileNet's and EfficientNet's 3x3/2) reads 3
channels, 4 with the zero channel the engine adds (``conv_spec.input_channels``): too few for
cuDNN's implicit-GEMM kernels. Over channels-last input one row of the window, S pixels x C
channels, is contiguous in memory: the kernel's reduction walks the R window rows, each a
(pixels x S*C) @ (S*C x K) product of a gathered input tile, and applies bias and activation
before its one store. It reads its input as cuDNN does (4 channels, in the engine's
precision): 8-byte pixels load as vectors, 12-byte ones do not.
"""

from __future__ import annotations

from typing import Any

import torch

from kerasrt.kernels import conv_spec, op_library
from kerasrt.kernels.registry import KernelFamily, Operands, View

MAX_ROW = 64
"""The most elements (S x C) one window row may have: a row is one step of the reduction."""
CONFIGS = (
    (128, 64, 4, 2),
    (64, 64, 4, 2),
    (128, 64, 8, 2),
    (256, 64, 8, 2),
    (128, 32, 4, 2),
    (64, 32, 4, 2),
    (32, 64, 4, 2),
    (128, 128, 8, 2),
)
"""(output pixels per program, output channels per program, warps, pipeline stages). Channels
per program shrink to the output channels (at least 16)."""
SCHEMA = (
    "(Tensor x, Tensor w, Tensor? bias, int[] stride, int[] padding, str activation, float[] clip, int config)"
    " -> Tensor"
)
"""The op's signature: act(conv2d(x, w) + bias), symmetric zero ``padding``; NCHW logical
shapes, channels-last output."""


def reference(x, w, bias, stride, padding, activation, clip) -> torch.Tensor:
    return conv_spec.reference(x, w, bias, None, stride, padding, [1, 1], activation, clip)


def _output(x, w, bias, stride, padding, *rest) -> torch.Tensor:
    return conv_spec.empty_output(x, w, stride, padding)


KERNEL = conv_spec.TritonKernel("stem")


def launch(config: int, out, x, w, bias, stride, padding, activation, clip) -> None:
    """Run config ``config`` writing ``out`` (x and out channels-last, w (K, C, R, S))."""
    block_m, block_n, warps, stages = conv_spec.pick(CONFIGS, config, "stem_conv")
    x = x.contiguous(memory_format=torch.channels_last)
    w = w.contiguous(memory_format=torch.channels_last)  # memory order K, R, S, C
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    oh, ow = out.shape[2:]
    block_n = min(block_n, op_library.dot_block(k))
    grid = ((n * oh * ow + block_m - 1) // block_m, (k + block_n - 1) // block_n)
    KERNEL[grid](
        x, w, bias if bias is not None else w, out,
        n * oh * ow, h, wd, oh, ow, k,
        C=c, R=r, S=s, STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        HAS_BIAS=bias is not None, **conv_spec.epilogue_constants(activation, clip),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=op_library.dot_block(s * c),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


OP = op_library.define_kernel("stem_conv", SCHEMA, _output, reference, launch, KERNEL.runs)


def eligible(node: Any, view: View | None = None) -> bool:
    """A fusable convolution wider than 1x1 over few input channels (a window row of at most
    ``MAX_ROW`` elements), ungrouped, undilated, without residual."""
    if not conv_spec.fusable(node):
        return False
    _, c, r, s = node.inputs[1].shape
    _, _, dilation = conv_spec.geometry(node)
    if (r, s) == (1, 1) or node.attrs.get("groups", 1) != 1 or dilation != [1, 1]:
        return False
    return conv_spec.input_channels(c) * s <= MAX_ROW and not conv_spec.epilogue_inputs(node)[1]


def arguments(node: Any, read: Operands, view: View | None = None) -> tuple:
    """(x, w, bias, stride, padding, activation, clip), x and w with their input channels padded
    as cuDNN takes them."""
    bias, _ = conv_spec.epilogue_values(node)
    stride, padding, _ = conv_spec.geometry(node)
    return (
        read.apply(conv_spec.pad_channels, read(node.inputs[0])),
        read.constant(conv_spec.channels_last_weight, node.inputs[1]),
        conv_spec.optional(read, bias),
        stride, padding, *conv_spec.activation_of(node),
    )  # fmt: skip


FAMILY = KernelFamily(
    "stem_conv", conv_spec.CONV_OPS, OP, eligible, arguments, KERNEL.available, configs=CONFIGS
)
