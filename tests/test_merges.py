"""Merged convolutions, on the CPU: the merged op's definition against PyTorch's
convolutions, which neighbours of a ResNet-style network merge, and engines and artifacts
that run them. The Triton kernels need a GPU: ``bench/gpu_checks.py`` checks their numerics
there and ``bench/merge_probe.py`` times them."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kerasrt
from kerasrt.backend import dual_conv, merges, tactics, triton_configs
from kerasrt_testing import randomize
from test_artifact import run_packages_in_fresh_process
from test_kernels import CUDNN_OP, convert_on_own_kernels, fake_cudnn  # noqa: F401 (a fixture)

L = keras.layers
DUAL_OP = torch.ops.kerasrt.dual_conv.default


@pytest.mark.parametrize(
    "stride, activation, clip", [(1, "relu", []), (2, "none", []), (2, "clamp", [0.0, 6.0])]
)
def test_the_dual_op_adds_the_projection_to_the_convolution(stride, activation, clip) -> None:
    gen = torch.Generator().manual_seed(stride)
    h = torch.randn(2, 16, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 32, 5 * stride, 5 * stride, generator=gen)
    w, ws = torch.randn(24, 16, 1, 1, generator=gen), torch.randn(24, 32, 1, 1, generator=gen)
    bias = torch.randn(24, generator=gen)
    got = DUAL_OP(h, w, x, ws, bias, [stride, stride], activation, clip)
    expected = F.conv2d(h, w, bias) + F.conv2d(x, ws, stride=stride)
    expected = {"relu": F.relu, "none": lambda t: t, "clamp": lambda t: t.clamp(0.0, 6.0)}[activation](
        expected
    )
    assert got.shape == (2, 24, 5, 5) and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


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
    return randomize(keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(x))))


def test_which_neighbours_merge_in_resnet_stages() -> None:
    graph = kerasrt.Converter(resnet_stages(), batch_size=2, precision_mode="FP16").convert().primary_graph()
    found = merges.candidates(graph.nodes, graph.outputs)
    # each projection block's shortcut took the expansion's output as its residual (Keras adds
    # [shortcut, y]) and absorbs it; identity blocks add their input, made by no 1x1 conv alone
    described = [(tuple(m.lead.inputs[1].shape), tuple(m.absorbed.inputs[1].shape)) for m in found]
    assert described == [((64, 16, 1, 1), (64, 16, 1, 1)), ((128, 64, 1, 1), (128, 32, 1, 1))]
    strided = found[1]
    assert strided.lead.attrs["stride"] == [2, 2] and strided.absorbed.attrs["stride"] == [1, 1]
    assert [m.kernel for m in found] == [merges.PREFIX + m.absorbed.outputs[0].name for m in found]
    # an absorbed output read outside the engine is not merged away
    assert merges.candidates(graph.nodes, [found[0].absorbed.outputs[0]]) == [found[1]]


@pytest.fixture
def fast_merges(monkeypatch, fake_cudnn):  # noqa: F811 (the fixture imported above)
    """The merged kernel "available" on the CPU, every config timed at 0.3 ms (faster than
    the 0.5 + 0.5 ms of two fake cuDNN kernels). Returns the timed merges."""
    timed: list[str] = []

    def best_config(configs, run, what):
        timed.append(what.outputs[0].name)
        return 2, 0.3

    monkeypatch.setattr(dual_conv, "available", lambda device: True)
    monkeypatch.setattr(tactics, "best_config", best_config)
    monkeypatch.setattr(triton_configs, "_CHOSEN", {})
    return timed


def test_merged_convolutions_run_as_one_op_and_artifacts_keep_them(
    tmp_path: Path, fast_merges, monkeypatch
) -> None:
    precompiled: list[tuple] = []  # the merged kernel's compile jobs, made before any timing
    monkeypatch.setattr(
        tactics,
        "precompile",
        lambda jobs, device, requests=(): (
            precompiled.extend(
                operands() for candidates, operands in jobs if candidates is merges._dual_candidates
            )
            or {}
        ),
    )
    model = resnet_stages()
    conv, optimized, x, got = convert_on_own_kernels(model, (2, 8, 8, 16))
    assert len(fast_merges) == 2
    assert len(precompiled) == 2 and all(len(args) == 9 for args in precompiled)
    program = optimized.program(optimized.engine_shapes[0])
    (engine,) = program.compiled_engines.values()
    calls = [n.target for n in engine.module.graph.nodes if n.op == "call_function"]
    assert calls.count(DUAL_OP) == 2 and calls.count(CUDNN_OP) == 10
    kinds = sorted(k.partition(":")[0] for k in program.kernel_convs.values())
    assert kinds == ["cudnn"] * 10 + ["dual"] * 2 + [merges.ABSORBED] * 2
    merged = {s: c for s, c in program.kernel_choices.items() if merges.is_merge_signature(s)}
    assert [(c.kernel, c.config, c.apart_ms) for c in merged.values()] == [("triton", 2, 1.0)] * 2
    assert {triton_configs.chosen(s) for s in merged} == {2}
    summary = conv.summary(print_fn=None)
    assert "2 projection shortcuts merged into the convolution they are added to" in summary

    # a second build on this machine takes the cached choices: nothing is timed again
    kerasrt.Converter(
        model, batch_size=2, precision_mode="FP16", compiler="inductor", conv_kernels="cudnn"
    ).convert()
    assert len(fast_merges) == 2 and len(precompiled) == 2

    path = conv.save(tmp_path / "art")
    entry = json.loads((path / "manifest.json").read_text())["engines"][0]
    assert entry["compiled"]["kernel_convs"] == program.kernel_convs
    assert {c["kernel"] for s, c in entry["tactics"]["choices"].items() if merges.is_merge_signature(s)} == {
        "triton"
    }
    fresh = run_packages_in_fresh_process(path, x, tmp_path)
    np.testing.assert_allclose(fresh, got, rtol=0, atol=1e-3 * np.abs(got).max())


def test_merges_that_lose_to_their_parts_are_not_taken(monkeypatch, fast_merges) -> None:
    monkeypatch.setattr(tactics, "best_config", lambda configs, run, what: (0, 1.5))
    _, optimized, _, _ = convert_on_own_kernels(resnet_stages(), (2, 8, 8, 16))
    program = optimized.program(optimized.engine_shapes[0])
    (engine,) = program.compiled_engines.values()
    calls = [n.target for n in engine.module.graph.nodes if n.op == "call_function"]
    assert DUAL_OP not in calls
    assert set(program.kernel_convs.values()) == {"cudnn"}
    env = tactics.environment(torch.device("cpu"))
    lost = [c for s, c in tactics.choice_table(env).items() if merges.is_merge_signature(s)]
    assert len(lost) == 2 and {(c.kernel, c.apart_ms, c.triton_ms) for c in lost} == {("apart", 1.0, 1.5)}


def test_a_first_build_reports_its_compiling_and_timing_and_a_cached_one_does_not(fast_merges) -> None:
    def build() -> list[str]:
        heard: list[str] = []
        kerasrt.Converter(
            resnet_stages(),
            batch_size=2,
            precision_mode="FP16",
            compiler="eager",
            conv_kernels="cudnn",
            progress=heard.append,
        ).convert()
        return [m for m in heard if m.startswith(("building", "compiling", "timing"))]

    first = build()
    shapes = len({s for s in first if s.startswith("timing kernels")})
    assert shapes >= 2 and first == [
        "building the engines for input shapes (2, 8, 8, 16)",
        f"compiling kernel candidates for {shapes} convolution shape(s)",
        *(f"timing kernels for convolution shape {i} of {shapes}" for i in range(1, shapes + 1)),
        "timing merged kernels for 2 pair(s) of convolutions",
    ]
    assert build() == ["building the engines for input shapes (2, 8, 8, 16)"]  # all cached
