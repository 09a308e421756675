"""1x1 convolutions with their bias, residual add and activation in one Triton GEMM kernel.

A 1x1, stride-1 convolution over channels-last activations is a matrix product: (pixels x C)
times (C x K). In MobileNet/EfficientNet-style blocks these products are thin (C of 16 to 960)
and memory-bound: what matters is writing the activated output once. cuDNN fuses ReLU6 and
SiLU epilogues only with runtime-compiled kernels (slow to build, 2.7-3.8x their traffic
floor on an H200 at MobileNetV2 batch 128) and Inductor writes the product, then reads it
back for the epilogue. ``kerasrt::pointwise_conv`` computes the product tile by tile and
applies bias, residual and activation before its single store.

Like the other kerasrt ops it is a torch custom op with the reference composition as its
CPU kernel (the op's definition); the CUDA kernel's tile shape (a "config") is chosen per
signature by measured tactics (``kerasrt.backend.tactics``) and kept in ``triton_configs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kerasrt.backend import cudnn_conv, op_library, triton_configs

FUSED_DTYPES = (torch.float16, torch.bfloat16)
CONFIGS = (
    (128, 64, 32, 4, 3),
    (128, 128, 32, 8, 3),
    (64, 128, 32, 4, 3),
    (256, 64, 32, 8, 3),
    (128, 32, 32, 4, 4),
    (64, 64, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (256, 128, 64, 8, 3),
)
"""(pixels per program, output channels per program, reduction step, warps, pipeline stages):
the tactics' candidates. The reduction step shrinks to the input channels (at least 16)."""


def reference(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    clip: Sequence[float],
) -> torch.Tensor:
    """What the op computes, in PyTorch ops: act(conv1x1(x, w) + residual + bias)."""
    return cudnn_conv.reference(x, w, bias, residual, [1, 1], [0, 0], [1, 1], activation, clip)


def empty_output(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The op's output, uninitialized: channels-last, x's dtype and device."""
    return cudnn_conv.empty_output(x, w, [1, 1], [0, 0], [1, 1])


def pointwise_conv(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    clip: list[float],
) -> torch.Tensor:
    """act(conv2d(x, w) + residual + bias) for a (K, C, 1, 1) weight, stride 1, no padding;
    NCHW logical shapes, channels-last output. The op's kernel on every device but CUDA
    (there, ``_cuda`` runs a Triton GEMM)."""
    out = empty_output(x, w)
    out.copy_(reference(x, w, bias, residual, activation, clip))
    return out


def _fake(x, w, bias, residual, activation, clip):
    return empty_output(x, w)


def _cuda(x, w, bias, residual, activation, clip):
    out = empty_output(x, w)
    if x.dtype not in FUSED_DTYPES or kernel() is None:
        out.copy_(reference(x, w, bias, residual, activation, clip))
        return out
    config = CONFIGS[triton_configs.chosen(signature(x, w, bias, residual, out, activation, clip))]
    launch(config, x, w, bias, residual, out, activation, clip)
    return out


op_library.define(pointwise_conv, cuda=_cuda, fake=_fake, inlinable=True)


def signature(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    out: torch.Tensor,
    activation: str,
    clip: Sequence[float],
) -> str:
    """The key of a call: the key ``kerasrt::cudnn_conv`` has for the same convolution, so one
    tactic table entry names either kernel."""
    operands = cudnn_conv.Operands(x, w, bias, residual, out)
    return cudnn_conv.signature(operands, [1, 1], [0, 0], [1, 1], activation, clip)


def available(device: torch.device) -> bool:
    """Whether the Triton pointwise kernel can run on ``device``."""
    return device.type == "cuda" and kernel() is not None


# -- the Triton kernel ---------------------------------------------------------------------------


def kernel() -> Any:
    """The Triton kernel (``triton_kernels.pointwise``), or None when Triton is not installed."""
    kernels = op_library.triton_kernels()
    return kernels.pointwise if kernels else None


def launch(
    config: tuple[int, int, int, int, int],
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    out: torch.Tensor,
    activation: str,
    clip: Sequence[float],
) -> None:
    """Run the kernel with one tile config (x, residual and out channels-last)."""
    block_m, block_n, block_k, warps, stages = config
    x = x.contiguous(memory_format=torch.channels_last)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    w = w.reshape(w.shape[0], -1).contiguous()
    n, c, h, wd = x.shape
    pixels, channels_out = n * h * wd, w.shape[0]
    block_k = min(block_k, op_library.dot_block(c))
    grid = (((pixels + block_m - 1) // block_m) * ((channels_out + block_n - 1) // block_n),)
    op_library.launchable(kernel())[grid](
        x, w, bias if bias is not None else w, residual if residual is not None else x, out,
        pixels, channels_out, c,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, **cudnn_conv.epilogue_constants(activation, clip),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


# -- IR nodes ------------------------------------------------------------------------------------


def eligible(node: Any) -> bool:
    """Whether an IR conv/conv_fused node is a 1x1, stride-1, unpadded, ungrouped convolution
    this kernel runs (and ``cudnn_conv.fusable``: a fusable activation, constant weights,
    FP16/BF16)."""
    if not cudnn_conv.fusable(node):
        return False
    a = node.attrs
    if tuple(node.inputs[1].shape[2:]) != (1, 1) or a.get("groups", 1) != 1:
        return False
    return list(a["stride"]) == [1, 1] and list(a["padding"]) == [0, 0] and list(a["dilation"]) == [1, 1]
