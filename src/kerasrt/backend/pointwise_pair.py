"""Two chained 1x1 convolutions in one Triton kernel: the second reads the first's output
tile from registers, not from memory.

A ResNet bottleneck ends in a 1x1 expansion with the residual add (64 -> 256 channels at
56x56 in ResNet50's first stage), and the next block starts with a 1x1 reduction of that
output (256 -> 64). Both are memory-bound: on an H100 at batch 128 the pair takes 171 + 87 us
against a compute floor of 13 us each, and the 256-channel tensor between them (205 MB) is
written by one and read straight back by the other (``python bench/implicit_gemm_probe.py``).
``kerasrt::pointwise_pair`` computes a tile of pixels through both products: each chunk of
the first output is finished (residual, bias, activation), stored once (the next residual
add still reads it) and multiplied into the second product's accumulator at once, so the
tensor is never read back.

Like the other kerasrt ops it is a torch library op whose CPU kernel is the reference
composition (the op's definition); the CUDA kernel's tile shape is chosen per signature by
measured tactics (``kerasrt.backend.tactics``), which keep the pair only where it beats the
two convolutions' own best kernels, and kept in ``triton_configs``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from kerasrt.backend import cudnn_conv, op_library, pointwise_conv, triton_configs, triton_epilogue

ACTIVATIONS = cudnn_conv.ACTIVATIONS
FUSED_DTYPES = (torch.float16, torch.bfloat16)
MAX_CHANNELS = 256
"""The most input channels of the first convolution and output channels of the second the
kernel takes: each program keeps a (pixels x first inputs) tile and a (pixels x second
outputs) float32 accumulator on chip."""
MERGE_MAX_CHANNELS = 64
"""The most of those channels where the tactics consider the pair. A program walks the first
output's channels serially: on an H100 at batch 128 the pair beat its two convolutions apart
with 64 channels on each side (ResNet50's first stage: 207 against 257 us), broke even with
128 and lost by 2.5x with 256 (``python bench/merge_probe.py``), so the tactics do not
spend compiles (~1.5 s each) on wider pairs."""
CONFIGS = (
    (128, 64, 8, 3),
    (64, 128, 4, 3),
    (64, 64, 4, 3),
    (128, 64, 4, 2),
)
"""(pixels per program, first-output channels per step, warps, pipeline stages): the tactics'
candidates, the fastest of a sweep on ResNet50's first stage at batch 128 on an H100
(``python bench/merge_probe.py --sweep``) and at batch 1."""


def reference(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    residual: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    act1: str,
    clip1: Sequence[float],
    act2: str,
    clip2: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the op computes, in PyTorch ops: y = act1(conv1x1(x, w1) + residual + b1) and
    z = act2(conv1x1(y, w2) + b2), with y rounded to x's dtype between them (as the two
    convolutions run apart would store it)."""
    y = pointwise_conv.reference(x, w1, b1, residual, act1, clip1).to(x.dtype)
    return y, pointwise_conv.reference(y, w2, b2, None, act2, clip2)


def empty_outputs(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's outputs, uninitialized: channels-last, x's dtype and device."""
    return pointwise_conv.empty_output(x, w1), pointwise_conv.empty_output(x, w2)


def pointwise_pair(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    residual: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    act1: str,
    clip1: list[float],
    act2: str,
    clip2: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z) of two chained 1x1 convolutions (``reference``); weights (K, C, 1, 1), NCHW
    logical shapes, channels-last outputs. The op's kernel on every device but CUDA (there,
    ``_cuda`` runs the Triton kernel)."""
    y, z = empty_outputs(x, w1, w2)
    ry, rz = reference(x, w1, b1, residual, w2, b2, act1, clip1, act2, clip2)
    y.copy_(ry)
    z.copy_(rz)
    return y, z


def _fake(x, w1, b1, residual, w2, b2, act1, clip1, act2, clip2):
    return empty_outputs(x, w1, w2)


def _cuda(x, w1, b1, residual, w2, b2, act1, clip1, act2, clip2):
    if x.dtype not in FUSED_DTYPES or kernel() is None:
        return pointwise_pair(x, w1, b1, residual, w2, b2, act1, clip1, act2, clip2)
    y, z = empty_outputs(x, w1, w2)
    key = signature(x, w1, b1, residual, w2, b2, y, z, act1, clip1, act2, clip2)
    launch(CONFIGS[triton_configs.chosen(key)], x, w1, b1, residual, w2, b2, y, z, act1, clip1, act2, clip2)
    return y, z


op_library.define(pointwise_pair, cuda=_cuda, fake=_fake)


def signature(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    residual: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    y: torch.Tensor,
    z: torch.Tensor,
    act1: str,
    clip1: Sequence[float],
    act2: str,
    clip2: Sequence[float],
) -> str:
    """The key of a call (``y``, ``z``: its outputs): the pair of keys its two convolutions
    have on their own."""
    first = pointwise_conv.signature(x, w1, b1, residual, y, act1, clip1)
    second = pointwise_conv.signature(y, w2, b2, None, z, act2, clip2)
    return f"pair[{first}][{second}]"


def available(device: torch.device) -> bool:
    """Whether the Triton kernel can run on ``device``."""
    return device.type == "cuda" and kernel() is not None


# -- the Triton kernel ---------------------------------------------------------------------------


@functools.cache
def kernel() -> Any:
    """The compiled-on-first-use Triton kernel, or None when Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    finish = triton_epilogue.finish_tile()
    bias_activation = triton_epilogue.bias_activation()

    @triton.jit(do_not_specialize=("M",))
    def _pair(
        x_ptr, w1_ptr, b1_ptr, r_ptr, y_ptr, w2_ptr, b2_ptr, z_ptr,
        M, C, N1, N2, lo1, hi1, lo2, hi2,
        HAS_B1: tl.constexpr, HAS_RES: tl.constexpr, ACT1: tl.constexpr,
        HAS_B2: tl.constexpr, ACT2: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N2: tl.constexpr,
    ):  # fmt: skip
        # y = act1(x (M x C) @ w1^T (C x N1) + r + b1); z = act2(y @ w2^T (N1 x N2) + b2),
        # y produced BLOCK_N channels at a time and consumed by z's product at once
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        rows = rm.to(tl.int64)
        rc = tl.arange(0, BLOCK_C)
        r2 = tl.arange(0, BLOCK_N2)
        c_ok, n2_ok = rc < C, r2 < N2
        a = tl.load(x_ptr + rows[:, None] * C + rc[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N2), dtype=tl.float32)
        for n0 in range(0, N1, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            n_ok = rn < N1
            w1 = tl.load(
                w1_ptr + rn[None, :] * C + rc[:, None], mask=n_ok[None, :] & c_ok[:, None], other=0.0
            )
            acc1 = tl.dot(a, w1)
            out = rows[:, None] * N1 + rn[None, :]
            ok = m_ok[:, None] & n_ok[None, :]
            if HAS_RES:
                acc1 += tl.load(r_ptr + out, mask=ok, other=0.0).to(tl.float32)
            y = bias_activation(acc1, b1_ptr, rn, n_ok, lo1, hi1, HAS_B1, ACT1).to(y_ptr.dtype.element_ty)
            tl.store(y_ptr + out, y, mask=ok)
            w2 = tl.load(
                w2_ptr + r2[None, :] * N1 + rn[:, None], mask=n2_ok[None, :] & n_ok[:, None], other=0.0
            )
            acc2 = tl.dot(y, w2, acc2)
        finish(acc2, rows, r2, m_ok, n2_ok, N2, b2_ptr, z_ptr, z_ptr, lo2, hi2, HAS_B2, False, ACT2)

    return _pair


def _block(n: int) -> int:
    """``n`` rounded up to a power of two, at least 16 (a tl.dot operand's least side)."""
    return max(16, 1 << (n - 1).bit_length())


def launch(
    config: tuple[int, int, int, int],
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    residual: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    y: torch.Tensor,
    z: torch.Tensor,
    act1: str,
    clip1: Sequence[float],
    act2: str,
    clip2: Sequence[float],
) -> None:
    """Run the kernel with one tile config (x, residual, y and z channels-last)."""
    block_m, block_n, warps, stages = config
    x = x.contiguous(memory_format=torch.channels_last)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    w1 = w1.reshape(w1.shape[0], -1).contiguous()
    w2 = w2.reshape(w2.shape[0], -1).contiguous()
    n, c, h, wd = x.shape
    n1, n2 = w1.shape[0], w2.shape[0]
    if max(c, n2) > MAX_CHANNELS:
        raise ValueError(f"pointwise_pair takes at most {MAX_CHANNELS} channels in and out, got {c} and {n2}")
    pixels = n * h * wd
    lo1, hi1 = (clip1[0], clip1[1]) if act1 == "clamp" else (0.0, 0.0)
    lo2, hi2 = (clip2[0], clip2[1]) if act2 == "clamp" else (0.0, 0.0)
    kernel()[((pixels + block_m - 1) // block_m,)](
        x, w1, b1 if b1 is not None else w1, residual if residual is not None else x, y,
        w2, b2 if b2 is not None else w2, z,
        pixels, c, n1, n2, lo1, hi1, lo2, hi2,
        HAS_B1=b1 is not None, HAS_RES=residual is not None, ACT1=ACTIVATIONS.index(act1),
        HAS_B2=b2 is not None, ACT2=ACTIVATIONS.index(act2),
        BLOCK_M=block_m, BLOCK_N=min(block_n, _block(n1)), BLOCK_C=_block(c), BLOCK_N2=_block(n2),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
