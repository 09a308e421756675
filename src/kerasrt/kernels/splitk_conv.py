"""Convolutions with few output pixels as a split-K implicit GEMM, with their bias, residual
add and activation.

At batch 1 the late stages of a CNN are long, thin products: ResNet50's last 3x3 layers
multiply (49 pixels x 4608) by (4608 x 512). Tiled over the output only, that is eight
64x64 tiles for 132 SMs, each walking the whole reduction: cuDNN's best plan takes 11.4 us
on an H100 for a layer whose weights stream in about 1.5 us. ``kerasrt::splitk_conv`` also
splits the reduction (R*S*C) among ``SPLIT`` programs per tile. Each writes its float32
partial tile to a workspace and bumps the tile's counter; the last to arrive sums the
partials in a fixed order (results do not depend on timing), applies bias, residual and
activation, stores the tile and resets the counter for the next call. One launch, no
zeroing pass. That layer takes 7.6 us (``python bench/splitk_probe.py``); each program
still waits on memory at every reduction step, so the kernel wins only where the output
has few tiles, and the tactics time it only where a config splits fully.

Like the other kerasrt ops it is a torch library op whose CPU kernel is the reference
composition (the op's definition); the CUDA kernel's config (tile, split, warps, stages) is
chosen per signature by measured tactics (``kerasrt.backend.tactics``) and kept in
``triton_configs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kerasrt.backend import cudnn_conv, op_library, triton_configs

FUSED_DTYPES = (torch.float16, torch.bfloat16)
CONFIGS = (
    (32, 64, 128, 8, 4, 3),
    (32, 64, 64, 8, 4, 3),
    (64, 64, 64, 4, 4, 3),
    (64, 64, 64, 8, 4, 3),
)
"""(pixels per tile, output channels per tile, reduction step, programs per tile (the split),
warps, pipeline stages): the tactics' candidates, the fastest on some of ResNet50's
convolutions at batch 1 on an H100 (``python bench/splitk_probe.py``). The reduction step
shrinks to a divisor of the input channels."""
CHANNEL_MULTIPLE = 16
"""Input channels must be a multiple of this: a reduction step never straddles two window taps."""
MAX_SPLIT_TILES = 1 << 14
"""Tile counters per device: a split launch has at most this many tiles."""
MAX_WORKSPACE_BYTES = 16 << 20
"""The most memory a launch's partial tiles take: a larger problem splits less (``split_for``);
it has parallelism enough without."""

_COUNTERS: dict[int, torch.Tensor] = {}  # device index -> zeroed int32 tile counters


def reference(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    activation: str,
    clip: Sequence[float],
) -> torch.Tensor:
    """What the op computes, in PyTorch ops: act(conv2d(x, w) + residual + bias)."""
    return cudnn_conv.reference(x, w, bias, residual, stride, padding, [1, 1], activation, clip)


def empty_output(
    x: torch.Tensor, w: torch.Tensor, stride: Sequence[int], padding: Sequence[int]
) -> torch.Tensor:
    """The op's output, uninitialized: channels-last, x's dtype and device."""
    return cudnn_conv.empty_output(x, w, stride, padding, [1, 1])


def splitk_conv(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    activation: str,
    clip: list[float],
) -> torch.Tensor:
    """act(conv2d(x, w) + residual + bias), symmetric zero ``padding``; NCHW logical shapes,
    channels-last output. The op's kernel on every device but CUDA (there, ``_cuda`` runs a
    Triton kernel)."""
    out = empty_output(x, w, stride, padding)
    out.copy_(reference(x, w, bias, residual, stride, padding, activation, clip))
    return out


def _fake(x, w, bias, residual, stride, padding, activation, clip):
    return empty_output(x, w, stride, padding)


def _cuda(x, w, bias, residual, stride, padding, activation, clip):
    out = empty_output(x, w, stride, padding)
    if x.dtype not in FUSED_DTYPES or kernel() is None:
        out.copy_(reference(x, w, bias, residual, stride, padding, activation, clip))
        return out
    key = signature(x, w, bias, residual, out, stride, padding, activation, clip)
    launch(CONFIGS[triton_configs.chosen(key)], x, w, bias, residual, out, stride, padding, activation, clip)
    return out


op_library.define(splitk_conv, cuda=_cuda, fake=_fake, inlinable=True)


def signature(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    out: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    activation: str,
    clip: Sequence[float],
) -> str:
    """The key of a call: the key ``kerasrt::cudnn_conv`` has for the same convolution, so one
    tactic table entry names either kernel."""
    operands = cudnn_conv.Operands(x, w, bias, residual, out)
    return cudnn_conv.signature(operands, stride, padding, [1, 1], activation, clip)


def available(device: torch.device) -> bool:
    """Whether the Triton split-K kernel can run on ``device``."""
    return device.type == "cuda" and kernel() is not None


# -- the Triton kernel ---------------------------------------------------------------------------


def kernel() -> Any:
    """The Triton kernel (``triton_kernels.splitk``), or None when Triton is not installed."""
    kernels = op_library.triton_kernels()
    return kernels.splitk if kernels else None


def split_for(split: int, tiles: int, tile_elements: int) -> int:
    """The split a launch of ``tiles`` output tiles runs: ``split``, halved until the partial
    tiles fit ``MAX_WORKSPACE_BYTES`` (1, no split, when there are too many tiles)."""
    if tiles > MAX_SPLIT_TILES:
        return 1
    while split > 1 and tiles * split * tile_elements * 4 > MAX_WORKSPACE_BYTES:
        split //= 2
    return split


def splits_as_configured(config: tuple[int, ...], out_shape: Sequence[int]) -> bool:
    """Whether ``config`` runs with its full split on an output of ``out_shape`` (N, K, H, W):
    where it would split less it is a plain implicit GEMM, not a candidate worth timing."""
    block_m, block_n, _, split = config[:4]
    tiles_m, tiles_n = tile_grid(block_m, block_n, out_shape)
    return split_for(split, tiles_m * tiles_n, block_m * block_n) == split


def tile_grid(block_m: int, block_n: int, out_shape: Sequence[int]) -> tuple[int, int]:
    """(pixel tiles, channel tiles) of an output of ``out_shape`` (N, K, H, W)."""
    n, k, oh, ow = out_shape
    return (n * oh * ow + block_m - 1) // block_m, (k + block_n - 1) // block_n


def counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The device's tile counters: zero between calls (each tile's last program resets its
    own). Made once per device, before any CUDA graph capture (the first call of an op runs
    eagerly), so graphs replay against the same buffer."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _COUNTERS:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("kerasrt::splitk_conv's first call on a device cannot be a CUDA graph capture")
        _COUNTERS[index] = torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)
    return _COUNTERS[index]


def launch(
    config: tuple[int, int, int, int, int, int],
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    out: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    activation: str,
    clip: Sequence[float],
) -> None:
    """Run the kernel with one config (x, residual and out channels-last, w (K, C, R, S))."""
    block_m, block_n, block_k, split, warps, stages = config
    x = x.contiguous(memory_format=torch.channels_last)
    w = w.contiguous(memory_format=torch.channels_last)  # memory order K, R, S, C
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    oh, ow = out.shape[2:]
    if c % CHANNEL_MULTIPLE:
        raise ValueError(f"splitk_conv needs input channels in multiples of {CHANNEL_MULTIPLE}, got {c}")
    while c % block_k:
        block_k //= 2
    tiles_m, tiles_n = tile_grid(block_m, block_n, out.shape)
    split = split_for(split, tiles_m * tiles_n, block_m * block_n)
    workspace, count = out, out  # unused without a split
    if split > 1:
        count = (  # traced: a graph has no state between calls, so it zeroes its own counters
            torch.zeros(tiles_m * tiles_n, dtype=torch.int32, device=x.device)
            if op_library.tracing()
            else counters(x.device, tiles_m * tiles_n)
        )
        workspace = torch.empty(
            tiles_m * tiles_n * split * block_m * block_n, dtype=torch.float32, device=x.device
        )
    op_library.launchable(kernel())[(tiles_m, tiles_n, split)](
        x, w, bias if bias is not None else w, residual if residual is not None else x, out, workspace, count,
        n * oh * ow, k, c, h, wd, oh, ow, s, stride[0], stride[1], padding[0], padding[1],
        r * s * c // block_k,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, **cudnn_conv.epilogue_constants(activation, clip),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


# -- IR nodes ------------------------------------------------------------------------------------


def eligible(node: Any) -> bool:
    """Whether an IR conv/conv_fused node is a convolution this kernel runs: ungrouped,
    undilated, input channels a multiple of ``CHANNEL_MULTIPLE`` (and ``cudnn_conv.fusable``:
    a fusable activation, constant weights, FP16/BF16)."""
    if not cudnn_conv.fusable(node):
        return False
    a = node.attrs
    channels = node.inputs[1].shape[1]
    return a.get("groups", 1) == 1 and list(a["dilation"]) == [1, 1] and channels % CHANNEL_MULTIPLE == 0
