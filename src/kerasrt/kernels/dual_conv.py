"""A 1x1 convolution plus the 1x1 projection added to it as a residual, in one Triton GEMM.

The first block of each ResNet stage adds a projection shortcut to its last convolution:
``act(conv1x1(h, w) + conv1x1(x, ws, stride) + b + bs)``. Run apart, the shortcut writes its
output and the expansion reads it back as the residual: in ResNet50's first stage at batch
128 that is a 205 MB tensor written and read once more, 97 us for the shortcut and 171 us
for the expansion on an H100 (``python bench/implicit_gemm_probe.py``), both memory-bound.
The sum is one matrix product over concatenated reductions, ``[h | x_strided] @ [w | ws]^T``:
``kerasrt::dual_conv`` walks ``h``'s channels, then ``x``'s (read at the shortcut's stride),
into one accumulator, adds the summed bias, applies the activation and stores once. The
projection is never written.

Like the other kerasrt ops it is a torch library op whose CPU kernel is the reference
composition (the op's definition); the CUDA kernel's tile shape is chosen per signature by
measured tactics (``kerasrt.backend.tactics``), which keep the merge only where it beats the
two convolutions' own best kernels, and kept in ``triton_configs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kerasrt.backend import cudnn_conv, op_library, pointwise_conv, triton_configs

FUSED_DTYPES = (torch.float16, torch.bfloat16)
CHANNEL_MULTIPLE = 16
"""Both inputs' channels must be a multiple of this (a reduction step's least size)."""
CONFIGS = (
    (64, 128, 32, 4, 3),
    (128, 128, 64, 8, 3),
    (64, 64, 64, 4, 3),
    (128, 64, 32, 4, 3),
)
"""(pixels per program, output channels per program, reduction step, warps, pipeline stages):
the tactics' candidates, the fastest of the one-input GEMM's configs on ResNet50's four
projection blocks at batch 128 and 1 on an H100 (``python bench/merge_probe.py``); each
candidate is a Triton compile (~1.5 s) in a cold build."""


def reference(
    h: torch.Tensor,
    w: torch.Tensor,
    x: torch.Tensor,
    ws: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    activation: str,
    clip: Sequence[float],
) -> torch.Tensor:
    """What the op computes, in PyTorch ops: act(conv1x1(h, w) + conv1x1(x, ws, stride) + bias)."""
    shortcut = torch.convolution(x, ws, None, list(stride), [0, 0], [1, 1], False, [0, 0], 1)
    return cudnn_conv.reference(h, w, bias, shortcut, [1, 1], [0, 0], [1, 1], activation, clip)


def dual_conv(
    h: torch.Tensor,
    w: torch.Tensor,
    x: torch.Tensor,
    ws: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    activation: str,
    clip: list[float],
) -> torch.Tensor:
    """act(conv1x1(h, w) + conv1x1(x, ws, stride) + bias); weights (K, C, 1, 1), NCHW logical
    shapes, channels-last output. The op's kernel on every device but CUDA (there, ``_cuda``
    runs the Triton kernel)."""
    out = pointwise_conv.empty_output(h, w)
    out.copy_(reference(h, w, x, ws, bias, stride, activation, clip))
    return out


def _fake(h, w, x, ws, bias, stride, activation, clip):
    return pointwise_conv.empty_output(h, w)


def _cuda(h, w, x, ws, bias, stride, activation, clip):
    if h.dtype not in FUSED_DTYPES or kernel() is None:
        return dual_conv(h, w, x, ws, bias, stride, activation, clip)
    out = pointwise_conv.empty_output(h, w)
    key = signature(h, w, x, ws, bias, out, stride, activation, clip)
    launch(CONFIGS[triton_configs.chosen(key)], h, w, x, ws, bias, out, stride, activation, clip)
    return out


op_library.define(dual_conv, cuda=_cuda, fake=_fake, inlinable=True)


def signature(
    h: torch.Tensor,
    w: torch.Tensor,
    x: torch.Tensor,
    ws: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    stride: Sequence[int],
    activation: str,
    clip: Sequence[float],
) -> str:
    """The key of a call: the keys of its two products (the stride-1 one with the summed bias
    and the activation, the shortcut's bias-less, without activation), both writing ``out``'s
    shape."""
    main = pointwise_conv.signature(h, w, bias, None, out, activation, clip)
    shortcut = cudnn_conv.signature(
        cudnn_conv.Operands(x, ws, None, None, out), stride, [0, 0], [1, 1], "none", []
    )
    return f"dual[{main}][{shortcut}]"


def available(device: torch.device) -> bool:
    """Whether the Triton kernel can run on ``device``."""
    return device.type == "cuda" and kernel() is not None


# -- the Triton kernel ---------------------------------------------------------------------------


def kernel() -> Any:
    """The Triton kernel (``triton_kernels.dual``), or None when Triton is not installed."""
    kernels = op_library.triton_kernels()
    return kernels.dual if kernels else None


def launch(
    config: tuple[int, int, int, int, int],
    h: torch.Tensor,
    w: torch.Tensor,
    x: torch.Tensor,
    ws: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    stride: Sequence[int],
    activation: str,
    clip: Sequence[float],
) -> None:
    """Run the kernel with one tile config (h, x and out channels-last)."""
    block_m, block_n, block_k, warps, stages = config
    h = h.contiguous(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    w = w.reshape(w.shape[0], -1).contiguous()
    ws = ws.reshape(ws.shape[0], -1).contiguous()
    n, k1, oh, ow = h.shape
    k2, h2, w2 = x.shape[1:]
    if k1 % CHANNEL_MULTIPLE or k2 % CHANNEL_MULTIPLE:
        raise ValueError(
            f"dual_conv needs input channels in multiples of {CHANNEL_MULTIPLE}, got {k1} and {k2}"
        )
    while k1 % block_k or k2 % block_k:
        block_k //= 2
    pixels, channels_out = n * oh * ow, w.shape[0]
    grid = (((pixels + block_m - 1) // block_m) * ((channels_out + block_n - 1) // block_n),)
    op_library.launchable(kernel())[grid](
        h, w, x, ws, bias if bias is not None else w, out,
        pixels, channels_out, k1, k2, oh, ow, h2, w2, stride[0], stride[1],
        HAS_BIAS=bias is not None, **cudnn_conv.epilogue_constants(activation, clip),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
