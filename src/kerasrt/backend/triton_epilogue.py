"""The epilogue kerasrt's Triton convolution kernels share: bias and activation applied to the
float32 accumulator before the kernel's one store.

Activation codes are indices into ``cudnn_conv.ACTIVATIONS`` ("none", "relu", "clamp",
"silu"), so a kernel and a cuDNN graph fuse the same set; ``lo``/``hi`` bound "clamp".
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def bias_activation() -> Any:
    """The ``@triton.jit`` helper ``acc = bias_activation(acc, b_ptr, channel, channel_ok, lo,
    hi, HAS_BIAS, ACT)`` (channels on the accumulator's last axis), or None without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _bias_activation(acc, b_ptr, channel, channel_ok, lo, hi, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
        if HAS_BIAS:
            acc += tl.load(b_ptr + channel, mask=channel_ok, other=0.0).to(tl.float32)[None, :]
        if ACT == 1:
            acc = tl.maximum(acc, 0.0)
        elif ACT == 2:
            acc = tl.minimum(tl.maximum(acc, lo), hi)
        elif ACT == 3:
            acc = acc / (1.0 + tl.exp(-acc))
        return acc

    return _bias_activation


@functools.cache
def finish_tile() -> Any:
    """The ``@triton.jit`` helper ``finish_tile(acc, rows, channels, rows_ok, channels_ok, N,
    b_ptr, r_ptr, y_ptr, lo, hi, HAS_BIAS, HAS_RES, ACT)``: adds the residual, applies bias
    and activation and stores one (pixels x channels) tile of a channels-last output with
    ``N`` channels. None without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    bias_activation_ = bias_activation()

    @triton.jit
    def _finish_tile(
        acc, rows, channels, rows_ok, channels_ok, N, b_ptr, r_ptr, y_ptr, lo, hi,
        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    ):  # fmt: skip
        out = rows.to(tl.int64)[:, None] * N + channels[None, :]
        ok = rows_ok[:, None] & channels_ok[None, :]
        if HAS_RES:
            acc += tl.load(r_ptr + out, mask=ok, other=0.0).to(tl.float32)
        acc = bias_activation_(acc, b_ptr, channels, channels_ok, lo, hi, HAS_BIAS, ACT)
        tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=ok)

    return _finish_tile
