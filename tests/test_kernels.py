"""Fused cuDNN convolutions and kernel tactics, on the CPU: the op's definition, engines that
call it (through Inductor and AOTInductor packages), and how tactics are chosen and cached.
The cuDNN kernels themselves need a GPU: ``bench/gpu_checks.py`` checks their numerics there."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import torch

import kerasrt
from kerasrt import cache
from kerasrt.artifact import _kernel_convs
from kerasrt.backend import (
    cudnn_conv,
    depthwise_conv,
    op_library,
    pointwise_conv,
    splitk_conv,
    stem_conv,
    tactics,
    triton_configs,
)
from kerasrt.backend.torch_backend import TorchEngine
from kerasrt.errors import ArtifactError, ConversionError
from kerasrt.ir.graph import Graph
from kerasrt.ir.ops import OPS
from kerasrt_testing import keras_reference, random_input, randomize
from test_artifact import run_packages_in_fresh_process

L = keras.layers
CUDNN_OP = torch.ops.kerasrt.cudnn_conv.default
REAL_MEASURE = tactics._measure


def ir_conv_fused(x, w, bias, residual, stride, padding, activation, clip, groups=1) -> torch.Tensor:
    """The IR's conv_fused on the ops' arguments: the definition each kerasrt kernel must match."""
    return OPS["conv_fused"].impl(
        x,
        w,
        *[t for t in (bias, residual) if t is not None],
        stride=stride,
        padding=padding,
        dilation=[1, 1],
        groups=groups,
        has_bias=bias is not None,
        has_residual=residual is not None,
        activation=None if activation == "none" else activation,
        activation_attrs={"min": clip[0], "max": clip[1]} if clip else None,
    )


@pytest.mark.parametrize(
    "has_bias, has_residual, activation, clip, stride, padding",
    [
        (True, False, "relu", [], [1, 1], [1, 1]),
        (True, True, "relu", [], [1, 1], [0, 0]),
        (True, False, "clamp", [0.0, 6.0], [1, 1], [1, 1]),
        (True, True, "silu", [], [1, 1], [1, 1]),
        (False, True, "none", [], [2, 2], [1, 1]),
        (False, False, "none", [], [2, 1], [0, 2]),
    ],
)
def test_the_op_computes_the_ir_conv_fused(has_bias, has_residual, activation, clip, stride, padding) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 9, 8, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 5, 3, 3, generator=gen)
    bias = torch.randn(6, generator=gen) if has_bias else None
    out_shape = cudnn_conv.output_shape(x.shape, w.shape, stride, padding, [1, 1])
    residual = torch.randn(out_shape, generator=gen) if has_residual else None
    args = (x, w, bias, residual, stride, padding, [1, 1], activation, clip)
    got = CUDNN_OP(*args)
    assert got.is_contiguous(memory_format=torch.channels_last) and list(got.shape) == out_shape
    expected = ir_conv_fused(x, w, bias, residual, stride, padding, activation, clip)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(CUDNN_OP, args)  # schema, fake (meta) kernel and dispatch agree


def test_op_outputs_are_dense_channels_last_buffers() -> None:
    """The ops' outputs are made as NHWC buffers seen through a permutation (Inductor lowers
    empty(memory_format=channels_last) contiguous): the same strides as PyTorch's channels-last
    layout, for odd sizes too, and each element its own memory."""
    like = torch.zeros(1, dtype=torch.float16)
    for shape in [(2, 24, 7, 5), (1, 3, 1, 9), (3, 1, 4, 4)]:
        out = cudnn_conv.empty_channels_last(shape, like)
        expected = torch.empty(shape, memory_format=torch.channels_last)
        assert out.shape == expected.shape and out.stride() == expected.stride()
        assert out.dtype == torch.float16 and out.is_contiguous(memory_format=torch.channels_last)
        assert out.untyped_storage().nbytes() == out.numel() * 2


def test_packages_inline_an_op_only_where_it_runs_kerasrt_kernels(monkeypatch) -> None:
    """While a package is exported (``inlining_kernels``), an op on a device with kerasrt's
    Triton kernels is traced into its CUDA implementation (there: its launches; here, without
    Triton, its PyTorch composition); on any other device, or outside an export, it stays one
    op call."""

    class Pointwise(torch.nn.Module):
        def forward(self, x, w):
            return torch.ops.kerasrt.pointwise_conv(x, w, None, None, "relu", [])

    x = torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 16, 1, 1)

    def calls(inlining: bool) -> set[str]:
        with op_library.inlining_kernels() if inlining else contextlib.nullcontext():
            ep = torch.export.export(Pointwise(), (x, w)).run_decompositions()
        return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}

    assert calls(inlining=True) == {"kerasrt.pointwise_conv.default"}  # the CPU runs no Triton
    monkeypatch.setattr(op_library, "kernels_device", lambda device: True)
    assert calls(inlining=False) == {"kerasrt.pointwise_conv.default"}
    inlined = calls(inlining=True)
    assert "aten.convolution.default" in inlined and not any(c.startswith("kerasrt.") for c in inlined)


def test_the_call_key_names_every_fact_a_plan_depends_on() -> None:
    """The key is memoized on a tuple of the call's facts: equal facts give the same text, and
    a change in any one (layout, dtype, epilogue, attribute) gives another."""
    cl = torch.channels_last

    def key(x_layout=cl, dtype=torch.float32, bias=True, residual=False, act="relu", clip=(), pad=(1, 1)):
        x = torch.empty(2, 8, 6, 6, dtype=dtype).contiguous(memory_format=x_layout)
        w = torch.empty(4, 8, 3, 3, dtype=dtype).contiguous(memory_format=cl)
        out = torch.empty(2, 4, 6, 6, dtype=dtype).contiguous(memory_format=cl)
        ops = cudnn_conv.Operands(
            x,
            w,
            torch.empty(4, dtype=dtype) if bias else None,
            torch.empty_like(out) if residual else None,
            out,
        )
        return cudnn_conv.signature(ops, [1, 1], list(pad), [1, 1], act, list(clip))

    base = key()
    assert key() == base
    cudnn_conv._KEYS.clear()  # the text built afresh is the one the memo returned
    assert key() == base
    variants = [
        key(x_layout=torch.contiguous_format),
        key(dtype=torch.float16),
        key(bias=False),
        key(residual=True),
        key(act="clamp", clip=(0.0, 6.0)),
        key(act="clamp", clip=(0.0, 4.0)),
        key(pad=(0, 0)),
    ]
    assert len({base, *variants}) == len(variants) + 1

    def depthwise_key(stride=(1, 1), padding=(1, 1, 1, 1), bias=True, layout=cl) -> str:
        x = torch.empty(2, 8, 6, 6).contiguous(memory_format=layout)
        b = torch.empty(8) if bias else None
        return depthwise_conv.signature(
            x, torch.empty(8, 1, 3, 3), b, list(stride), list(padding), "relu", []
        )

    base = depthwise_key()
    variants = [
        depthwise_key(stride=(2, 2)),
        depthwise_key(padding=(0, 1, 0, 1)),
        depthwise_key(bias=False),
        depthwise_key(layout=torch.contiguous_format),
    ]
    assert depthwise_key() == base and len({base, *variants}) == len(variants) + 1


def convert_on_own_kernels(model: keras.Model, shape: tuple[int, ...]) -> tuple:
    """Convert ``model`` (FP16, Inductor engines) with every eligible convolution on kerasrt's
    kernels (``conv_kernels="cudnn"``), run it on a random input of ``shape`` and check it
    against Keras: (converter, converted model, input, output)."""
    conv = kerasrt.Converter(
        model, batch_size=shape[0], precision_mode="FP16", compiler="inductor", conv_kernels="cudnn"
    )
    optimized = conv.convert()
    x = random_input(shape)
    (expected,) = keras_reference(model, [x])
    got = optimized(x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-2 * np.abs(expected).max())
    return conv, optimized, x, got


def residual_cnn() -> keras.Model:
    """A ResNet-style block (3x3 conv, and a 1x1 projection that stays a plain conv + bias:
    the residual add fuses into one of the two), a strided conv, a depthwise conv."""
    inp = keras.Input((8, 8, 3), name="image")
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same")(inp)))
    y = L.BatchNormalization()(L.Conv2D(8, 3, padding="same")(x))
    shortcut = L.BatchNormalization()(L.Conv2D(8, 1)(x))
    x = L.ReLU()(L.Add()([shortcut, y]))
    x = L.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    x = L.DepthwiseConv2D(3, padding="same")(x)  # grouped: never a cuDNN fusion candidate
    return randomize(keras.Model(inp, L.Dense(4)(L.GlobalAveragePooling2D()(x))))


@pytest.fixture
def fake_cudnn(monkeypatch, tmp_path):
    """cuDNN "available" on the CPU, with every measurement faked: cuDNN wins by 2x. Returns
    the list of measured signatures."""
    measured: list[str] = []

    def measure(node, ops, prebuilt, sig, mode):
        measured.append(sig)
        return tactics.Choice("cudnn", plan=1, cudnn_ms=0.5, inductor_ms=1.0 if mode == "auto" else None)

    monkeypatch.setenv("KERASRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cudnn_conv, "available", lambda device: True)
    monkeypatch.setattr(tactics, "_measure", measure)
    monkeypatch.setattr(tactics, "_TABLES", {})
    monkeypatch.setattr(cudnn_conv, "_CHOSEN", {})
    monkeypatch.setattr(cudnn_conv, "_PLANS", {})
    monkeypatch.setattr(cudnn_conv, "_SAVED", {})
    return measured


def test_chosen_convolutions_run_on_the_op_and_artifacts_keep_them(
    tmp_path: Path, fake_cudnn, monkeypatch
) -> None:
    model = residual_cnn()
    # "auto" leaves programs that are not CUDA-graph replays (all on a CPU) to Inductor
    auto = kerasrt.Converter(model, batch_size=2, precision_mode="FP16").convert()
    assert not auto.program(auto.engine_shapes[0]).kernel_convs and not fake_cudnn
    conv, optimized, x, got = convert_on_own_kernels(model, (2, 8, 8, 3))

    program = optimized.program(optimized.engine_shapes[0])
    assert len(program.kernel_convs) == 4  # not the depthwise conv
    assert len(fake_cudnn) == 4 and len(set(fake_cudnn)) == 4  # one measurement per shape
    (engine,) = program.compiled_engines.values()
    calls = [n for n in engine.module.graph.nodes if n.target is CUDNN_OP]
    assert len(calls) == 4 and engine.kernel_convs == 4
    # the RGB input reaches cuDNN with a zero 4th channel, padded by the engine
    (stem,) = [c for c in calls if c.args[0].target is torch.ops.aten.constant_pad_nd.default]
    assert stem.args[0].args[1] == [0, 0, 0, 0, 0, 1]
    assert getattr(engine.module, stem.args[1].target).shape[1] == 4
    assert set(cudnn_conv._CHOSEN.values()) == {1}  # the measured plan is the one run
    assert "4 on fused cuDNN kernels, 0 on Inductor's" in conv.summary(print_fn=None)

    # as on a GPU, but cuDNN serializes only the first conv's plan
    sigs = sorted(program.kernel_choices)
    cudnn_conv._PLANS.update({s: cudnn_conv.Plan(SerializingGraph(), {"X": 1}, 0, "h") for s in sigs})
    cudnn_conv._PLANS[sigs[0]] = cudnn_conv.Plan(
        SerializingGraph(b"cubin"), {"X": Uid(1), "Y": Uid(4)}, 0, "h"
    )
    path = conv.save(tmp_path / "art")
    entry = json.loads((path / "manifest.json").read_text())["engines"][0]
    assert entry["compiled"]["kernel_convs"] == program.kernel_convs
    assert {c["kernel"] for c in entry["tactics"]["choices"].values()} == {"cudnn"}
    plans = json.loads((path / entry["compiled"]["cudnn_plans"]).read_text())
    assert plans == {
        "cudnn": cudnn_conv.cudnn_version(),
        "plans": {sigs[0]: {"plan": 1, "uids": {"X": 1, "Y": 4}, "blob": "Y3ViaW4="}},
    }
    cudnn_conv._SAVED.clear()
    kerasrt.load(path).program(optimized.engine_shapes[0])  # the engines take their saved plans
    assert list(cudnn_conv._SAVED) == [sigs[0]] and cudnn_conv._SAVED[sigs[0]]["blob"] == "Y3ViaW4="
    cudnn_conv._SAVED.clear()
    with monkeypatch.context() as m:
        m.setattr(cudnn_conv, "cudnn_version", lambda: "another cuDNN")  # its plans would not load
        kerasrt.load(path).program(optimized.engine_shapes[0])
    assert cudnn_conv._SAVED == {}
    plans_file = path / entry["compiled"]["cudnn_plans"]
    good = plans_file.read_text()
    plans_file.write_text('{"cudnn": "9", "plans": {"sig": {"blob": "x"}}}')
    with pytest.raises(ArtifactError, match=r"cudnn_plans\.json is corrupt"):
        kerasrt.load(path)
    plans_file.write_text(good)

    # a fresh process, without the fake: the packages call the op as they were built to
    fresh = run_packages_in_fresh_process(path, x, tmp_path)
    np.testing.assert_allclose(fresh, got, rtol=0, atol=1e-3 * np.abs(got).max())


def test_tactics_are_measured_once_per_shape_and_cached_by_environment(
    fake_cudnn, monkeypatch, caplog
) -> None:
    graph = kerasrt.Converter(residual_cnn(), batch_size=2, precision_mode="FP16").convert().primary_graph()
    cpu = torch.device("cpu")
    first = tactics.choose(graph.nodes, cpu, "auto")
    assert len(first) == 4 and len(fake_cudnn) == 4
    files = list(cache.cache_dir().glob("tactics-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["environment"] == tactics.environment(cpu)

    monkeypatch.setattr(tactics, "_TABLES", {})  # a new process: the disk cache answers
    again = tactics.choose(graph.nodes, cpu, "auto")
    assert len(fake_cudnn) == 4
    assert [c for _, c in again.values()] == [c for _, c in first.values()]

    assert tactics.choose(graph.nodes, cpu, "inductor") == {}
    assert len(fake_cudnn) == 4

    env = tactics.environment(cpu)
    monkeypatch.setattr(tactics, "environment", lambda device: {**env, "cudnn": "another"})
    tactics.choose(graph.nodes, cpu, "auto")  # another cuDNN: measured again
    assert len(fake_cudnn) == 8

    monkeypatch.setattr(tactics, "_TABLES", {})
    for f in cache.cache_dir().glob("tactics-*.json"):
        f.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="kerasrt.cache"):
        tactics.choose(graph.nodes, cpu, "auto")
    assert "unreadable cache file" in caplog.text and len(fake_cudnn) == 12


def test_triton_candidates_are_precompiled_once_per_untimed_shape(fake_cudnn, monkeypatch) -> None:
    graph = kerasrt.Converter(residual_cnn(), batch_size=2, precision_mode="FP16").convert().primary_graph()
    batches: list[list] = []
    monkeypatch.setattr(
        tactics, "precompile", lambda jobs, device, requests=(): batches.append(list(jobs)) or {}
    )
    cpu = torch.device("cpu")
    convs = [n for n in graph.nodes if tactics.eligible(n)]
    tactics.choose(graph.nodes + convs[:1], cpu, "auto")  # a shape seen twice is compiled once
    assert len(batches) == 1 and len(batches[0]) == len(fake_cudnn) == 4
    candidates, operands = batches[0][0]
    ops = operands()  # the operands of a timing, made only when a job runs
    assert ops.x.shape[0] == 2 and ops.x.is_contiguous(memory_format=torch.channels_last)
    assert candidates(ops) == {}  # no Triton kernel runs on the CPU
    tactics.choose(graph.nodes, cpu, "auto")  # all cached: nothing to compile or time
    assert batches[1] == [] and len(fake_cudnn) == 4


def silu_cnn() -> keras.Model:
    """EfficientNet-style convolutions: two with SiLU (cuDNN compiles their plans at run time),
    one with ReLU."""
    inp = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", activation="silu")(inp)
    x = L.Conv2D(16, 1, activation="silu")(x)
    x = L.Conv2D(8, 1, activation="relu")(x)
    return randomize(keras.Model(inp, L.GlobalAveragePooling2D()(x)))


def test_runtime_compiled_cudnn_plans_are_built_by_workers_and_timed_from_there(
    fake_cudnn, monkeypatch
) -> None:
    graph = kerasrt.Converter(silu_cnn(), batch_size=2, precision_mode="FP16").convert().primary_graph()
    requests: list = []

    def precompile(jobs, device, extra=()):
        requests.extend(extra)  # as if workers built plans 0 and 3 of each and the rest failed
        return {r: f"blob {r.args[1]}" for r in extra if r.args[1] in (0, 3)}

    prebuilt_seen: dict[str, dict] = {}

    def measure(node, ops, prebuilt, sig, mode):
        prebuilt_seen[cudnn_conv.op_arguments(node)[3]] = prebuilt
        return tactics.Choice("cudnn", plan=0, cudnn_ms=0.5, inductor_ms=1.0)

    monkeypatch.setattr(tactics, "precompile", precompile)
    monkeypatch.setattr(tactics, "_measure", measure)
    convs = [n for n in graph.nodes if tactics.eligible(n)]
    assert sorted(cudnn_conv.op_arguments(n)[3] for n in convs) == ["relu", "silu", "silu"]
    tactics.choose(graph.nodes, torch.device("cpu"), "auto")
    assert len(requests) == 2 * tactics.RUNTIME_PLANS  # the two SiLU convolutions only
    assert {r.function for r in requests} == {"kerasrt.backend.cudnn_conv:serialized_plan"}
    assert not any(r.here for r in requests)  # never built here in a worker's stead
    assert all(r.gpu for r in requests)  # a cuDNN handle: only the GPU workers take them
    described = [json.loads(r.args[0]) for r in requests if r.args[1] == 0]
    assert sorted(d["conv"][3] for d in described) == ["silu", "silu"]
    # as the op gets them: the image's 3 channels padded to 4
    assert {tuple(d["operands"]["X"][0]) for d in described} == {(2, 4, 8, 8), (2, 8, 8, 8)}
    assert prebuilt_seen == {"silu": {0: "blob 0", 3: "blob 3"}, "relu": {}}
    for node in convs:  # a worker's operands look to cuDNN exactly like the timing's
        ops = tactics.example_operands(node, torch.device("cpu"))
        d = json.loads(cudnn_conv.plan_description(ops, *cudnn_conv.op_arguments(node)))
        assert cudnn_conv.described_operands(d, torch.device("cpu")).described() == ops.described()


def test_fastest_plan_times_the_plans_workers_built(monkeypatch) -> None:
    class Tensor:
        def __init__(self, uid):
            self.uid = uid

        def get_uid(self):
            return self.uid

    class Graph:  # cuDNN's listing: nothing to build here
        def get_execution_plan_count(self):
            return 0

    uids = {"X": Tensor(1), "W": Tensor(2), "Y": Tensor(6)}
    monkeypatch.setattr(cudnn_conv, "build_graph", lambda *args, **kwargs: (Graph(), uids, "handle"))
    times = {"a": 0.3, "b": 0.1, "c": 0.2}
    loaded = []

    def deserialized_plan(blob, plan_uids, device):
        loaded.append((blob, plan_uids))
        if blob == "broken":
            raise RuntimeError("cannot deserialize")
        return cudnn_conv.Plan(blob, plan_uids, 0, "handle")

    monkeypatch.setattr(cudnn_conv, "deserialized_plan", deserialized_plan)
    monkeypatch.setattr(tactics, "device_ms", lambda run: times[run.func.__self__.graph])
    ops = cudnn_conv.Operands(torch.zeros(1), torch.zeros(1), None, None, torch.zeros(1))
    args = ([1, 1], [0, 0], [1, 1], "silu", [])
    index, ms, plan = tactics.fastest_plan(ops, *args, prebuilt={0: "a", 2: "broken", 5: "b", 7: "c"})
    assert (index, ms, plan.graph, plan.uids) == (5, 0.1, "b", {"X": 1, "W": 2, "Y": 6})
    assert [blob for blob, _ in loaded] == ["a", "broken", "b", "c"]
    assert tactics.fastest_plan(ops, *args, prebuilt={1: "broken"}) is None  # none ran: built here (none)


class SerializingGraph:
    """A built cuDNN graph as far as saving plans goes: ``blob`` None = a plan cuDNN does not
    serialize."""

    def __init__(self, blob: bytes | None = None):
        self.blob = blob

    def serialize(self) -> list[int]:
        if self.blob is None:
            raise RuntimeError("only runtime-compiled plans serialize")
        return list(self.blob)  # as cuDNN's frontend returns it

    def deserialize(self, data: bytes) -> None:
        self.blob = bytes(data)

    def get_workspace_size(self) -> int:
        return 0


class Uid:
    def __init__(self, uid: int):
        self.uid = uid

    def get_uid(self) -> int:
        return self.uid


def test_saved_cudnn_plans_load_instead_of_being_built_again(monkeypatch, caplog) -> None:
    built: list[tuple] = []

    def build_graph(*args, **kwargs):
        built.append(args)
        raise RuntimeError("building needs cuDNN")

    monkeypatch.setattr(
        cudnn_conv, "frontend", lambda: SimpleNamespace(pygraph=lambda handle: SerializingGraph())
    )
    monkeypatch.setattr(cudnn_conv, "_handle", lambda index: "handle")
    monkeypatch.setattr(cudnn_conv, "build_graph", build_graph)
    monkeypatch.setattr(cudnn_conv, "_CHOSEN", {"runtime": 3})
    monkeypatch.setattr(cudnn_conv, "_SAVED", {})
    monkeypatch.setattr(
        cudnn_conv,
        "_PLANS",
        {
            "runtime": cudnn_conv.Plan(SerializingGraph(b"cubin"), {"X": Uid(1), "Y": Uid(5)}, 0, "h"),
            "not serialized": cudnn_conv.Plan(SerializingGraph(), {"X": Uid(1)}, 0, "h"),
            "unfused": None,
            "loaded": cudnn_conv.Plan(SerializingGraph(), {"X": 1}, 0, "h", serialized="bG9hZGVk"),
        },
    )
    saved = cudnn_conv.serialized_plans(["runtime", "not serialized", "unfused", "loaded", "never run"])
    assert saved == {
        "runtime": {"plan": 3, "uids": {"X": 1, "Y": 5}, "blob": "Y3ViaW4="},  # base64 of b"cubin"
        "loaded": {"plan": 0, "uids": {"X": 1}, "blob": "bG9hZGVk"},  # its blob as it came
    }

    # a loading process: the plan of the call's signature deserializes while its index holds
    ops = cudnn_conv.Operands(
        torch.zeros(1, 4, 8, 8).to(memory_format=torch.channels_last),
        torch.zeros(8, 4, 3, 3).to(memory_format=torch.channels_last),
        torch.zeros(8),
        None,
        torch.zeros(1, 8, 8, 8).to(memory_format=torch.channels_last),
    )
    args = ([1, 1], [1, 1], [1, 1], "silu", [])
    key = cudnn_conv.signature(ops, *args)
    monkeypatch.setattr(cudnn_conv, "_PLANS", {})
    cudnn_conv.offer_saved_plans({key: saved["runtime"]})
    cudnn_conv.choose_plan(key, 2)  # another plan chosen since: built, not loaded
    with caplog.at_level(logging.WARNING, logger="kerasrt.backend.cudnn_conv"):
        assert cudnn_conv.plan_for(ops, *args) is None and len(built) == 1
    cudnn_conv.choose_plan(key, 3)
    plan = cudnn_conv.plan_for(ops, *args)
    assert plan is not None and len(built) == 1
    assert (plan.graph.blob, plan.uids, plan.serialized) == (b"cubin", {"X": 1, "Y": 5}, "Y3ViaW4=")
    cudnn_conv.offer_saved_plans({key: {**saved["runtime"], "blob": "damaged"}})
    monkeypatch.setattr(cudnn_conv, "_PLANS", {})
    with caplog.at_level(logging.WARNING, logger="kerasrt.backend.cudnn_conv"):
        assert cudnn_conv.plan_for(ops, *args) is None  # does not load: built instead
    assert len(built) == 2 and "saved cuDNN plan" in caplog.text


def test_a_launch_within_precompiling_compiles_only_and_only_in_its_thread() -> None:
    calls: list[tuple] = []

    class Kernel:  # records what a Triton JIT function would be asked to do
        def warmup(self, *args, grid, **kwargs):
            calls.append(("compile", grid, args, kwargs))

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("launch", grid, args, kwargs))

    kernel = Kernel()
    with op_library.precompiling():
        op_library.launchable(kernel)[(2, 1)](1, 2, BLOCK=16)
        other = threading.Thread(target=lambda: op_library.launchable(kernel)[(3,)](5))
        other.start()
        other.join()
    op_library.launchable(kernel)[(4,)](6)
    assert calls == [
        ("compile", (2, 1), (1, 2), {"BLOCK": 16}),
        ("launch", (3,), (5,), {}),
        ("launch", (4,), (6,), {}),
    ]


def test_which_convolutions_are_candidates() -> None:
    graph = kerasrt.Converter(residual_cnn(), batch_size=1, precision_mode="FP16").convert().primary_graph()
    convs = [n for n in graph.nodes if n.op.startswith("conv")]
    assert sorted(n.op for n in convs) == ["conv", "conv", "conv_fused", "conv_fused", "conv_fused"]
    assert [tactics.eligible(n) for n in convs] == [True] * 4 + [False]  # depthwise: grouped
    inp = keras.Input((6, 6, 3))
    acts = [L.Conv2D(4, 1, activation=a)(inp) for a in ("relu6", "silu", "sigmoid")]
    graph = kerasrt.Converter(keras.Model(inp, acts), precision_mode="FP16").convert().primary_graph()
    convs = [n for n in graph.nodes if n.op.startswith("conv")]
    assert sorted((n.attrs.get("activation"), tactics.eligible(n)) for n in convs) == [
        ("clamp", True),
        ("sigmoid", False),
        ("silu", True),
    ]
    fp32 = kerasrt.Converter(residual_cnn(), batch_size=1).convert().primary_graph()
    assert not any(tactics.eligible(n) for n in fp32.nodes)  # cuDNN fusion is for FP16/BF16


def test_cudnn_kernels_without_cuda_or_a_bad_choice_are_clear_errors() -> None:
    model = residual_cnn()
    with pytest.raises(ConversionError, match="nvidia-cudnn-frontend"):
        kerasrt.Converter(model, precision_mode="FP16", conv_kernels="cudnn", device="cpu").convert()
    with pytest.raises(ConversionError, match="conv_kernels must be one of auto, inductor, cudnn"):
        kerasrt.Converter(model, conv_kernels="tensorrt")


def test_the_faster_kernel_wins_and_cudnn_mode_overrides_a_cached_loss(fake_cudnn, monkeypatch) -> None:
    graph = kerasrt.Converter(residual_cnn(), batch_size=1, precision_mode="FP16").convert().primary_graph()
    node = next(n for n in graph.nodes if tactics.eligible(n))
    ops = tactics.example_operands(node, torch.device("cpu"))
    monkeypatch.setattr(tactics, "_measure", REAL_MEASURE)  # only the timings are faked here
    plan = cudnn_conv.Plan(graph=None, uids={}, workspace=4096, handle=None)
    for cudnn_ms, inductor_ms, mode, kernel in [
        (0.5, 1.0, "auto", "cudnn"),
        (1.5, 1.0, "auto", "inductor"),
        (1.5, None, "cudnn", "cudnn"),
    ]:
        monkeypatch.setattr(tactics, "measure_cudnn", lambda n, o, prebuilt=None, ms=cudnn_ms: (2, ms, plan))
        monkeypatch.setattr(tactics, "inductor_estimate_ms", lambda n, o, ms=inductor_ms: ms)
        choice = tactics._measure(node, ops, sig="sig", mode=mode)
        assert (choice.kernel, choice.plan, choice.cudnn_ms, choice.inductor_ms, choice.workspace_bytes) == (
            kernel,
            2,
            cudnn_ms,
            inductor_ms if mode == "auto" else None,
            4096,
        )
    monkeypatch.setattr(
        tactics, "measure_cudnn", lambda n, o, prebuilt=None: None
    )  # cuDNN has no plan for it
    assert tactics._measure(node, ops, sig="sig", mode="auto").kernel == "inductor"

    # a shape where Inductor won stays on Inductor in "auto" but goes to cuDNN when asked
    monkeypatch.setattr(tactics, "measure_cudnn", lambda n, o, prebuilt=None: (0, 1.5, plan))
    monkeypatch.setattr(tactics, "inductor_estimate_ms", lambda n, o: 1.0)
    auto = tactics.choose([node], torch.device("cpu"), "auto")
    forced = tactics.choose([node], torch.device("cpu"), "cudnn")
    assert [c.kernel for _, c in auto.values()] == ["inductor"]
    assert [c.kernel for _, c in forced.values()] == ["cudnn"]


@pytest.mark.parametrize(
    "stride, padding, activation, clip, k",
    [
        ([1, 1], [1, 1, 1, 1], "clamp", [0.0, 6.0], 3),
        ([2, 2], [0, 1, 0, 1], "clamp", [0.0, 6.0], 3),  # Keras' ZeroPadding2D before a strided conv
        ([2, 2], [1, 2, 1, 2], "silu", [], 5),
        ([1, 1], [2, 2, 2, 2], "none", [], 5),
        ([1, 2], [0, 0, 1, 1], "relu", [], 3),
    ],
)
def test_the_depthwise_op_computes_the_ir_pad_and_depthwise_conv(
    stride, padding, activation, clip, k
) -> None:
    gen = torch.Generator().manual_seed(0)
    c = 6
    x = torch.randn(2, c, 9, 10, generator=gen).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c, 1, k, k, generator=gen), torch.randn(c, generator=gen)
    args = (x, w, b, stride, padding, activation, clip)
    got = torch.ops.kerasrt.depthwise_conv.default(*args)
    top, bottom, left, right = padding
    padded = OPS["pad"].impl(x, pads=[left, right, top, bottom, 0, 0], mode="constant", value=0.0)
    expected = ir_conv_fused(padded, w, b, None, stride, [0, 0], activation, clip, groups=c)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.kerasrt.depthwise_conv.default, args)


def mobile_block() -> keras.Model:
    """MobileNetV2's strided block: 1x1 expand + ReLU6, Keras' asymmetric ZeroPadding2D, a
    strided depthwise conv + BN + ReLU6, a 1x1 projection."""
    inp = keras.Input((8, 8, 4), name="image")
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(12, 1)(inp)))
    x = L.ZeroPadding2D(((0, 1), (0, 1)))(x)
    x = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, strides=2)(x)))
    x = L.DepthwiseConv2D(3, padding="same", activation="silu")(x)
    x = L.Conv2D(8, 1)(x)
    return randomize(keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(x))))


def test_mobile_blocks_run_on_the_triton_kernels(tmp_path: Path, fake_cudnn, monkeypatch) -> None:
    """Depthwise convs fold their padding into the depthwise op; 1x1 convs where the pointwise
    kernel timed faster than cuDNN call the pointwise op; artifacts keep which is which."""
    timed: list[str] = []

    def measure_depthwise(node, ops, padding, mode):
        timed.append(node.outputs[0].name)
        return tactics.Choice("triton", inductor_ms=1.0 if mode == "auto" else None, triton_ms=0.5, config=1)

    def measure(node, ops, prebuilt, sig, mode):  # the pointwise kernel beats cuDNN on 1x1 convs
        fast = 0.4 if pointwise_conv.eligible(node) else None
        return tactics.Choice("cudnn", plan=3, cudnn_ms=0.6, triton_ms=fast, config=2)

    monkeypatch.setattr(depthwise_conv, "available", lambda device: True)
    monkeypatch.setattr(tactics, "measure_depthwise", measure_depthwise)
    monkeypatch.setattr(tactics, "_measure", measure)
    monkeypatch.setattr(triton_configs, "_CHOSEN", {})
    model = mobile_block()
    graph = kerasrt.Converter(model, batch_size=2, precision_mode="FP16").convert().primary_graph()
    depthwise = [n for n in graph.nodes if depthwise_conv.eligible(n)]
    assert len(depthwise) == 2
    strided = next(n for n in depthwise if n.attrs["stride"] == [2, 2])
    assert strided.inputs[0].producer.op == "pad"
    x, padding = depthwise_conv.ir_call(strided, graph.nodes)
    assert x is strided.inputs[0].producer.inputs[0] and padding == [0, 1, 0, 1]

    conv, optimized, x, got = convert_on_own_kernels(model, (2, 8, 8, 4))
    assert len(timed) == 2
    program = optimized.program(optimized.engine_shapes[0])
    (engine,) = program.compiled_engines.values()
    calls = [n for n in engine.module.graph.nodes if n.target is torch.ops.kerasrt.depthwise_conv.default]
    assert sorted(c.args[4] for c in calls) == [[0, 1, 0, 1], [1, 1, 1, 1]]
    pointwise = [n for n in engine.module.graph.nodes if n.target is torch.ops.kerasrt.pointwise_conv.default]
    assert len(pointwise) == 2 and sorted(c.args[4] for c in pointwise) == ["clamp", "none"]
    configs = triton_configs._CHOSEN
    assert {v for k, v in configs.items() if k.startswith("depthwise")} == {1}
    assert {v for k, v in configs.items() if not k.startswith("depthwise")} == {2}
    assert sorted(program.kernel_convs.values()) == ["triton"] * 4
    assert "0 on fused cuDNN kernels, 0 on Inductor's, 4 on kerasrt's Triton kernels" in conv.summary(
        print_fn=None
    )

    path = conv.save(tmp_path / "art")
    entry = json.loads((path / "manifest.json").read_text())["engines"][0]
    assert entry["compiled"]["kernel_convs"] == program.kernel_convs
    fresh = run_packages_in_fresh_process(path, x, tmp_path)
    np.testing.assert_allclose(fresh, got, rtol=0, atol=1e-3 * np.abs(got).max())


@pytest.mark.parametrize(
    "has_bias, has_residual, activation, clip, channels",
    [
        (True, False, "clamp", [0.0, 6.0], 16),
        (True, True, "none", [], 24),
        (False, False, "silu", [], 5),
        (True, True, "relu", [], 40),
    ],
)
def test_the_pointwise_op_computes_the_ir_1x1_conv_fused(
    has_bias, has_residual, activation, clip, channels
) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, 5, 7, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(12, channels, 1, 1, generator=gen)
    bias = torch.randn(12, generator=gen) if has_bias else None
    residual = torch.randn(2, 12, 5, 7, generator=gen) if has_residual else None
    args = (x, w, bias, residual, activation, clip)
    got = torch.ops.kerasrt.pointwise_conv.default(*args)
    assert got.is_contiguous(memory_format=torch.channels_last) and list(got.shape) == [2, 12, 5, 7]
    expected = ir_conv_fused(x, w, bias, residual, [1, 1], [0, 0], activation, clip)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.kerasrt.pointwise_conv.default, args)
    # keyed like the cuDNN graph of the same convolution: one tactic entry names either kernel
    out = pointwise_conv.empty_output(x, w)
    operands = cudnn_conv.Operands(x, w, bias, residual, out)
    assert pointwise_conv.signature(x, w, bias, residual, out, activation, clip) == cudnn_conv.signature(
        operands, [1, 1], [0, 0], [1, 1], activation, clip
    )


def test_which_convolutions_the_pointwise_kernel_takes() -> None:
    inp = keras.Input((6, 6, 8))
    outs = [
        L.Conv2D(4, 1, activation="relu6")(inp),  # yes
        L.Conv2D(4, 1, strides=2)(inp),  # strided: no
        L.Conv2D(4, 3, padding="same")(inp),  # 3x3: no
        L.DepthwiseConv2D(1)(inp),  # grouped: no
        L.Conv2D(4, 1, activation="sigmoid")(inp),  # an activation the kernel has not: no
    ]
    model = keras.Model(inp, outs)
    graph = kerasrt.Converter(model, precision_mode="FP16").convert().primary_graph()
    found = sorted(
        (n.inputs[1].shape[2], n.attrs["stride"][0], n.attrs.get("groups", 1), pointwise_conv.eligible(n))
        for n in graph.nodes
        if n.op.startswith("conv")
    )
    assert found == [(1, 1, 1, False), (1, 1, 1, True), (1, 1, 8, False), (1, 2, 1, False), (3, 1, 1, False)]
    fp32 = kerasrt.Converter(model).convert().primary_graph()
    assert not any(pointwise_conv.eligible(n) for n in fp32.nodes)


def one_conv(conv: keras.layers.Layer, input_shape: tuple[int, ...]) -> tuple:
    """The FP16 IR node of a model that is ``conv`` alone, its example operands on the CPU, and
    a stand-in for a built cuDNN plan: what a tactic measurement takes and returns."""
    inp = keras.Input(input_shape)
    graph = kerasrt.Converter(keras.Model(inp, conv(inp)), precision_mode="FP16").convert().primary_graph()
    (node,) = [n for n in graph.nodes if n.op.startswith("conv")]
    plan = cudnn_conv.Plan(graph=None, uids={}, workspace=0, handle=None)
    return node, tactics.example_operands(node, torch.device("cpu")), plan


def test_the_fastest_of_three_kernels_wins(fake_cudnn, monkeypatch) -> None:
    node, ops, plan = one_conv(L.Conv2D(16, 1, activation="relu6"), (6, 6, 8))
    monkeypatch.setattr(pointwise_conv, "available", lambda device: True)
    monkeypatch.setattr(tactics, "_measure", REAL_MEASURE)  # only the timings are faked here
    for cudnn_ms, triton_ms, inductor_ms, kernel in [
        (0.5, 0.3, 1.0, "triton"),
        (0.5, 0.7, 1.0, "cudnn"),
        (0.5, 0.7, 0.4, "inductor"),
        (None, 0.7, 0.4, "inductor"),
    ]:
        found = None if cudnn_ms is None else (3, cudnn_ms, plan)
        monkeypatch.setattr(tactics, "measure_cudnn", lambda n, o, prebuilt=None, f=found: f)
        monkeypatch.setattr(tactics, "best_config", lambda configs, run, what, ms=triton_ms: (5, ms))
        monkeypatch.setattr(tactics, "inductor_estimate_ms", lambda n, o, ms=inductor_ms: ms)
        choice = tactics._measure(node, ops, sig="sig", mode="auto")
        assert (choice.kernel, choice.cudnn_ms, choice.triton_ms, choice.config) == (
            kernel,
            cudnn_ms,
            triton_ms,
            5,
        )
        # "cudnn" (kerasrt's kernels wherever they run): the faster of its own two
        own = choice.own_kernel().kernel
        assert own == ("triton" if cudnn_ms is None or triton_ms < cudnn_ms else "cudnn")


def test_without_cudnn_graphs_1x1_convolutions_still_get_the_pointwise_kernel(monkeypatch, tmp_path) -> None:
    inp = keras.Input((6, 6, 8))
    x = L.Conv2D(8, 3, padding="same", activation="relu")(inp)
    model = keras.Model(inp, L.Conv2D(16, 1, activation="relu6")(x))
    nodes = kerasrt.Converter(model, precision_mode="FP16").convert().primary_graph().nodes
    monkeypatch.setenv("KERASRT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tactics, "_TABLES", {})
    monkeypatch.setattr(triton_configs, "_CHOSEN", {})
    monkeypatch.setattr(cudnn_conv, "available", lambda device: False)
    monkeypatch.setattr(pointwise_conv, "available", lambda device: True)
    monkeypatch.setattr(
        tactics, "measure_cudnn", lambda n, o, prebuilt=None: pytest.fail("cuDNN timed without cuDNN")
    )
    monkeypatch.setattr(tactics, "best_config", lambda configs, run, what: (4, 0.2))
    monkeypatch.setattr(tactics, "inductor_estimate_ms", lambda n, o: 0.5)
    chosen = tactics.choose(nodes, torch.device("cpu"), "auto")
    ((sig, choice),) = chosen.values()  # the 3x3 conv is left to Inductor
    assert (choice.kernel, choice.config, choice.cudnn_ms) == ("triton", 4, None)
    assert triton_configs._CHOSEN == {sig: 4}


def test_artifacts_from_before_the_pointwise_kernel_still_name_their_kernels() -> None:
    assert _kernel_convs({"cudnn_convs": ["a", "b"]}) == {"a": "cudnn", "b": "cudnn"}
    assert _kernel_convs({"kernel_convs": ["a"]}) == {"a": "cudnn"}
    assert _kernel_convs({"kernel_convs": {"a": "triton"}}) == {"a": "triton"}
    assert _kernel_convs({}) == {}


@pytest.mark.parametrize(
    "has_bias, activation, clip, stride, padding, channels, window",
    [
        (True, "relu", [], [2, 2], [3, 3], 4, 7),  # ResNet's stem on a zero-padded RGB image
        (True, "clamp", [0.0, 6.0], [2, 2], [0, 0], 4, 3),  # MobileNetV2's, after Keras' pad
        (False, "silu", [], [1, 2], [1, 0], 8, 3),
        (True, "none", [], [1, 1], [2, 2], 3, 5),
    ],
)
def test_the_stem_op_computes_the_ir_conv_fused(
    has_bias, activation, clip, stride, padding, channels, window
) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, 11, 9, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, channels, window, window, generator=gen)
    bias = torch.randn(16, generator=gen) if has_bias else None
    args = (x, w, bias, stride, padding, activation, clip)
    got = torch.ops.kerasrt.stem_conv.default(*args)
    out_shape = cudnn_conv.output_shape(x.shape, w.shape, stride, padding, [1, 1])
    assert got.is_contiguous(memory_format=torch.channels_last) and list(got.shape) == out_shape
    expected = ir_conv_fused(x, w, bias, None, stride, padding, activation, clip)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.kerasrt.stem_conv.default, args)
    # keyed like the cuDNN graph of the same convolution: one tactic entry names either kernel
    operands = cudnn_conv.Operands(x, w, bias, None, got)
    assert stem_conv.signature(x, w, bias, got, stride, padding, activation, clip) == cudnn_conv.signature(
        operands, stride, padding, [1, 1], activation, clip
    )


def stem_cnn() -> keras.Model:
    """ResNet's stem (zero pad, 7x7/2 conv over RGB, BN, ReLU), a 3x3 conv over 32 channels
    (too many for the stem kernel) and MobileNet's stem (3x3/2, 'same', ReLU6) beside it."""
    inp = keras.Input((16, 16, 3), name="image")
    x = L.ZeroPadding2D(3)(inp)
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(32, 7, strides=2)(x)))
    x = L.Conv2D(8, 3, padding="same", activation="relu")(x)
    y = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inp)))
    x = L.Concatenate()([L.GlobalAveragePooling2D()(x), L.GlobalAveragePooling2D()(y)])
    return randomize(keras.Model(inp, L.Dense(3)(x)))


