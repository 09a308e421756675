"""Two chained 1x1 convolutions in one Triton kernel, the second's output written over the
first's input: the tensor between them is never read back, and no memory is added.

A ResNet bottleneck ends in a 1x1 expansion with the residual add (64 -> 256 channels at
56x56 in ResNet50's first stage), and the next block starts with a 1x1 reduction of that
output (256 -> 64). Both are memory-bound: at batch 128 on an H100 the expansion's output is
a 205 MB tensor written by one and read straight back by the other. ``kerasrt::pointwise_pair``
computes a tile of pixels through both products: each chunk of the first output is finished
(residual, bias, activation), stored once (the next block's residual add still reads it) and
multiplied into the second product's accumulator at once.

The first product may also add a projection shortcut, as ``dual_conv`` does (the first block
of a ResNet stage, whose output the next block reduces): ``x @ w1^T + shortcut[strided] @
ws^T``, both in one accumulator.

The second product has as many channels as the first's input ``x`` and the same pixels, and
``x`` is read by nothing else (the block's 3x3 convolution made it for the expansion alone),
so the op writes it over ``x``: a program loads its rows of ``x`` before it stores anything
and writes back those rows only. The first version allocated the second output and raised
ResNet50's peak memory at batch 128 by 49 MiB, past the 1.2x-torch.compile budget
(BENCHMARKS.md, tenth round); in place it adds none.

Like the other kerasrt ops it is a torch library op whose CPU kernel is the reference
composition (the op's definition); the CUDA kernel's tile shape is chosen per signature by
measured tactics (``kerasrt.backend.tactics``), which keep the pair only where it beats the
two convolutions' own best kernels, and kept in ``triton_configs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kerasrt.backend import cudnn_conv, dual_conv, op_library, pointwise_conv, triton_configs

FUSED_DTYPES = (torch.float16, torch.bfloat16)
MAX_CHANNELS = 256
"""The most channels of ``x`` (so of the second output) and of the shortcut the kernel takes:
a program keeps their (pixels x C) tiles and a (pixels x C) float32 accumulator on chip."""
MERGE_MAX_CHANNELS = 64
"""The most channels of ``x`` (so of the second output) where the tactics consider the pair.
A program walks the first output's channels serially: on an H100 at batch 128 the chain beat
its two convolutions apart with 64 channels on each side (ResNet50's first stage: 207 against
257 us), broke even with 128 and lost by 2.5x with 256 (tenth round, ``bench/merge_probe.py``
then), so wider pairs are not compiled (~1.5 s each)."""
CONFIGS = (
    (128, 64, 8, 3),
    (64, 128, 4, 3),
    (64, 64, 4, 3),
    (128, 64, 4, 2),
)
"""(pixels per program, first-output channels per step, warps, pipeline stages): the tactics'
candidates, the fastest of a sweep on ResNet50's first stage at batch 128 and 1 (H100)."""


