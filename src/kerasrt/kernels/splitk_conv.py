"""Convolutions with few output pixels as a split-K implicit GEMM, with their bias, residual
add and activation.

At batch 1 the late stages of a CNN are long, thin products (ResNet50's last 3x3 layers
multiply 49 pixels x 4608 by 4608 x 512): tiled over the output only, a few tiles walk the
whole reduction while most SMs idle. ``kerasrt::splitk_conv`` also splits the reduction
(R*S*C) among ``SPLIT`` programs per tile. Each writes its float32 partial tile to a
workspace and bumps the tile's counter; the last to arrive sums the partials in a fixed
order (results do not depend on timing), applies the epilogue, stores the tile and resets
the counter for the next call: one launch, no zeroing pass. It wins only where the output
has few tiles, so the tactics time only configs that split fully (``timed``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kerasrt.kernels import conv_spec, op_library
from kerasrt.kernels.registry import KernelFamily, Operands, View

CONFIGS = (
    (32, 64, 128, 8, 4, 3),
    (32, 64, 64, 8, 4, 3),
    (64, 64, 64, 4, 4, 3),
    (64, 64, 64, 8, 4, 3),
)
"""(pixels per tile, output channels per tile, reduction step, programs per tile (the split),
warps, pipeline stages). The reduction step shrinks to a divisor of the input channels."""
CHANNEL_MULTIPLE = 16
"""Input channels must be a multiple of this: a reduction step never straddles two window taps."""
MAX_SPLIT_TILES = 1 << 14
"""Tile counters per device: a split launch has at most this many tiles."""
MAX_WORKSPACE_BYTES = 16 << 20
"""The most memory a launch's partial tiles take: a larger problem splits less (``split_for``)."""

_COUNTERS: dict[int, torch.Tensor] = {}  # device index -> zeroed int32 tile counters (a resource)
SCHEMA = (
    "(Tensor x, Tensor w, Tensor? bias, Tensor? residual, int[] stride, int[] padding, str activation,"
    " float[] clip, int config) -> Tensor"
)
"""The op's signature: act(conv2d(x, w) + residual + bias), symmetric zero ``padding``; NCHW
logical shapes, channels-last output."""


def reference(x, w, bias, residual, stride, padding, activation, clip) -> torch.Tensor:
    return conv_spec.reference(x, w, bias, residual, stride, padding, [1, 1], activation, clip)


def _output(x, w, bias, residual, stride, padding, *rest) -> torch.Tensor:
    return conv_spec.empty_output(x, w, stride, padding)


KERNEL = conv_spec.TritonKernel("splitk")


def split_for(split: int, tiles: int, tile_elements: int) -> int:
    """The split a launch of ``tiles`` output tiles runs: ``split``, halved until the partial
    tiles fit ``MAX_WORKSPACE_BYTES`` (1, no split, when there are too many tiles)."""
    if tiles > MAX_SPLIT_TILES:
        return 1
    while split > 1 and tiles * split * tile_elements * 4 > MAX_WORKSPACE_BYTES:
        split //= 2
    return split


def tile_grid(block_m: int, block_n: int, out_shape: Sequence[int]) -> tuple[int, int]:
    """(pixel tiles, channel tiles) of an output of ``out_shape`` (N, K, H, W)."""
    n, k, oh, ow = out_shape
    return (n * oh * ow + block_m - 1) // block_m, (k + block_n - 1) // block_n


def splits_fully(config: tuple, args: tuple) -> bool:
    """Whether ``config`` runs with its full split on these arguments: where it would split
    less it is a plain implicit GEMM, not a candidate worth timing."""
    x, w, _, _, stride, padding, *_ = args
    block_m, block_n, _, split = config[:4]
    tiles_m, tiles_n = tile_grid(
        block_m, block_n, conv_spec.output_shape(x.shape, w.shape, stride, padding, [1, 1])
    )
    return split_for(split, tiles_m * tiles_n, block_m * block_n) == split


def counters(device: torch.device) -> torch.Tensor:
    """The device's tile counters: zero between calls (each tile's last program resets its
    own). Made once per device, before any CUDA graph capture (the first call of an op runs
    eagerly), so graphs replay against the same buffer."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _COUNTERS:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("kerasrt::splitk_conv's first call on a device cannot be a CUDA graph capture")
        _COUNTERS[index] = torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)
    return _COUNTERS[index]


def launch(config: int, out, x, w, bias, residual, stride, padding, activation, clip) -> None:
    """Run config ``config`` writing ``out`` (x, residual and out channels-last, w (K, C, R, S))."""
    block_m, block_n, block_k, split, warps, stages = conv_spec.pick(CONFIGS, config, "splitk_conv")
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
            else counters(x.device)
        )
        workspace = torch.empty(
            tiles_m * tiles_n * split * block_m * block_n, dtype=torch.float32, device=x.device
        )
    KERNEL[(tiles_m, tiles_n, split)](
        x, w, bias if bias is not None else w, residual if residual is not None else x, out, workspace, count,
        n * oh * ow, k, c, h, wd, oh, ow, s, stride[0], stride[1], padding[0], padding[1],
        r * s * c // block_k,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, **conv_spec.epilogue_constants(activation, clip),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


OP = op_library.define_kernel("splitk_conv", SCHEMA, _output, reference, launch, KERNEL.runs)


def eligible(node: Any, view: View | None = None) -> bool:
    """A fusable, ungrouped, undilated convolution over input channels in multiples of
    ``CHANNEL_MULTIPLE``."""
    if not conv_spec.fusable(node):
        return False
    channels = node.inputs[1].shape[1]
    _, _, dilation = conv_spec.geometry(node)
    return node.attrs.get("groups", 1) == 1 and dilation == [1, 1] and channels % CHANNEL_MULTIPLE == 0


def arguments(node: Any, read: Operands, view: View | None = None) -> tuple:
    """(x, w, bias, residual, stride, padding, activation, clip), w channels-last."""
    bias, residual = conv_spec.epilogue_values(node)
    stride, padding, _ = conv_spec.geometry(node)
    return (
        read(node.inputs[0]), read.constant(conv_spec.channels_last_weight, node.inputs[1]),
        conv_spec.optional(read, bias), conv_spec.optional(read, residual),
        stride, padding, *conv_spec.activation_of(node),
    )  # fmt: skip


FAMILY = KernelFamily(
    "splitk_conv",
    conv_spec.CONV_OPS,
    OP,
    eligible,
    arguments,
    KERNEL.available,
    configs=CONFIGS,
    timed=splits_fully,
)