def test_which_convolutions_the_stem_kernel_takes() -> None:
    graph = kerasrt.Converter(stem_cnn(), precision_mode="FP16").convert().primary_graph()
    found = sorted(
        (n.inputs[1].shape[1], n.inputs[1].shape[2], stem_conv.eligible(n))
        for n in graph.nodes
        if n.op.startswith("conv")
    )
    assert found == [(3, 3, True), (3, 7, True), (32, 3, False)]
    inp = keras.Input((6, 6, 4))
    others = [L.Conv2D(4, 1)(inp), L.DepthwiseConv2D(3)(inp), L.Conv2D(4, 3, dilation_rate=2)(inp)]
    graph = kerasrt.Converter(keras.Model(inp, others), precision_mode="FP16").convert().primary_graph()
    assert not any(stem_conv.eligible(n) for n in graph.nodes)  # 1x1, grouped, dilated
    fp32 = kerasrt.Converter(stem_cnn()).convert().primary_graph()
    assert not any(stem_conv.eligible(n) for n in fp32.nodes)


def test_image_stems_run_on_the_stem_kernel_where_it_timed_faster(
    tmp_path: Path, fake_cudnn, monkeypatch
) -> None:
    def measure(node, ops, prebuilt, sig, mode):  # the stem kernel beats cuDNN on stems
        fast = 0.3 if stem_conv.eligible(node) else None
        return tactics.Choice("cudnn", plan=2, cudnn_ms=0.6, triton_ms=fast, config=3)

    monkeypatch.setattr(tactics, "_measure", measure)
    monkeypatch.setattr(triton_configs, "_CHOSEN", {})
    model = stem_cnn()
    conv, optimized, x, got = convert_on_own_kernels(model, (2, 16, 16, 3))
    program = optimized.program(optimized.engine_shapes[0])
    (engine,) = program.compiled_engines.values()
    stems = [n for n in engine.module.graph.nodes if n.target is torch.ops.kerasrt.stem_conv.default]
    assert sorted((c.args[3], c.args[4], c.args[5]) for c in stems) == [
        ([2, 2], [0, 0], "clamp"),  # 'same' at stride 2 pads asymmetrically, before the conv
        ([2, 2], [3, 3], "relu"),  # the zero padding folded into the conv
    ]
    assert all(getattr(engine.module, c.args[1].target).shape[1] == 4 for c in stems)  # RGB + a zero
    # both stems read the image with the zero 4th channel cuDNN takes, padded by the engine
    assert all(c.args[0].target is torch.ops.aten.constant_pad_nd.default for c in stems)
    assert all(c.args[0].args[1] == [0, 0, 0, 0, 0, 1] for c in stems)
    assert [n.target for n in engine.module.graph.nodes].count(CUDNN_OP) == 1  # the 32-channel 3x3
    assert set(triton_configs._CHOSEN.values()) == {3}

    path = conv.save(tmp_path / "art")
    fresh = run_packages_in_fresh_process(path, x, tmp_path)
    np.testing.assert_allclose(fresh, got, rtol=0, atol=1e-3 * np.abs(got).max())


