"""Depthwise convolutions with their bias, activation and zero padding in one Triton kernel
(of two designs: pixel tiles or image rows, whichever the tactics time faster).

MobileNet/EfficientNet-style depthwise layers are memory-bound. An Inductor engine runs them
as cuDNN's depthwise kernel, writes the result, reads it back in a Triton epilogue (bias +
activation), and, where Keras pads asymmetrically before a strided depthwise conv
(ZeroPadding2D), first writes a padded copy of the input. ``kerasrt::depthwise_conv`` reads
the unpadded input once (the padding is a bounds mask) and writes the activated output once.

Like ``kerasrt::cudnn_conv`` it is a torch custom op: Inductor calls it as an extern kernel;
AOTInductor packages carry its Triton kernel compiled in (``op_library.inlining_kernels``).
Its CPU kernel is the reference
composition (the op's definition); the CUDA kernel launches a Triton program whose design
and tile shape (a "config", chosen per signature by measured tactics,
``kerasrt.backend.tactics``) is kept in ``triton_configs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kerasrt.backend import cudnn_conv, op_library, triton_configs

FUSED_DTYPES = (torch.float16, torch.bfloat16)
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
program, warps) for the row-tiled one. Neither wins everywhere: on an H200 the row-tiled
kernel was 1-25% faster on every MobileNetV2/EfficientNetB0 layer at batch 1, the
pixel-tile kernel up to 30% faster on some 5x5 layers at batch 128
(``bench/depthwise_probe.py``)."""


def output_hw(x_hw: Sequence[int], k: int, stride: Sequence[int], padding: Sequence[int]) -> list[int]:
    """Output height and width for ``padding`` = [top, bottom, left, right]."""
    return [
        (x_hw[0] + padding[0] + padding[1] - k) // stride[0] + 1,
        (x_hw[1] + padding[2] + padding[3] - k) // stride[1] + 1,
    ]


def empty_output(
    x: torch.Tensor, w: torch.Tensor, stride: Sequence[int], padding: Sequence[int]
) -> torch.Tensor:
    """The op's output, uninitialized: channels-last, x's dtype and device."""
    oh, ow = output_hw(x.shape[2:], w.shape[-1], stride, padding)
    return cudnn_conv.empty_channels_last((x.shape[0], x.shape[1], oh, ow), x)


def reference(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    activation: str,
    clip: Sequence[float],
) -> torch.Tensor:
    """What the op computes, in PyTorch ops: zero-pad, depthwise conv, bias, activation."""
    top, bottom, left, right = padding
    y = torch.nn.functional.pad(x, [left, right, top, bottom])
    y = torch.convolution(y, w, bias, list(stride), [0, 0], [1, 1], False, [0, 0], x.shape[1])
    return cudnn_conv.activate(y, activation, clip)


def depthwise_conv(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    activation: str,
    clip: list[float],
) -> torch.Tensor:
    """act(depthwise_conv2d(zero_pad(x, padding), w) + bias); padding = [top, bottom, left,
    right], w of shape (C, 1, K, K); NCHW logical shapes, channels-last output. The op's kernel
    on every device but CUDA (there, ``_cuda`` runs a Triton kernel)."""
    out = empty_output(x, w, stride, padding)
    out.copy_(reference(x, w, bias, stride, padding, activation, clip))
    return out


def _fake(x, w, bias, stride, padding, activation, clip):
    return empty_output(x, w, stride, padding)


def _cuda(x, w, bias, stride, padding, activation, clip):
    out = empty_output(x, w, stride, padding)
    if x.dtype not in FUSED_DTYPES or tiles_kernel() is None:
        out.copy_(reference(x, w, bias, stride, padding, activation, clip))
        return out
    config = CONFIGS[triton_configs.chosen(signature(x, w, bias, stride, padding, activation, clip))]
    launch(config, x, w, bias, out, stride, padding, activation, clip)
    return out


op_library.define(depthwise_conv, cuda=_cuda, fake=_fake, inlinable=True)


def signature(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    activation: str,
    clip: Sequence[float],
) -> str:
    """A stable text key of everything the kernel's speed depends on (memoized, as
    ``cudnn_conv.signature``)."""

    def describe() -> str:
        parts = [
            "depthwise",
            str(x.dtype).replace("torch.", ""),
            activation + (str(list(clip)) if clip else ""),
        ]
        parts += [list(stride), list(padding), f"X{list(x.shape)}/{list(x.stride())}", f"W{list(w.shape)}"]
        parts.append("B" if bias is not None else "")
        return " ".join(map(str, parts))

    facts = ("depthwise", x.dtype, x.shape, x.stride(), w.shape, bias is not None)
    return cudnn_conv.memo_key((*facts, tuple(stride), tuple(padding), tuple(clip), activation), describe)


