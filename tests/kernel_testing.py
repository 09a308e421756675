"""Shared helpers of the kernel tests: a tuner that decides by a table of timings (a CPU times
no GPU kernel, but every family's op runs its reference math here), float32 example operands,
and small models whose convolutions exercise every kernel family."""

from __future__ import annotations

from collections.abc import Mapping

import keras
import torch

import kerasrt
from kerasrt.ir.graph import Graph, Node
from kerasrt.ir.ops import KERNEL, OPS
from kerasrt.kernels.registry import KernelFamily, View
from kerasrt.tuning import tactics
from kerasrt_testing import random_input, randomize

L = keras.layers


class TableTuner(tactics.Tuner):
    """Every family runs here and its time is ``ms[family]`` (absent: it does not run);
    Inductor's is ``ms["inductor"]``. Each measurement launches the op once on the example
    operands (the CPU computes its reference), so the timed arguments are checked against the
    op's schema. ``measured`` lists what was timed."""

    def __init__(self, ms: Mapping[str, float], tag: str = "table"):
        super().__init__(torch.device("cpu"))
        self.ms = dict(ms)
        self.tag = tag
        self.measured: list[str] = []

    def environment(self) -> dict[str, str]:
        return {"device": "a table of timings", "tag": self.tag}

    def available(self, family: KernelFamily) -> bool:
        return family.name not in self.exclude

    def measure(self, family: KernelFamily, args: tuple, prebuilt: dict) -> tuple[int, float] | None:
        self.measured.append(family.name)
        family.call(args, len(family.configs) - 1 if family.configs else 0)
        if family.name not in self.ms:
            return None
        return (len(family.configs) - 1 if family.configs else 0), self.ms[family.name]

    def inductor_ms(self, node: Node, view: View, operands: tactics.ExampleOperands) -> float:
        self.measured.append("inductor")
        return self.ms.get("inductor", 1.0)


FAST_KERNELS = {
    "cudnn_conv": 1.0,
    "pointwise_conv": 0.8,
    "stem_conv": 0.7,
    "depthwise_conv": 0.6,
    "splitk_conv": 2.0,
    "dual_conv": 0.5,
    "pointwise_pair": 0.3,
    "linear_gemm": 0.9,
    "quantized_gemm": 0.4,
    "inductor": 1.5,
}
"""Every family beats Inductor, the merged kernels their parts."""


class GraphValues(tactics.ExampleOperands):
    """The values of ``graph`` on a random input, each computed by its IR op (in the graph's
    own dtypes; 4-D activations channels-last, as engines lay them out): operands for a
    kernel that agree with each other, as in a real engine (a folded pad's input and output)."""

    def __init__(self, graph: Graph, seed: int = 0, device: str = "cpu"):
        super().__init__(torch.device(device), seed)
        for value in graph.inputs:
            super().__call__(value)
        for node in graph.nodes:
            for value, result in zip(node.outputs, ir_result(node, self)):
                if result.dim() == 4:
                    result = result.contiguous(memory_format=torch.channels_last)
                self._made[id(value)] = result


def ir_result(node: Node, read: tactics.ExampleOperands) -> list[torch.Tensor]:
    """What the IR op of ``node`` computes on ``read``'s operands: the definition a kernel
    must match."""
    attrs = {k: v for k, v in node.attrs.items() if k != KERNEL}
    out = OPS[node.op].impl(*(read(v) for v in node.inputs), **attrs)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def bottleneck(x, filters: int, stride: int = 1, project: bool = False):
    """A ResNet50 (v1) bottleneck block: 1x1 (strided), 3x3, 1x1 expansion x4; a projection
    shortcut (1x1, strided) where ``project``."""
    y = L.ReLU()(L.BatchNormalization()(L.Conv2D(filters, 1, strides=stride)(x)))
    y = L.ReLU()(L.BatchNormalization()(L.Conv2D(filters, 3, padding="same")(y)))
    y = L.BatchNormalization()(L.Conv2D(4 * filters, 1)(y))
    shortcut = L.BatchNormalization()(L.Conv2D(4 * filters, 1, strides=stride)(x)) if project else x
    return L.ReLU()(L.Add()([shortcut, y]))