@pytest.mark.parametrize("user_choice", [None, "/somewhere/of/their/own"])
def test_triton_kernels_share_one_cache_folder_across_processes(
    tmp_path: Path, user_choice: str | None
) -> None:
    # Inductor points Triton's cache into its own folder once it compiles; a loading process
    # that never runs Inductor then recompiled every kernel the converting process had cached
    env = {k: v for k, v in os.environ.items() if k != "TRITON_CACHE_DIR"}
    env["KERASRT_CACHE_DIR"] = str(tmp_path)
    if user_choice:
        env["TRITON_CACHE_DIR"] = user_choice
    script = "import os, kerasrt.backend.torch_backend; print(os.environ['TRITON_CACHE_DIR'])"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == (user_choice or str(tmp_path / "triton"))


@pytest.mark.parametrize(
    "has_bias, has_residual, activation, clip, stride, padding, window, channels",
    [
        (True, False, "relu", [], [1, 1], [1, 1], 3, 32),  # a ResNet 3x3 layer
        (True, True, "relu", [], [2, 2], [0, 0], 1, 16),  # a strided projection with the residual
        (False, False, "clamp", [0.0, 6.0], [2, 1], [2, 1], 5, 16),
        (True, True, "silu", [], [1, 1], [0, 0], 1, 48),
    ],
)
def test_the_splitk_op_computes_the_ir_conv_fused(
    has_bias, has_residual, activation, clip, stride, padding, window, channels
) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, 9, 7, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(24, channels, window, window, generator=gen)
    bias = torch.randn(24, generator=gen) if has_bias else None
    out_shape = cudnn_conv.output_shape(x.shape, w.shape, stride, padding, [1, 1])
    residual = torch.randn(out_shape, generator=gen) if has_residual else None
    args = (x, w, bias, residual, stride, padding, activation, clip)
    got = torch.ops.kerasrt.splitk_conv.default(*args)
    assert got.is_contiguous(memory_format=torch.channels_last) and list(got.shape) == out_shape
    expected = ir_conv_fused(x, w, bias, residual, stride, padding, activation, clip)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.kerasrt.splitk_conv.default, args)
    # keyed like the cuDNN graph of the same convolution: one tactic entry names either kernel
    operands = cudnn_conv.Operands(x, w, bias, residual, got)
    assert splitk_conv.signature(x, w, bias, residual, got, stride, padding, activation, clip) == (
        cudnn_conv.signature(operands, stride, padding, [1, 1], activation, clip)
    )


