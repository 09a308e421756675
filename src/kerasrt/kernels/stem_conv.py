"""Convolutions over few input channels (a network's stem) as one Triton implicit GEMM with
their bias and activation.

An image stem (ResNet's 7x7/2 over RGB, MobileNet's and EfficientNet's 3x3/2) reads 3
channels, 4 with the zero channel the engine adds (``cudnn_conv.input_channels``): too few
for cuDNN's implicit-GEMM kernels. Over channels-last input one row of the window, S pixels
x C channels, is contiguous in memory: the kernel's reduction walks the R window rows, each
a (pixels x S*C) @ (S*C x K) product of a gathered input tile, and applies bias and
activation before its one store. It takes its input as cuDNN does (4 channels, in the
engine's precision): reading the float32 RGB image instead, to skip the engine's
cast-and-pad pass (44 us for ResNet50 at batch 128 on an H100), made that stem 2.2x slower
(scalar loads of 12-byte pixels instead of 8-byte vectors; ``python bench/stem_probe.py``).

Where it wins is measured per shape. On an H100 at batch 128 it ran MobileNetV2's stem (3x3/2
+ ReLU6) in 0.066 ms against 0.261 for Inductor's way and 0.578 for cuDNN's runtime-compiled
fusion, EfficientNetB0's (+ SiLU) in 0.073 against cuDNN's 0.118, and lost ResNet50's to
cuDNN's first-layer kernel (0.277 against 0.208 ms).

Like the other kerasrt ops it is a torch library op whose CPU kernel is the reference
composition (the op's definition); the CUDA kernel's tile shape is chosen per signature by
measured tactics (``kerasrt.backend.tactics``) and kept in ``triton_configs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kerasrt.backend import cudnn_conv, op_library, triton_configs

FUSED_DTYPES = (torch.float16, torch.bfloat16)
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
"""(output pixels per program, output channels per program, warps, pipeline stages): the
tactics' candidates. Channels per program shrink to the output channels (at least 16)."""


def reference(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    activation: str,
    clip: Sequence[float],
) -> torch.Tensor:
    """What the op computes, in PyTorch ops: act(conv2d(x, w, stride, padding) + bias)."""
    return cudnn_conv.reference(x, w, bias, None, stride, padding, [1, 1], activation, clip)


def empty_output(
    x: torch.Tensor, w: torch.Tensor, stride: Sequence[int], padding: Sequence[int]
) -> torch.Tensor:
    """The op's output, uninitialized: channels-last, x's dtype and device."""
    return cudnn_conv.empty_output(x, w, stride, padding, [1, 1])


def stem_conv(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    activation: str,
    clip: list[float],
) -> torch.Tensor:
    """act(conv2d(x, w) + bias), symmetric zero ``padding``; NCHW logical shapes, channels-last
    output. The op's kernel on every device but CUDA (there, ``_cuda`` runs a Triton kernel)."""
    out = empty_output(x, w, stride, padding)
    out.copy_(reference(x, w, bias, stride, padding, activation, clip))
    return out


def _fake(x, w, bias, stride, padding, activation, clip):
    return empty_output(x, w, stride, padding)


def _cuda(x, w, bias, stride, padding, activation, clip):
    out = empty_output(x, w, stride, padding)
    if x.dtype not in FUSED_DTYPES or kernel() is None:
        out.copy_(reference(x, w, bias, stride, padding, activation, clip))
        return out
    config = CONFIGS[triton_configs.chosen(signature(x, w, bias, out, stride, padding, activation, clip))]
    launch(config, x, w, bias, out, stride, padding, activation, clip)
    return out


op_library.define(stem_conv, cuda=_cuda, fake=_fake, inlinable=True)


def signature(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    activation: str,
    clip: Sequence[float],
) -> str:
    """The key of a call: the key ``kerasrt::cudnn_conv`` has for the same convolution, so one
    tactic table entry names either kernel."""
    operands = cudnn_conv.Operands(x, w, bias, None, out)
    return cudnn_conv.signature(operands, stride, padding, [1, 1], activation, clip)


def available(device: torch.device) -> bool:
    """Whether the Triton stem kernel can run on ``device``."""
    return device.type == "cuda" and kernel() is not None


# -- the Triton kernel ---------------------------------------------------------------------------


def kernel() -> Any:
    """The Triton kernel (``triton_kernels.stem``), or None when Triton is not installed."""
    kernels = op_library.triton_kernels()
    return kernels.stem if kernels else None


def launch(
    config: tuple[int, int, int, int],
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    activation: str,
    clip: Sequence[float],
) -> None:
    """Run the kernel with one tile config (x and out channels-last, w (K, C, R, S))."""
    block_m, block_n, warps, stages = config
    x = x.contiguous(memory_format=torch.channels_last)
    w = w.contiguous(memory_format=torch.channels_last)  # memory order K, R, S, C
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    oh, ow = out.shape[2:]
    block_n = min(block_n, op_library.dot_block(k))
    grid = ((n * oh * ow + block_m - 1) // block_m, (k + block_n - 1) // block_n)
    op_library.launchable(kernel())[grid](
        x, w, bias if bias is not None else w, out,
        n * oh * ow, h, wd, oh, ow, k,
        C=c, R=r, S=s, STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        HAS_BIAS=bias is not None, **cudnn_conv.epilogue_constants(activation, clip),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=op_library.dot_block(s * c),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


# -- IR nodes ------------------------------------------------------------------------------------


def eligible(node: Any) -> bool:
    """Whether an IR conv/conv_fused node is a convolution this kernel runs: a window wider than
    1x1 over few input channels (a row of at most ``MAX_ROW`` elements), ungrouped, undilated,
    no residual (and ``cudnn_conv.fusable``: a fusable activation, constant weights,
    FP16/BF16)."""
    if not cudnn_conv.fusable(node):
        return False
    a = node.attrs
    _, c, r, s = node.inputs[1].shape
    if (r, s) == (1, 1) or a.get("groups", 1) != 1 or list(a["dilation"]) != [1, 1]:
        return False
    return cudnn_conv.input_channels(c) * s <= MAX_ROW and not cudnn_conv.epilogue_inputs(node)[1]