def resnet_stages() -> keras.Model:
    """Two ResNet-style stages: one of three blocks at stride 1, one of one block at stride 2."""
    inp = keras.Input((8, 8, 16), name="image")
    x = bottleneck(inp, 16, project=True)
    x = bottleneck(x, 16)
    x = bottleneck(x, 16)
    x = bottleneck(x, 32, stride=2, project=True)
    return randomize(keras.Model(inp, L.Dense(3, name="classifier")(L.GlobalAveragePooling2D()(x))))


def mobile_net() -> keras.Model:
    """An image stem (3x3/2 over RGB, ReLU6), a MobileNet block with Keras' asymmetric zero
    padding before a strided depthwise conv, 1x1 expansions and projections, a SiLU 1x1."""
    inp = keras.Input((12, 12, 3), name="image")
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(16, 3, strides=2, padding="same", name="stem")(inp)))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(32, 1, name="expand")(x)))
    x = L.ZeroPadding2D(((0, 1), (0, 1)))(x)
    x = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, strides=2, name="depthwise")(x)))
    x = L.BatchNormalization()(L.Conv2D(16, 1, name="project")(x))
    x = L.Conv2D(32, 1, activation="silu", name="silu_1x1")(x)
    x = L.Conv2D(48, 3, padding="same", activation="relu", name="head")(x)  # split-K takes it
    return randomize(keras.Model(inp, L.Dense(4, name="classifier")(L.GlobalAveragePooling2D()(x))))


def mlp_block() -> keras.Model:
    """A ConvNeXt-style block on tokens: Dense layers on a rank-3 tensor, an exact and a tanh
    GELU, a residual add after the second Dense, a ReLU Dense on the pooled features."""
    inp = keras.Input((6, 16), name="tokens")
    x = L.LayerNormalization()(inp)
    x = L.Dense(64, activation="gelu", name="expand")(x)
    x = L.Dense(16, name="project")(x)
    x = L.Add()([inp, x])
    x = L.Dense(32, activation=keras.activations.gelu, name="erf_gelu")(x)
    x = L.Dense(32, activation=lambda t: keras.activations.gelu(t, approximate=True), name="approx")(x)
    return randomize(keras.Model(inp, L.Dense(4, activation="relu")(L.GlobalAveragePooling1D()(x))))


def dense_tokens() -> keras.Model:
    """Dense layers on 32 tokens with sizes that quantized GEMMs take (multiples of 16): a GELU
    expansion, a projection with a residual add, a ReLU head."""
    inp = keras.Input((8, 32), name="tokens")
    x = L.Dense(64, activation="gelu", name="expand")(inp)
    x = L.Add()([inp, L.Dense(32, name="project")(x)])
    return randomize(keras.Model(inp, L.Dense(16, activation="relu", name="head")(x)))


SAMPLES = {
    "resnet_stages": (resnet_stages, (2, 8, 8, 16)),
    "mobile_net": (mobile_net, (2, 12, 12, 3)),
    "mlp_block": (mlp_block, (2, 6, 16)),
    "dense_tokens": (dense_tokens, (4, 8, 32)),
}


def sample_graph(
    name: str, tuner: TableTuner | None = None, precision: str = "FP16", device: str = "cpu"
) -> tuple[Graph, kerasrt.OptimizedModel]:
    """The graph of sample ``name`` at ``precision`` (INT8/FP8: calibrated on a random batch),
    with kernels chosen (and merged) by ``tuner``."""
    make, shape = SAMPLES[name]
    calibration = [random_input(shape, seed=11)] if precision in ("INT8", "FP8") else None
    optimized = kerasrt.Converter(
        make(),
        batch_size=shape[0],
        precision_mode=precision,
        device=device,
        conv_kernels="cudnn",
        tuner=tuner or TableTuner(FAST_KERNELS),
    ).convert(calibration_input_fn=calibration)
    return optimized.primary_graph(), optimized


def own_kernels_converter(
    model: keras.Model, tuner: TableTuner, batch: int = 2, **settings
) -> kerasrt.Converter:
    """An FP16 converter of ``model`` that puts every convolution it can on kerasrt's kernels
    (``conv_kernels="cudnn"``), as ``tuner`` decides."""
    return kerasrt.Converter(
        model, batch_size=batch, precision_mode="FP16", conv_kernels="cudnn", tuner=tuner, **settings
    )