def test_which_convolutions_the_splitk_kernel_takes() -> None:
    inp = keras.Input((8, 8, 16))
    layers = [
        L.Conv2D(8, 3, padding="same")(inp),  # 16 input channels: yes
        L.Conv2D(8, 1, strides=2)(inp),  # yes
        L.Conv2D(16, 3, padding="same")(L.Conv2D(12, 1)(inp)),  # the 1x1 yes; the 3x3 over 12: no
        L.Conv2D(8, 3, dilation_rate=2)(inp),  # dilated: no
        L.DepthwiseConv2D(3)(inp),  # grouped: no
    ]
    model = keras.Model(inp, layers)
    found = sorted(
        (n.inputs[1].shape[1], n.inputs[1].shape[2], n.attrs["dilation"][0], splitk_conv.eligible(n))
        for n in kerasrt.Converter(model, precision_mode="FP16").convert().primary_graph().nodes
        if n.op.startswith("conv") and n.attrs.get("groups", 1) == 1
    )
    assert found == [
        (12, 3, 1, False),
        (16, 1, 1, True),
        (16, 1, 1, True),
        (16, 3, 1, True),
        (16, 3, 2, False),
    ]
    fp32 = kerasrt.Converter(model).convert().primary_graph()  # the kernel is FP16/BF16 only
    assert not any(splitk_conv.eligible(n) for n in fp32.nodes)