def reference(
    x: torch.Tensor,
    w1: torch.Tensor,
    shortcut: torch.Tensor | None,
    ws: torch.Tensor | None,
    stride: Sequence[int],
    b1: torch.Tensor | None,
    residual: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    act1: str,
    clip1: Sequence[float],
    act2: str,
    clip2: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z) in PyTorch ops: y = act1(conv1x1(x, w1) [+ conv1x1(shortcut, ws, stride)] +
    residual + b1) and z = act2(conv1x1(y, w2) + b2), with y rounded to x's dtype between them
    (as the convolutions run apart would store it)."""
    if shortcut is not None and ws is not None:
        y = dual_conv.reference(x, w1, shortcut, ws, b1, stride, act1, clip1)
    else:
        y = pointwise_conv.reference(x, w1, b1, residual, act1, clip1)
    y = y.to(x.dtype)
    return y, pointwise_conv.reference(y, w2, b2, None, act2, clip2)


def pointwise_pair(
    x: torch.Tensor,
    w1: torch.Tensor,
    shortcut: torch.Tensor | None,
    ws: torch.Tensor | None,
    stride: list[int],
    b1: torch.Tensor | None,
    residual: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    act1: str,
    clip1: list[float],
    act2: str,
    clip2: list[float],
) -> torch.Tensor:
    """Returns y and writes z over ``x`` (``reference``); weights (K, C, 1, 1), NCHW logical
    shapes, channels-last y; ``shortcut`` and ``ws`` both or neither, and then no
    ``residual``. The op's kernel on every device but CUDA (there, ``_cuda`` runs the Triton
    kernel)."""
    _check(x, w2, shortcut, ws, residual)
    y, z = reference(x, w1, shortcut, ws, stride, b1, residual, w2, b2, act1, clip1, act2, clip2)
    out = pointwise_conv.empty_output(x, w1)
    out.copy_(y)
    x.copy_(z)
    return out


def _check(
    x: torch.Tensor,
    w2: torch.Tensor,
    shortcut: torch.Tensor | None,
    ws: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> None:
    if w2.shape[0] != x.shape[1]:
        raise ValueError(
            f"pointwise_pair writes its second output over x: it needs as many channels, "
            f"got {w2.shape[0]} for x's {x.shape[1]}"
        )
    if (shortcut is None) != (ws is None) or (shortcut is not None and residual is not None):
        raise ValueError("pointwise_pair takes a shortcut with its weight, and then no residual")


def _fake(x, w1, shortcut, ws, stride, b1, residual, w2, b2, act1, clip1, act2, clip2):
    return pointwise_conv.empty_output(x, w1)


def _cuda(x, w1, shortcut, ws, stride, b1, residual, w2, b2, act1, clip1, act2, clip2):
    args = (x, w1, shortcut, ws, stride, b1, residual, w2, b2)
    in_place = x.is_contiguous(memory_format=torch.channels_last)
    if x.dtype not in FUSED_DTYPES or kernel() is None or not in_place:
        return pointwise_pair(*args, act1, clip1, act2, clip2)
    y = pointwise_conv.empty_output(x, w1)  # (``launch`` checks the operands)
    key = signature(*args, y, act1, clip1, act2, clip2)
    launch(CONFIGS[triton_configs.chosen(key)], *args, y, act1, clip1, act2, clip2)
    return y


op_library.define(pointwise_pair, cuda=_cuda, fake=_fake, inlinable=True, mutates_args=("x",))


def signature(
    x: torch.Tensor,
    w1: torch.Tensor,
    shortcut: torch.Tensor | None,
    ws: torch.Tensor | None,
    stride: Sequence[int],
    b1: torch.Tensor | None,
    residual: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    y: torch.Tensor,
    act1: str,
    clip1: Sequence[float],
    act2: str,
    clip2: Sequence[float],
) -> str:
    """The key of a call (``y``: its first output): the keys its first product (a dual's
    with a shortcut) and its second have on their own."""
    if shortcut is not None and ws is not None:
        first = dual_conv.signature(x, w1, shortcut, ws, b1, y, stride, act1, clip1)
    else:
        first = pointwise_conv.signature(x, w1, b1, residual, y, act1, clip1)
    second = pointwise_conv.signature(y, w2, b2, None, x, act2, clip2)
    return f"pair[{first}][{second}]"


def available(device: torch.device) -> bool:
    """Whether the Triton kernel can run on ``device``."""
    return device.type == "cuda" and kernel() is not None


# -- the Triton kernel ---------------------------------------------------------------------------


def kernel() -> Any:
    """The Triton kernel (``triton_kernels.pair``), or None when Triton is not installed."""
    kernels = op_library.triton_kernels()
    return kernels.pair if kernels else None


def launch(
    config: tuple[int, int, int, int],
    x: torch.Tensor,
    w1: torch.Tensor,
    shortcut: torch.Tensor | None,
    ws: torch.Tensor | None,
    stride: Sequence[int],
    b1: torch.Tensor | None,
    residual: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    y: torch.Tensor,
    act1: str,
    clip1: Sequence[float],
    act2: str,
    clip2: Sequence[float],
) -> None:
    """Run the kernel with one tile config: y and the second output (over ``x``) written; x,
    shortcut, residual and y channels-last."""
    block_m, block_n, warps, stages = config
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    w1 = w1.reshape(w1.shape[0], -1).contiguous()
    w2 = w2.reshape(w2.shape[0], -1).contiguous()
    n, c, h, wd = x.shape
    n1, n2 = w1.shape[0], w2.shape[0]
    c2, h2, w2d = shortcut.shape[1:] if shortcut is not None else (0, h, wd)
    if max(c, c2) > MAX_CHANNELS:
        raise ValueError(f"pointwise_pair takes at most {MAX_CHANNELS} channels, got {max(c, c2)}")
    _check(x, w2, shortcut, ws, residual)
    if shortcut is not None and ws is not None:
        shortcut = shortcut.contiguous(memory_format=torch.channels_last)
        ws = ws.reshape(ws.shape[0], -1).contiguous()
    block = op_library.dot_block
    first = cudnn_conv.epilogue_constants(act1, clip1)
    second = cudnn_conv.epilogue_constants(act2, clip2)
    op_library.launchable(kernel())[((n * h * wd + block_m - 1) // block_m,)](
        x, w1, shortcut if shortcut is not None else x, ws if ws is not None else w1,
        b1 if b1 is not None else w1, residual if residual is not None else x, y,
        w2, b2 if b2 is not None else w2,
        n * h * wd, c, c2, n1, n2, h, wd, h2, w2d, stride[0], stride[1],
        LO1=first["LO"], HI1=first["HI"], HAS_B1=b1 is not None, HAS_RES=residual is not None,
        ACT1=first["ACT"], LO2=second["LO"], HI2=second["HI"], HAS_B2=b2 is not None, ACT2=second["ACT"],
        HAS_SHORTCUT=shortcut is not None,
        BLOCK_M=block_m, BLOCK_N=min(block_n, block(n1)), BLOCK_C=block(c), BLOCK_C2=block(max(c2, 1)),
        BLOCK_N2=block(n2), num_warps=warps, num_stages=stages,
    )  # fmt: skip
