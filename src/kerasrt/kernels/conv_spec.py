"""What kerasrt's convolution kernels share: how an IR convolution node reads as an op call
(its epilogue operands, its arguments, its layout), and what every kernel computes (the
reference).

Every convolution kernel family (cuDNN graphs and the Triton kernels) fuses the same
epilogue, ``act(conv(x, w) + residual + bias)`` with ``act`` one of ``ACTIVATIONS``, on
channels-last FP16/BF16 activations: declaring it once keeps the families interchangeable,
so the tactics can time any of them for a node and the engine emit the winner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kerasrt.kernels import op_library

ACTIVATIONS = ("none", "relu", "clamp", "silu", "gelu", "gelu_tanh")
"""Epilogue activations the Triton kernels apply; "clamp" takes ``clip`` = [lo, hi] (ReLU6
is clamp [0, 6]); "gelu" is the exact (erf) GELU, "gelu_tanh" its tanh approximation. A
Triton kernel takes the index into this tuple as its ``ACT``."""
CONV_ACTIVATIONS = ACTIVATIONS[:4]
"""The activations every convolution family fuses (cuDNN's graphs among them)."""
FUSED_DTYPES = (torch.float16, torch.bfloat16)
"""Activation dtypes the kernels compute in (float32 accumulation)."""
CONV_OPS = ("conv", "conv_fused")


def epilogue_constants(activation: str, clip: Sequence[float]) -> dict[str, Any]:
    """The constexpr arguments of the Triton kernels' epilogue: the activation's code and the
    clamp bounds (zero unless it clamps). Constexpr, not arguments: an AOTInductor compile
    types a Python float argument as float64, which made clamps slower in packages."""
    lo, hi = (clip[0], clip[1]) if activation == "clamp" else (0.0, 0.0)
    return {"ACT": ACTIVATIONS.index(activation), "LO": lo, "HI": hi}


def epilogue_inputs(node: Any) -> tuple[bool, bool]:
    """(has bias, has residual) of an IR conv or conv_fused node: the operands after x and w."""
    if node.op == "conv":
        return len(node.inputs) > 2, False
    return node.attrs.get("has_bias", True), node.attrs.get("has_residual", False)


def epilogue_values(node: Any) -> tuple[Any, Any]:
    """(bias, residual): the IR values of a conv or conv_fused node's epilogue operands, None
    for each it lacks."""
    has_bias, has_residual = epilogue_inputs(node)
    bias = node.inputs[2] if has_bias else None
    return bias, node.inputs[2 + int(has_bias)] if has_residual else None


def activation_of(node: Any, attr: str = "activation") -> tuple[str, list[float]]:
    """(activation, clip) of a fused node as the kernels take them; ``attr``: the attribute
    naming it (a ``conv_pair`` has a second one, "activation2"), its bounds in ``attr_attrs``."""
    act = node.attrs.get(attr) or "none"
    clip: list[float] = []
    bounds = node.attrs.get(attr + "_attrs") or {}
    if act == "clamp":
        clip = [float(bounds["min"]), float(bounds["max"])]
    if act == "gelu" and bounds.get("approximate", "none") == "tanh":
        act = "gelu_tanh"
    return act, clip


def fusable(node: Any) -> bool:
    """Whether an IR conv or conv_fused node suits the fused kernels at all (each family's
    ``eligible`` adds its own shape rules): a 2-D convolution, an activation they fuse (a
    clamp with both bounds), constant weight and bias, FP16/BF16 activations."""
    if node.op not in CONV_OPS or len(node.inputs[1].shape) != 4:
        return False
    act = node.attrs.get("activation") or "none"
    bounds = node.attrs.get("activation_attrs") or {}
    if act not in CONV_ACTIVATIONS or (act == "clamp" and None in (bounds.get("min"), bounds.get("max"))):
        return False
    has_bias, _ = epilogue_inputs(node)
    constants = node.inputs[1].is_constant and (not has_bias or node.inputs[2].is_constant)
    return constants and node.inputs[0].dtype in ("float16", "bfloat16")


def geometry(node: Any) -> tuple[list[int], list[int], list[int]]:
    """stride, padding and dilation of an IR conv or conv_fused node."""
    a = node.attrs
    return list(a["stride"]), list(a["padding"]), list(a.get("dilation", [1, 1]))


def is_plain_1x1(node: Any) -> bool:
    """A fusable 1x1, unpadded, ungrouped, undilated convolution (any stride)."""
    if not fusable(node) or tuple(node.inputs[1].shape[2:]) != (1, 1):
        return False
    _, padding, dilation = geometry(node)
    return node.attrs.get("groups", 1) == 1 and padding == [0, 0] and dilation == [1, 1]


def input_channels(c: int) -> int:
    """Input channels as the cuDNN convolutions take them: at least 4. cuDNN's FP16 kernels
    read channels in groups of 4 and would pad an RGB image itself, in an extra kernel per
    call; padded in the engine, the zero channel is written by the kernel that produces the
    input anyway."""
    return max(c, 4)


def pad_channels(x: torch.Tensor) -> torch.Tensor:
    """``x`` with zero input channels added up to ``input_channels``, channels-last (as the
    kernels read it, and as the tactics' example tensors are laid out, so a plan's call key
    made while timing is the one the engine's call has)."""
    extra = input_channels(x.shape[1]) - x.shape[1]
    if not extra:
        return x
    padded = torch.ops.aten.constant_pad_nd.default(x, [0, 0, 0, 0, 0, extra])
    return padded.contiguous(memory_format=torch.channels_last)


def channels_last_weight(w: torch.Tensor) -> torch.Tensor:
    """A conv weight with its input channels padded (``input_channels``), channels-last: how
    the cuDNN and implicit-GEMM kernels read it (memory order K, R, S, C)."""
    extra = input_channels(w.shape[1]) - w.shape[1]
    if extra:
        w = torch.nn.functional.pad(w, [0, 0, 0, 0, 0, extra])
    return w.contiguous(memory_format=torch.channels_last)


def output_shape(
    x: Sequence[int], w: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> list[int]:
    """N, K, H', W' of a 2-D convolution with symmetric ``padding``."""
    spatial = [
        (x[2 + i] + 2 * padding[i] - dilation[i] * (w[2 + i] - 1) - 1) // stride[i] + 1 for i in range(2)
    ]
    return [x[0], w[0], *spatial]


def empty_output(
    x: torch.Tensor,
    w: torch.Tensor,
    stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0),
    dilation: Sequence[int] = (1, 1),
) -> torch.Tensor:
    """A convolution's output, uninitialized: channels-last, x's dtype and device."""
    return empty_channels_last(output_shape(x.shape, w.shape, stride, padding, dilation), x)


def empty_channels_last(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """An uninitialized channels-last tensor of NCHW ``shape``, ``like``'s dtype and device.

    Made as an NHWC buffer seen through a permutation: Inductor lowers
    ``torch.empty(memory_format=channels_last)`` with contiguous strides, so a traced Triton
    kernel writing an op's output got a copy of the uninitialized buffer first (one more
    kernel per op), and an ``empty_strided`` output was not always written in place."""
    n, c, h, w = shape
    return torch.empty((n, h, w, c), dtype=like.dtype, device=like.device).permute(0, 3, 1, 2)


def reference(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    clip: Sequence[float],
) -> torch.Tensor:
    """act(conv2d(x, w) + residual + bias) in PyTorch ops (rounded to the input dtype after the
    conv, as an unfused program would): what every convolution kernel computes."""
    y = torch.convolution(x, w, bias, list(stride), list(padding), list(dilation), False, [0, 0], 1)
    if residual is not None:
        y = y + residual
    return activate(y, activation, clip)


def activate(y: torch.Tensor, activation: str, clip: Sequence[float], inplace: bool = False) -> torch.Tensor:
    """An epilogue activation (one of ``ACTIVATIONS``, "clamp" to ``clip``) in PyTorch ops;
    ``inplace``: applied to ``y`` itself (a kernel finishing its output in place)."""
    if activation in ("gelu", "gelu_tanh"):
        out = torch.nn.functional.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
        return y.copy_(out) if inplace else out
    if activation == "relu":
        return y.relu_() if inplace else torch.relu(y)
    if activation == "silu":
        return torch.nn.functional.silu(y, inplace=inplace)
    if activation == "clamp":
        return y.clamp_(clip[0], clip[1]) if inplace else torch.clamp(y, clip[0], clip[1])
    if activation != "none":
        raise ValueError(f"kerasrt's fused kernels have no activation {activation!r}")
    return y


def pick(configs: Sequence[tuple], config: int, op: str) -> tuple:
    """``configs[config]``, or a clear error naming the op (a graph made for another kerasrt)."""
    if not 0 <= config < len(configs):
        raise ValueError(f"kerasrt::{op} has {len(configs)} configs, not config {config}")
    return configs[config]


@dataclass(frozen=True)
class TritonKernel:
    """One of ``triton_kernels``' JIT functions, by name (None without Triton): whether it runs
    on a device and on given operands, and its launch (``kernel[grid](...)``, as
    ``op_library.launchable`` makes it: traced, precompiled or run)."""

    name: str

    def get(self) -> Any:
        kernels = op_library.triton_kernels()
        return getattr(kernels, self.name) if kernels else None

    def runs(self, x: torch.Tensor, *rest: Any) -> bool:
        """Whether the kernel takes an op call whose first operand is ``x``."""
        return x.dtype in FUSED_DTYPES and self.get() is not None

    def available(self, device: torch.device) -> bool:
        return device.type == "cuda" and self.get() is not None

    def __getitem__(self, grid: Any) -> Any:
        return op_library.launchable(self.get())[grid]


def optional(read: Any, value: Any) -> Any:
    """``read(value)``, or None for a missing operand."""
    return None if value is None else read(value)