def available(device: torch.device) -> bool:
    """Whether the Triton depthwise kernel can run on ``device``."""
    return device.type == "cuda" and tiles_kernel() is not None


# -- the Triton kernels --------------------------------------------------------------------------


def tiles_kernel() -> Any:
    """The pixel-tile Triton kernel, or None without Triton: a program computes BLOCK_P
    consecutive output pixels (of the flattened batch, row and column) over BLOCK_C channels."""
    kernels = op_library.triton_kernels()
    return kernels.depthwise_tiles if kernels else None


def rows_kernel() -> Any:
    """The row-tiled Triton kernel, or None without Triton: a program computes ROWS output
    rows of one image over BLOCK consecutive elements of the flattened (column, channel) axis;
    with channels-last tensors every input tap and the output are contiguous runs of memory,
    whatever the channel count, and the index math is shifts and constexpr divisions."""
    kernels = op_library.triton_kernels()
    return kernels.depthwise_rows if kernels else None


def launch(
    config: tuple[str, int, int, int],
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    activation: str,
    clip: Sequence[float],
) -> None:
    """Run one of ``CONFIGS`` (x and out channels-last, w contiguous)."""
    variant, first, second, warps = config
    x = x.contiguous(memory_format=torch.channels_last)
    w = w.contiguous()
    n, c, h, wd = x.shape
    oh, ow = out.shape[2:]
    b = bias if bias is not None else w
    common = dict(
        K=w.shape[-1], STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_T=padding[0], PAD_L=padding[2],
        HAS_BIAS=bias is not None, **cudnn_conv.epilogue_constants(activation, clip), num_warps=warps,
    )  # fmt: skip
    if variant == "tiles":
        grid = ((n * oh * ow + first - 1) // first, (c + second - 1) // second)
        op_library.launchable(tiles_kernel())[grid](
            x, w, b, out, n * oh * ow, c, h, wd, oh, ow,
            x.stride(0), x.stride(2), x.stride(3), out.stride(0), out.stride(2), out.stride(3),
            BLOCK_P=first, BLOCK_C=second, **common,
        )  # fmt: skip
    else:
        row_blocks = (oh + first - 1) // first
        grid = (n * row_blocks, (ow * c + second - 1) // second)
        op_library.launchable(rows_kernel())[grid](
            x, w, b, out, h, wd, oh, ow, row_blocks, x.stride(0), x.stride(2), out.stride(0), out.stride(2),
            C=c, ROWS=first, BLOCK=second, **common,
        )  # fmt: skip


# -- IR nodes ------------------------------------------------------------------------------------


def eligible(node: Any) -> bool:
    """Whether an IR conv/conv_fused node is a depthwise conv this kernel runs: one filter per
    channel, square kernel, no dilation or residual (and ``cudnn_conv.fusable``: a fusable
    activation, constant weights, FP16/BF16)."""
    if not cudnn_conv.fusable(node):
        return False
    c, per_group, kh, kw = node.inputs[1].shape
    a = node.attrs
    if per_group != 1 or a.get("groups", 1) != c or node.inputs[0].shape[1] != c or kh != kw:
        return False
    return list(a.get("dilation", [1, 1])) == [1, 1] and not cudnn_conv.epilogue_inputs(node)[1]


def ir_call(node: Any, segment: Sequence[Any]) -> tuple[Any, list[int]]:
    """(input value, [top, bottom, left, right] padding) of the op call for an eligible node.
    A zero pad of H/W computed in the same segment is folded in: the kernel reads its input
    (the pad node stays for any other reader; unread, Inductor drops it)."""
    x = node.inputs[0]
    ph, pw = node.attrs["padding"]
    padding = [ph, ph, pw, pw]
    pad = x.producer
    if (
        pad is not None
        and pad.op == "pad"
        and any(n is pad for n in segment)
        and pad.attrs.get("mode", "constant") == "constant"
        and float(pad.attrs.get("value", 0.0)) == 0.0
    ):
        pads = list(pad.attrs["pads"])  # torch.nn.functional.pad order: W (left, right), H (top, bottom), ...
        if len(pads) >= 4 and not any(pads[4:]) and min(pads[:4]) >= 0:
            padding = [ph + pads[2], ph + pads[3], pw + pads[0], pw + pads[1]]
            x = pad.inputs[0]
    return x, padding


def op_arguments(node: Any) -> tuple[list[int], str, list[float]]:
    """stride, activation and clip of an eligible node, as the op takes them."""
    act = node.attrs.get("activation") or "none"
    bounds = node.attrs.get("activation_attrs") or {}
    clip = [float(bounds["min"]), float(bounds["max"])] if act == "clamp" else []
    return list(node.attrs["stride"]), act, clip
