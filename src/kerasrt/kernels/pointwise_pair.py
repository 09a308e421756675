"""Two chained 1x1 convolutions in one Triton kernel, the second's output written over the
first's input: the IR op ``conv_pair``, run by ``kerasrt::pointwise_pair``.

A ResNet bottleneck ends in a 1x1 expansion with the residual add, and the next block starts
with a 1x1 reduction of that output. Both are memory-bound: the expansion's output is written
by one and read straight back by the other. ``kerasrt::pointwise_pair`` computes a tile of
pixels through both products: each chunk of the first output is finished (residual, bias,
activation), stored once (the next block's residual add still reads it) and multiplied into
the second product's accumulator at once. The first product may also add a projection
shortcut, as ``dual_conv`` does (a ResNet stage's first block whose output the next block
reduces).

The second product has as many channels as the first's input ``x`` and the same pixels, and
``x`` is read by nothing else (the block's 3x3 convolution made it for the expansion alone),
so the op writes the second output over ``x``: a program loads its rows of ``x`` before it
stores anything and writes back those rows only, so the pair adds no memory. The tactics
make ``conv_pair`` nodes only where this beats the two convolutions' own best kernels
(``kerasrt.tuning.merges``), and only where ``x`` is private to the pair.
"""

from __future__ import annotations

from typing import Any

import torch

from kerasrt.kernels import conv_spec, op_library
from kerasrt.kernels.registry import KernelFamily, Operands, View

MAX_CHANNELS = 256
"""The most channels of ``x`` (so of the second output) and of the shortcut the kernel takes:
a program keeps their (pixels x C) tiles and a (pixels x C) float32 accumulator on chip."""
MERGE_MAX_CHANNELS = 64
"""The most channels of ``x`` (so of the second output) where the tactics consider the pair: a
program walks the first output's channels serially, and wider pairs lost to their parts on
the H100 (BENCHMARKS.md, tenth round), so they are not compiled."""
CONFIGS = (
    (128, 64, 8, 3),
    (64, 128, 4, 3),
    (64, 64, 4, 3),
    (128, 64, 4, 2),
)
"""(pixels per program, first-output channels per step, warps, pipeline stages)."""


def pointwise_pair(*args: Any) -> torch.Tensor:
    """Returns y and writes z over ``x`` (``reference``). The op's kernel on every device but
    CUDA."""
    *operands, _config = args
    x, w1, shortcut, ws, _, _, residual, w2, *_ = operands
    _check(x, w2, shortcut, ws, residual)
    y, z = reference(*operands)
    out = conv_spec.empty_output(x, w1)
    out.copy_(y)
    x.copy_(z)
    return out


def reference(x, w1, shortcut, ws, stride, b1, residual, w2, b2, act1, clip1, act2, clip2):
    """(y, z) in PyTorch ops, y rounded to x's dtype between them (as the two convolutions run
    apart would store it)."""
    if shortcut is not None and ws is not None:
        residual = torch.convolution(shortcut, ws, None, list(stride), [0, 0], [1, 1], False, [0, 0], 1)
    y = conv_spec.reference(x, w1, b1, residual, [1, 1], [0, 0], [1, 1], act1, clip1).to(x.dtype)
    return y, conv_spec.reference(y, w2, b2, None, [1, 1], [0, 0], [1, 1], act2, clip2)


def _check(x, w2, shortcut, ws, residual) -> None:
    if w2.shape[0] != x.shape[1]:
        raise ValueError(
            f"pointwise_pair writes its second output over x: it needs as many channels, "
            f"got {w2.shape[0]} for x's {x.shape[1]}"
        )
    if (shortcut is None) != (ws is None) or (shortcut is not None and residual is not None):
        raise ValueError("pointwise_pair takes a shortcut with its weight, and then no residual")


def _fake(x, w1, *rest):
    return conv_spec.empty_output(x, w1)


def _cuda(*args):
    *operands, config = args
    x = operands[0]
    in_place = x.is_contiguous(memory_format=torch.channels_last)
    if not KERNEL.runs(x) or not in_place:
        return pointwise_pair(*args)
    y = conv_spec.empty_output(x, operands[1])
    launch(config, y, *operands)
    return y


OP = op_library.define(
    "pointwise_pair",
    "(Tensor(a!) x, Tensor w1, Tensor? shortcut, Tensor? ws, int[] stride, Tensor? b1, Tensor? residual,"
    " Tensor w2, Tensor? b2, str act1, float[] clip1, str act2, float[] clip2, int config) -> Tensor",
    default=pointwise_pair,
    cuda=_cuda,
    fake=_fake,
    inlinable=True,
)
"""y = act1(conv1x1(x, w1) [+ conv1x1(shortcut, ws, stride)] + residual + b1), returned, and
z = act2(conv1x1(y, w2) + b2), written over ``x``; weights (K, C, 1, 1), NCHW logical shapes,
channels-last y; ``shortcut`` and ``ws`` both or neither, and then no ``residual``."""


KERNEL = conv_spec.TritonKernel("pair")


def launch(
    config: int, y, x, w1, shortcut, ws, stride, b1, residual, w2, b2, act1, clip1, act2, clip2
) -> None:
    """Run config ``config``: y and the second output (over ``x``) written; x, shortcut,
    residual and y channels-last."""
    block_m, block_n, warps, stages = conv_spec.pick(CONFIGS, config, "pointwise_pair")
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
    first = conv_spec.epilogue_constants(act1, clip1)
    second = conv_spec.epilogue_constants(act2, clip2)
    KERNEL[((n * h * wd + block_m - 1) // block_m,)](
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


def eligible(node: Any, view: View) -> bool:
    """A ``conv_pair`` node the kernel runs: activations it fuses, at most ``MAX_CHANNELS``
    channels of ``x`` and of the shortcut, and ``x`` private to the node (it is written over)."""
    acts = [conv_spec.activation_of(node, attr)[0] for attr in ("activation", "activation2")]
    named = dict(zip(node.attrs["operands"], node.inputs))
    widest = max(named["x"].shape[1], named["shortcut"].shape[1] if "shortcut" in named else 0)
    return (
        all(a in conv_spec.CONV_ACTIVATIONS for a in acts)
        and widest <= MAX_CHANNELS
        and view.private(named["x"], node)
    )


def arguments(node: Any, read: Operands, view: View | None = None) -> tuple:
    """(x, w1, shortcut, ws, stride, b1, residual, w2, b2, act1, clip1, act2, clip2)."""
    named = dict(zip(node.attrs["operands"], node.inputs))

    def get(name: str) -> Any:
        return read(named[name]) if name in named else None

    head = (get("x"), get("w1"), get("shortcut"), get("ws"), list(node.attrs["stride"]), get("b1"))
    return (*head, get("residual"), get("w2"), get("b2"), *conv_spec.activation_of(node),
            *conv_spec.activation_of(node, "activation2"))  # fmt: skip


def results(y: Any, args: tuple) -> list[Any]:
    """The node's (y, z): the op returns y and has written z over x, its first argument."""
    return [y, args[0]]


FAMILY = KernelFamily(
    "pointwise_pair",
    ("conv_pair",),
    OP,
    eligible,
    arguments,
    KERNEL.available,
    configs=CONFIGS,
    results=results,
)
