"""Depthwise convolutions with their bias, activation and zero padding in one Triton kernel
(of two designs: pixel tiles or image rows, whichever the tactics time faster).

MobileNet/EfficientNet-style depthwise layers are memory-bound. An Inductor engine runs them
as cuDNN's depthwise kernel, writes the result, reads it back in a Triton epilogue (bias +
activation), and, where Keras pads asymmetrically before a strided depthwise conv
(ZeroPadding2D), first writes a padded copy of the input. ``kerasrt::depthwise_conv`` reads
the unpadded input once (the padding is a bounds mask) and writes the activated output once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kerasrt.kernels import conv_spec, op_library
from kerasrt.kernels.registry import KernelFamily, Operands, View

CONFIGS = (
    ("tiles", 32, 64, 4),
    ("tiles", 64, 64, 4),
    ("tiles", 16, 128, 4),
    ("tiles", 64, 32, 4),
    ("tiles", 128, 32, 8),
    ("tiles", 32, 128, 4),
    ("rows", 1, 512, 4),
    ("rows", 2, 256, 4),
    ("rows", 4, 256, 4),
    ("rows", 8, 128, 4),
    ("rows", 4, 256, 8),
)
"""The tactics' candidates: ("tiles", output pixels per program, channels per program, warps)
for the pixel-tile kernel, ("rows", output rows per program, (column, channel) elements per
program, warps) for the row-tiled one. Neither design wins on every layer shape, so
both are candidates."""
SCHEMA = (
    "(Tensor x, Tensor w, Tensor? bias, int[] stride, int[] padding, str activation, float[] clip, int config)"
    " -> Tensor"
)
"""The op's signature: act(depthwise_conv2d(zero_pad(x, padding), w) + bias); padding = [top,
bottom, left, right], w of shape (C, 1, K, K); NCHW logical shapes, channels-last output."""


def output_hw(x_hw: Sequence[int], k: int, stride: Sequence[int], padding: Sequence[int]) -> list[int]:
    """Output height and width for ``padding`` = [top, bottom, left, right]."""
    return [
        (x_hw[0] + padding[0] + padding[1] - k) // stride[0] + 1,
        (x_hw[1] + padding[2] + padding[3] - k) // stride[1] + 1,
    ]


def reference(x, w, bias, stride, padding, activation, clip) -> torch.Tensor:
    """Zero-pad, depthwise conv, bias, activation in PyTorch ops."""
    top, bottom, left, right = padding
    y = torch.nn.functional.pad(x, [left, right, top, bottom])
    y = torch.convolution(y, w, bias, list(stride), [0, 0], [1, 1], False, [0, 0], x.shape[1])
    return conv_spec.activate(y, activation, clip)


def _output(x, w, bias, stride, padding, *rest) -> torch.Tensor:
    oh, ow = output_hw(x.shape[2:], w.shape[-1], stride, padding)
    return conv_spec.empty_channels_last((x.shape[0], x.shape[1], oh, ow), x)


TILES = conv_spec.TritonKernel("depthwise_tiles")
"""A program computes BLOCK_P consecutive output pixels (of the flattened batch, row and
column) over BLOCK_C channels."""
ROWS = conv_spec.TritonKernel("depthwise_rows")
"""A program computes ROWS output rows of one image over BLOCK consecutive elements of the
flattened (column, channel) axis: with channels-last tensors every input tap and the output
are contiguous runs of memory, whatever the channel count."""


def launch(config: int, out, x, w, bias, stride, padding, activation, clip) -> None:
    """Run config ``config`` writing ``out`` (x and out channels-last, w contiguous)."""
    variant, first, second, warps = conv_spec.pick(CONFIGS, config, "depthwise_conv")
    x = x.contiguous(memory_format=torch.channels_last)
    w = w.contiguous()
    n, c, h, wd = x.shape
    oh, ow = out.shape[2:]
    b = bias if bias is not None else w
    common = dict(
        K=w.shape[-1], STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_T=padding[0], PAD_L=padding[2],
        HAS_BIAS=bias is not None, **conv_spec.epilogue_constants(activation, clip), num_warps=warps,
    )  # fmt: skip
    if variant == "tiles":
        grid = ((n * oh * ow + first - 1) // first, (c + second - 1) // second)
        TILES[grid](
            x, w, b, out, n * oh * ow, c, h, wd, oh, ow,
            x.stride(0), x.stride(2), x.stride(3), out.stride(0), out.stride(2), out.stride(3),
            BLOCK_P=first, BLOCK_C=second, **common,
        )  # fmt: skip
    else:
        row_blocks = (oh + first - 1) // first
        grid = (n * row_blocks, (ow * c + second - 1) // second)
        ROWS[grid](
            x, w, b, out, h, wd, oh, ow, row_blocks, x.stride(0), x.stride(2), out.stride(0), out.stride(2),
            C=c, ROWS=first, BLOCK=second, **common,
        )  # fmt: skip


OP = op_library.define_kernel("depthwise_conv", SCHEMA, _output, reference, launch, TILES.runs)


def eligible(node: Any, view: View | None = None) -> bool:
    """A fusable depthwise convolution: one filter per channel, square kernel, no dilation or
    residual."""
    if not conv_spec.fusable(node):
        return False
    c, per_group, kh, kw = node.inputs[1].shape
    if per_group != 1 or node.attrs.get("groups", 1) != c or node.inputs[0].shape[1] != c or kh != kw:
        return False
    return conv_spec.geometry(node)[2] == [1, 1] and not conv_spec.epilogue_inputs(node)[1]


def folded_input(node: Any, view: View) -> tuple[Any, list[int]]:
    """(input value, [top, bottom, left, right] padding) of the op call. A zero pad of H/W
    computed in the same engine is folded in: the kernel reads the pad's input (the pad node
    stays for any other reader; unread, Inductor drops it)."""
    x = node.inputs[0]
    ph, pw = node.attrs["padding"]
    padding = [ph, ph, pw, pw]
    pad = x.producer
    if (
        view.inside(pad)
        and pad.op == "pad"
        and pad.attrs.get("mode", "constant") == "constant"
        and float(pad.attrs.get("value", 0.0)) == 0.0
    ):
        pads = list(pad.attrs["pads"])  # torch.nn.functional.pad order: W (left, right), H (top, bottom), ...
        if len(pads) >= 4 and not any(pads[4:]) and min(pads[:4]) >= 0:
            padding = [ph + pads[2], ph + pads[3], pw + pads[0], pw + pads[1]]
            x = pad.inputs[0]
    return x, padding


def arguments(node: Any, read: Operands, view: View) -> tuple:
    """(x, w, bias, stride, padding, activation, clip), a preceding zero pad folded in."""
    x, padding = folded_input(node, view)
    bias, _ = conv_spec.epilogue_values(node)
    return (
        read(x), read(node.inputs[1]), conv_spec.optional(read, bias),
        conv_spec.geometry(node)[0], padding, *conv_spec.activation_of(node),
    )  # fmt: skip


FAMILY = KernelFamily(
    "depthwise_conv", conv_spec.CONV_OPS, OP, eligible, arguments, TILES.available, configs=CONFIGS
)
