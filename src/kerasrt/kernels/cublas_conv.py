"""1x1 convolutions as one cuBLAS GEMM with the bias in its epilogue (``addmm``), the residual
and activation applied in place after it.

Over channels-last activations a 1x1, stride-1 convolution is the matrix product (pixels x C)
@ (C x K), which cuBLAS runs at its tuned tile shapes for every size: for wide layers at large
batches (ResNet's 512 -> 2048 expansions) its GEMM can beat kernels written for thin ones.
The residual add and the activation are extra memory passes, so the tactics' timing decides
per layer shape where this wins.
"""

from __future__ import annotations

import torch

from kerasrt.kernels import conv_spec, op_library, pointwise_conv
from kerasrt.kernels.registry import KernelFamily

SCHEMA = (
    "(Tensor x, Tensor w, Tensor? bias, Tensor? residual, str activation, float[] clip, int config) -> Tensor"
)
"""The op's signature: act(conv2d(x, w) + residual + bias) for a (K, C, 1, 1) weight, stride 1,
no padding; NCHW logical shapes, channels-last output."""


def _output(x, w, *rest) -> torch.Tensor:
    return conv_spec.empty_output(x, w)


def runs(x, *rest) -> bool:
    return x.dtype in conv_spec.FUSED_DTYPES


CONFIGS = ((),)
"""One config: cuBLAS picks its own tiles."""


def launch(config: int, out, x, w, bias, residual, activation, clip) -> None:
    """(pixels x C) @ (C x K) into ``out``'s (pixels x K) memory, then residual and activation
    in place."""
    conv_spec.pick(CONFIGS, config, "cublas_conv")  # a graph made for another kerasrt: say so
    x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, wd = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n * h * wd, c)
    product = out.permute(0, 2, 3, 1).view(n * h * wd, w.shape[0])
    weight = w.reshape(w.shape[0], c).t()
    if bias is not None:
        torch.addmm(bias, rows, weight, out=product)
    else:
        torch.mm(rows, weight, out=product)
    if residual is not None:
        out.add_(residual)
    conv_spec.activate(out, activation, clip, inplace=True)


OP = op_library.define_kernel(
    "cublas_conv", SCHEMA, _output, pointwise_conv.reference, launch, runs, inlinable=False
)  # an AOTInductor package calls the op: cuBLAS compiles nothing


def available(device: torch.device) -> bool:
    return device.type == "cuda"


FAMILY = KernelFamily(
    "cublas_conv",
    conv_spec.CONV_OPS,
    OP,
    pointwise_conv.eligible,
    pointwise_conv.arguments,
    available,
    configs=CONFIGS,
    triton=False,
)
