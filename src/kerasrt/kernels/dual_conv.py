"""A 1x1 convolution plus the 1x1 projection added to it as a residual, in one Triton GEMM:
the IR op ``dual_conv``.

The first block of each ResNet stage adds a projection shortcut to its last convolution:
``act(conv1x1(h, w) + conv1x1(x, ws, stride) + b)``. Run apart, the shortcut writes its output
and the expansion reads it back as the residual, both memory-bound. The sum is one matrix
product over concatenated reductions, ``[h | x_strided] @ [w | ws]^T``: ``kerasrt::dual_conv``
walks ``h``'s channels, then ``x``'s (read at the shortcut's stride), into one accumulator,
adds the bias, applies the activation and stores once. The projection is never written.
The tactics make ``dual_conv`` nodes only where this beats the two convolutions' own best
kernels (``kerasrt.tuning.merges``).
"""

from __future__ import annotations

from typing import Any

import torch

from kerasrt.kernels import conv_spec, op_library
from kerasrt.kernels.registry import KernelFamily, Operands, View

CHANNEL_MULTIPLE = 16
"""Both inputs' channels must be a multiple of this (a reduction step's least size)."""
CONFIGS = (
    (64, 128, 32, 4, 3),
    (128, 128, 64, 8, 3),
    (64, 64, 64, 4, 3),
    (128, 64, 32, 4, 3),
)
"""(pixels per program, output channels per program, reduction step, warps, pipeline stages)."""
SCHEMA = (
    "(Tensor h, Tensor w, Tensor x, Tensor ws, Tensor? bias, int[] stride, str activation, float[] clip,"
    " int config) -> Tensor"
)
"""The op's signature: act(conv1x1(h, w) + conv1x1(x, ws, stride) + bias); weights (K, C, 1,
1), NCHW logical shapes, channels-last output."""


def reference(h, w, x, ws, bias, stride, activation, clip) -> torch.Tensor:
    shortcut = torch.convolution(x, ws, None, list(stride), [0, 0], [1, 1], False, [0, 0], 1)
    return conv_spec.reference(h, w, bias, shortcut, [1, 1], [0, 0], [1, 1], activation, clip)


def _output(h, w, *rest) -> torch.Tensor:
    return conv_spec.empty_output(h, w)


KERNEL = conv_spec.TritonKernel("dual")


def launch(config: int, out, h, w, x, ws, bias, stride, activation, clip) -> None:
    """Run config ``config`` writing ``out`` (h, x and out channels-last)."""
    block_m, block_n, block_k, warps, stages = conv_spec.pick(CONFIGS, config, "dual_conv")
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
    KERNEL[grid](
        h, w, x, ws, bias if bias is not None else w, out,
        pixels, channels_out, k1, k2, oh, ow, h2, w2, stride[0], stride[1],
        HAS_BIAS=bias is not None, **conv_spec.epilogue_constants(activation, clip),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


OP = op_library.define_kernel("dual_conv", SCHEMA, _output, reference, launch, KERNEL.runs)


def eligible(node: Any, view: View | None = None) -> bool:
    """Every ``dual_conv`` node whose activation the kernel fuses, over channels in multiples
    of ``CHANNEL_MULTIPLE``."""
    act = node.attrs.get("activation") or "none"
    channels = (node.inputs[0].shape[1], node.inputs[2].shape[1])
    return act in conv_spec.CONV_ACTIVATIONS and not any(c % CHANNEL_MULTIPLE for c in channels)


def arguments(node: Any, read: Operands, view: View | None = None) -> tuple:
    """(h, w, x, ws, bias, stride, activation, clip)."""
    h, w, x, ws, *bias = node.inputs
    return (
        read(h), read(w), read(x), read(ws), conv_spec.optional(read, next(iter(bias), None)),
        list(node.attrs["stride"]), *conv_spec.activation_of(node),
    )  # fmt: skip


FAMILY = KernelFamily("dual_conv", ("dual_conv",), OP, eligible, arguments, KERNEL.available, configs=CONFIGS)