def test_splits_shrink_to_the_workspace_and_tile_budget() -> None:
    per_tile = 32 * 64
    assert splitk_conv.split_for(8, 16, per_tile) == 8  # ResNet50's last 3x3 at batch 1: 16 tiles
    budget_tiles = splitk_conv.MAX_WORKSPACE_BYTES // (4 * per_tile)
    assert splitk_conv.split_for(8, budget_tiles // 8, per_tile) == 8
    assert splitk_conv.split_for(8, budget_tiles // 8 + 1, per_tile) == 4  # halved to fit
    assert splitk_conv.split_for(8, budget_tiles, per_tile) == 1
    assert splitk_conv.split_for(8, splitk_conv.MAX_SPLIT_TILES + 1, 16) == 1  # more tiles than counters
    config = (32, 64, 64, 8, 4, 3)
    assert splitk_conv.splits_as_configured(config, (1, 512, 7, 7))
    assert not splitk_conv.splits_as_configured(config, (128, 64, 56, 56))  # batch 128: no split


def test_the_splitk_kernel_wins_where_it_is_fastest(fake_cudnn, monkeypatch) -> None:
    node, ops, plan = one_conv(L.Conv2D(32, 3, activation="relu"), (7, 7, 32))
    monkeypatch.setattr(splitk_conv, "available", lambda device: True)
    monkeypatch.setattr(tactics, "_measure", REAL_MEASURE)  # only the timings are faked here
    monkeypatch.setattr(tactics, "measure_cudnn", lambda n, o, prebuilt=None: (3, 0.5, plan))
    monkeypatch.setattr(tactics, "inductor_estimate_ms", lambda n, o: 1.0)
    for splitk_ms, kernel in [(0.3, "splitk"), (0.6, "cudnn")]:
        monkeypatch.setattr(tactics, "best_config", lambda configs, run, what, ms=splitk_ms: (2, ms))
        choice = tactics._measure(node, ops, sig="sig", mode="auto")
        assert (choice.kernel, choice.splitk_ms, choice.splitk_config, choice.triton_ms) == (
            kernel,
            splitk_ms,
            2,
            None,  # a 3x3 over 32 channels has neither the pointwise nor the stem kernel
        )
        assert choice.own_kernel().kernel == kernel


def splitk_cnn() -> keras.Model:
    """A ResNet-style tail: a 3x3 conv over 16 channels, a strided 1x1 projection added to a
    1x1 conv's output, and a 3x3 conv over 3 channels that the split-K kernel cannot take."""
    inp = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(16, 3, padding="same", activation="relu")(inp)
    y = L.Conv2D(32, 3, padding="same", activation="relu")(x)
    y = L.BatchNormalization()(L.Conv2D(32, 1, strides=2)(y))
    shortcut = L.BatchNormalization()(L.Conv2D(32, 1, strides=2)(x))
    x = L.ReLU()(L.Add()([shortcut, y]))
    return randomize(keras.Model(inp, L.Dense(4)(L.GlobalAveragePooling2D()(x))))


def test_convolutions_run_on_the_splitk_kernel_where_it_timed_faster(
    tmp_path: Path, fake_cudnn, monkeypatch
) -> None:
    def measure(node, ops, prebuilt, sig, mode):  # split-K beats cuDNN wherever it runs
        fast = 0.2 if splitk_conv.eligible(node) else None
        return tactics.Choice("cudnn", plan=2, cudnn_ms=0.6, splitk_ms=fast, splitk_config=1)

    monkeypatch.setattr(tactics, "_measure", measure)
    monkeypatch.setattr(triton_configs, "_CHOSEN", {})
    conv, optimized, x, got = convert_on_own_kernels(splitk_cnn(), (2, 8, 8, 3))
    program = optimized.program(optimized.engine_shapes[0])
    (engine,) = program.compiled_engines.values()
    calls = [n for n in engine.module.graph.nodes if n.target is torch.ops.kerasrt.splitk_conv.default]
    # the 3x3 over 16 channels, the strided 1x1 and the projection that took the residual add
    assert sorted((c.args[4], c.args[5], c.args[3] is not None) for c in calls) == [
        ([1, 1], [1, 1], False),
        ([2, 2], [0, 0], False),
        ([2, 2], [0, 0], True),
    ]
    assert [n.target for n in engine.module.graph.nodes].count(CUDNN_OP) == 1  # the RGB 3x3
    assert set(triton_configs._CHOSEN.values()) == {1}
    assert sorted(program.kernel_convs.values()) == ["cudnn", "splitk", "splitk", "splitk"]
    assert "3 on its split-K kernel" in conv.summary(print_fn=None)

    path = conv.save(tmp_path / "art")
    fresh = run_packages_in_fresh_process(path, x, tmp_path)
    np.testing.assert_allclose(fresh, got, rtol=0, atol=1e-3 * np.abs(got).max())


def test_inductor_engines_compile_in_process() -> None:
    from torch._inductor import config

    g = Graph()
    x = g.add_input("x", (2, 3), "float32")
    g.outputs = [g.add_node("relu", [x]).outputs[0]]
    engine = TorchEngine(g.nodes, g.inputs, g.outputs, torch.device("cpu"), compiler="inductor")
    compiled, threads = engine._run, []

    def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        threads.append(config.compile_threads)  # what Inductor sees while it compiles
        return compiled(*tensors)

    engine._run = run
    for _ in range(2):
        (y,) = engine(torch.tensor([[-1.0, 2.0, 0.5], [3.0, -4.0, 0.0]]))
        torch.testing.assert_close(y, torch.tensor([[0.0, 2.0, 0.5], [3.0, 0.0, 0.0]]))
    # the compiling first call without a pool of worker processes; later calls as configured
    assert threads == [1, config.compile_threads]


def test_inductor_meets_kerasrt_ops_registered(fake_cudnn, monkeypatch) -> None:
    """Inductor's own registration of an op it meets unregistered prints the call's arguments
    (the IR upstream of them): minutes on a deep model. Engines register kerasrt's ops first."""
    from torch._inductor import graph as inductor_graph
    from torch._inductor import lowering

    ops = [getattr(torch.ops.kerasrt, name).default for name in op_library.NAMES]
    for op in ops:  # as in a fresh process (earlier tests compiled engines with these ops)
        monkeypatch.delitem(lowering.lowerings, op, raising=False)
    implicit: list[object] = []

    def make_fallback(op, *args, **kwargs):
        implicit.append(op)
        return lowering.make_fallback(op, *args, **kwargs)

    monkeypatch.setattr(inductor_graph, "make_fallback", make_fallback)
    convert_on_own_kernels(residual_cnn(), (2, 8, 8, 3))  # an engine calling kerasrt::cudnn_conv
    assert CUDNN_OP not in implicit and not set(ops) & set(implicit)
    assert all(op in lowering.lowerings for op in ops)
