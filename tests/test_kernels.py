"""Kernel families and tactics on the CPU: the registry, each family's op against the IR op it
implements, kernel choices recorded in the graph, emitted by engines, cached, and carried by
artifacts. The kernels' GPU numerics are checked by ``tests/gpu`` on a CUDA machine."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import keras
import numpy as np
import pytest
import torch

import kerasrt
from kerasrt import cache
from kerasrt.backend.torch_backend import TorchEngine, kernel_family
from kerasrt.cli import main
from kerasrt.errors import ArtifactError, ConversionError
from kerasrt.ir.graph import Graph, verify
from kerasrt.ir.ops import KERNEL, OPS
from kerasrt.kernels import conv_spec, cudnn_conv, op_library, registry, splitk_conv
from kerasrt.kernels.registry import View
from kerasrt.tuning import tactics
from kerasrt.tuning.choices import INDUCTOR, Choice, node_key
from kerasrt_testing import keras_reference, random_input
from kernel_testing import (
    FAST_KERNELS,
    SAMPLES,
    GraphValues,
    TableTuner,
    ir_result,
    own_kernels_converter,
    sample_graph,
)

L = keras.layers
FAMILIES = [f.name for f in registry.families()]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERASRT_CACHE_DIR", str(tmp_path / "cache"))


def test_the_registry_finds_every_family_and_each_op_takes_its_config_last() -> None:
    assert FAMILIES == [
        "cublas_conv",
        "cudnn_conv",
        "depthwise_conv",
        "dual_conv",
        "linear_gemm",
        "pointwise_conv",
        "pointwise_pair",
        "quantized_gemm",
        "splitk_conv",
        "stem_conv",
    ]
    for family in registry.families():
        schema = family.op._schema
        assert schema.name == f"kerasrt::{family.name}" and str(schema.arguments[-1].type) == "int"
        assert all(KERNEL in OPS[op].attrs for op in family.ops)  # the IR op may record a choice
        assert registry.family(family.name) is family
    with pytest.raises(KeyError, match="no kernel family 'tensorrt'"):
        registry.family("tensorrt")


PRECISIONS = sorted({f.precisions[0] for f in registry.families()})
"""The first precision of each family (FP16; INT8 for quantized operands): the GPU tests
cover the others."""


def family_cases() -> list[tuple[str, tuple[str, str], int]]:
    """(family, (sample, precision), node index) of every node of the samples, at each
    precision a family runs (kernels chosen and merged by ``FAST_KERNELS``), that it runs."""
    cases = []
    for sample in SAMPLES:
        for precision in PRECISIONS:
            graph, _ = sample_graph(sample, precision=precision)
            view = View(graph.nodes, graph.outputs)
            for index, node in enumerate(graph.nodes):
                for family in registry.families():
                    if (
                        precision in family.precisions
                        and node.op in family.ops
                        and family.eligible(node, view)
                    ):
                        cases.append((family.name, (sample, precision), index))
    return cases


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> list[tuple[str, str, int]]:
    with pytest.MonkeyPatch.context() as m:
        m.setenv("KERASRT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return family_cases()


def test_every_family_has_sample_nodes(cases) -> None:
    """A new family gets a node in the samples, so the next test checks its op."""
    assert {family for family, _, _ in cases} == set(FAMILIES)


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_computes_the_ir_op_it_implements(name: str, cases) -> None:
    """On every sample node it runs and with every config, the family's op (its reference
    math here) on the arguments the engine emits equals the IR op on the node's inputs."""
    family = registry.family(name)
    mine = [(s, i) for f, s, i in cases if f == name]
    graphs = {s: sample_graph(s[0], precision=s[1])[0] for s in {s for s, _ in mine}}
    for sample, index in mine:
        graph = graphs[sample]
        node = graph.nodes[index]
        view = View(graph.nodes, graph.outputs)
        for config in range(max(len(family.configs), 1)):
            values = GraphValues(graph)  # fresh: the pair writes over its input
            expected = ir_result(node, values)
            args = family.arguments(node, values, view)
            got = family.results(family.call(args, config), args)
            assert len(got) == len(expected) == len(node.outputs)
            for g, e in zip(got, expected):
                assert g.shape == e.shape and g.dtype == e.dtype
                layout = torch.channels_last if g.dim() == 4 else torch.contiguous_format
                assert g.is_contiguous(memory_format=layout)
                torch.testing.assert_close(g, e, rtol=0, atol=2e-2 * float(e.abs().max()) + 1e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_each_op_s_schema_fake_kernel_and_dispatch_agree(name: str, cases) -> None:
    family = registry.family(name)
    (sample, precision), index = next((s, i) for f, s, i in cases if f == name)
    graph = sample_graph(sample, precision=precision)[0]
    args = family.arguments(graph.nodes[index], GraphValues(graph), View(graph.nodes, graph.outputs))
    torch.library.opcheck(family.op, (*args, 0), test_utils=("test_schema", "test_faketensor"))


def test_op_outputs_are_dense_channels_last_buffers() -> None:
    """Outputs are made as NHWC buffers seen through a permutation (Inductor lowers
    empty(memory_format=channels_last) contiguous): PyTorch's channels-last strides, for odd
    sizes too, and each element its own memory."""
    like = torch.zeros(1, dtype=torch.float16)
    for shape in [(2, 24, 7, 5), (1, 3, 1, 9), (3, 1, 4, 4)]:
        out = conv_spec.empty_channels_last(shape, like)
        expected = torch.empty(shape, memory_format=torch.channels_last)
        assert out.shape == expected.shape and out.stride() == expected.stride()
        assert out.untyped_storage().nbytes() == out.numel() * 2


def test_packages_inline_an_op_only_where_it_runs_kerasrt_kernels(monkeypatch) -> None:
    """While a package is exported (``inlining_kernels``), an op on a device with kerasrt's
    Triton kernels is traced into its CUDA implementation (here, without Triton, its PyTorch
    composition); on any other device, or outside an export, it stays one op call."""

    class Pointwise(torch.nn.Module):
        def forward(self, x, w):
            return torch.ops.kerasrt.pointwise_conv(x, w, None, None, "relu", [], 2)

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


def test_the_cudnn_call_key_names_every_fact_a_plan_depends_on() -> None:
    cl = torch.channels_last

    def key(x_layout=cl, dtype=torch.float32, bias=True, residual=False, act="relu", clip=(), pad=(1, 1)):
        x = torch.empty(2, 8, 6, 6, dtype=dtype).contiguous(memory_format=x_layout)
        w = torch.empty(4, 8, 3, 3, dtype=dtype).contiguous(memory_format=cl)
        r = torch.empty(2, 4, 6, 6, dtype=dtype).contiguous(memory_format=cl) if residual else None
        b = torch.empty(4, dtype=dtype) if bias else None
        return cudnn_conv.call_key_of((x, w, b, r, [1, 1], list(pad), [1, 1], act, list(clip)))

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


def test_splits_shrink_to_the_workspace_and_tile_budget() -> None:
    assert splitk_conv.split_for(8, 16, 64 * 64) == 8
    assert splitk_conv.split_for(8, splitk_conv.MAX_SPLIT_TILES + 1, 64 * 64) == 1
    tiles = splitk_conv.MAX_WORKSPACE_BYTES // (64 * 64 * 4 * 4)
    assert splitk_conv.split_for(8, tiles, 64 * 64) == 4


# -- choices in the graph ----------------------------------------------------------------------


def engine_calls(optimized) -> list[tuple[object, int]]:
    """(op, config) of every kerasrt op call in the model's engine programs."""
    program = optimized.program(optimized.engine_shapes[0])
    found = []
    for engine in program.compiled_engines.values() or [s[0] for s in program.steps]:
        for n in engine.module.graph.nodes:
            if n.op == "call_function" and str(n.target).startswith("kerasrt."):
                found.append((n.target, n.args[-1]))
    return found


def test_chosen_kernels_are_recorded_in_the_graph_emitted_by_the_engine_and_match_keras() -> None:
    tuner = TableTuner(FAST_KERNELS)
    model, shape = SAMPLES["mobile_net"][0](), SAMPLES["mobile_net"][1]
    conv = kerasrt.Converter(model, batch_size=2, precision_mode="FP16", conv_kernels="cudnn", tuner=tuner)
    optimized = conv.convert()
    x = random_input(shape)
    (expected,) = keras_reference(model, [x])
    got = optimized(x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-2 * np.abs(expected).max())

    graph = optimized.primary_graph()
    verify(graph)
    chosen = {n.layer: Choice.of(n) for n in graph.nodes if KERNEL in n.attrs}
    # each convolution on the fastest family that runs it ("cudnn": never Inductor)
    assert {layer: c.kernel for layer, c in chosen.items()} == {
        "stem": "stem_conv",
        "expand": "pointwise_conv",
        "depthwise": "depthwise_conv",
        "project": "pointwise_pair",  # chained into the SiLU 1x1 after it
        "head": "cudnn_conv",
        "classifier": "linear_gemm",  # a Dense layer, timed against Inductor too
    }
    assert chosen["classifier"].timings == {"inductor": (0, 1.5), "linear_gemm": (7, 0.9)}
    assert chosen["head"].timings == {"cudnn_conv": (0, 1.0), "splitk_conv": (3, 2.0)}
    assert graph.meta["kernels"]["environment"] == tuner.environment()
    # the engine calls each family's op with the recorded config, and nothing else of kerasrt's
    expected_calls = sorted((str(registry.family(c.kernel).op), c.config) for c in chosen.values())
    assert sorted((str(op), config) for op, config in engine_calls(optimized)) == expected_calls
    assert "kernels chosen by timing (tactics): 1 on cudnn_conv, 1 on depthwise_conv" in conv.summary(
        print_fn=None
    )


def test_in_auto_mode_the_fastest_candidate_wins_and_cudnn_mode_never_takes_inductor() -> None:
    graph, _ = sample_graph("mobile_net", TableTuner({}))  # no kernel ran: Inductor's everywhere
    assert {Choice.of(n).kernel for n in graph.nodes if KERNEL in n.attrs} == {INDUCTOR}
    view = View(graph.nodes, graph.outputs)
    for mode, ms, winner in [
        ("auto", {"cudnn_conv": 1.0, "splitk_conv": 0.9, "inductor": 0.5}, INDUCTOR),
        ("auto", {"cudnn_conv": 1.0, "splitk_conv": 0.9, "inductor": 1.5}, "splitk_conv"),
        ("cudnn", {"cudnn_conv": 1.0, "splitk_conv": 1.2, "inductor": 0.1}, "cudnn_conv"),
    ]:
        tactics.strip(graph.nodes)
        tuner = TableTuner(ms, tag=f"{mode}{ms}")
        convs = [n for n in graph.nodes if n.op.startswith("conv")]
        tactics.choose(convs, view, mode, tuner, tuner.timing_cache())
        last = convs[-1]
        assert Choice.of(last).kernel == winner
        assert (INDUCTOR in tuner.measured) == (mode == "auto")


def test_timings_are_cached_per_environment_and_only_missing_candidates_are_timed(caplog) -> None:
    graph, _ = sample_graph("resnet_stages", TableTuner({}))
    view = View(graph.nodes, graph.outputs)
    convs = [n for n in graph.nodes if n.op.startswith("conv")]
    keys = {node_key(n, view) for n in convs}

    def choose(mode: str, tag: str = "one") -> list[str]:
        tactics.strip(graph.nodes)
        tuner = TableTuner(FAST_KERNELS, tag)
        timings = tuner.timing_cache()  # read from the disk: a new build
        tactics.choose(convs, view, mode, tuner, timings)
        timings.persist()
        return tuner.measured

    first = choose("cudnn")
    distinct = {node_key(n, view): n for n in convs}.values()  # one timing per shape
    assert INDUCTOR not in first and len(first) == sum(
        len(TableTuner({}).candidates(n, view)) for n in distinct
    )
    stored = cache.cache_dir() / TableTuner({}, "one").timing_cache().name
    assert set(json.loads(stored.read_text())["timings"]) == keys
    assert choose("cudnn") == []  # all cached
    assert choose("auto") == [INDUCTOR] * len(keys)  # only the candidate not timed yet
    elsewhere = choose("auto", tag="another GPU")  # another environment: everything again
    assert sorted(elsewhere) == sorted(first + [INDUCTOR] * len(keys))
    for f in cache.cache_dir().glob("tactics-*.json"):
        f.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="kerasrt.cache"):
        assert len(choose("cudnn")) == len(first)
    assert "unreadable cache file" in caplog.text


def test_conv_kernels_cudnn_without_cuda_is_a_clear_error() -> None:
    model = SAMPLES["resnet_stages"][0]()
    with pytest.raises(ConversionError, match="nvidia-cudnn-frontend"):
        kerasrt.Converter(model, precision_mode="FP16", conv_kernels="cudnn", device="cpu").convert()
    with pytest.raises(ConversionError, match="conv_kernels must be one of auto, inductor, cudnn"):
        kerasrt.Converter(model, conv_kernels="tensorrt")


def test_artifacts_carry_the_choices_and_a_load_times_nothing(tmp_path: Path, capsys) -> None:
    model, shape = SAMPLES["resnet_stages"][0](), SAMPLES["resnet_stages"][1]
    conv = kerasrt.Converter(
        model, batch_size=2, precision_mode="FP16", conv_kernels="cudnn", tuner=TableTuner(FAST_KERNELS)
    )
    optimized = conv.convert()
    x = random_input(shape)
    got = optimized(x)
    path = conv.save(tmp_path / "art")
    stored = json.loads((path / "manifest.json").read_text())["engines"][0]["graph"]
    assert {n["op"] for n in stored["nodes"]} >= {"dual_conv", "conv_pair"}
    kernels = sorted(n["attrs"][KERNEL]["kernel"] for n in stored["nodes"] if KERNEL in n["attrs"])
    assert kernels == sorted(
        Choice.of(n).kernel for n in optimized.primary_graph().nodes if KERNEL in n.attrs
    )

    same = TableTuner({}, tag="table")  # the environment the choices were made in
    loaded = kerasrt.load(path, tuner=same)
    np.testing.assert_allclose(loaded(x), got, rtol=0, atol=1e-3 * np.abs(got).max())
    assert same.measured == [] and sorted(engine_calls(loaded), key=str) == sorted(
        engine_calls(optimized), key=str
    )

    elsewhere = TableTuner(FAST_KERNELS, tag="another GPU")
    kerasrt.load(path, tuner=elsewhere)(x)  # choices made for another environment: timed again
    assert "cudnn_conv" in elsewhere.measured

    assert main(["inspect", str(path), "--tactics"]) == 0
    text = capsys.readouterr().out
    assert "pointwise_pair" in text and "dual_conv" in text and "apart" in text
    assert main(["inspect", str(path), "--tactics", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["kernel"] for r in rows} == set(kernels) and all(r["timings_ms"] for r in rows)


def test_saved_cudnn_plans_that_do_not_load_are_built_where_they_run(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="kerasrt.kernels.cudnn_conv"):
        loaded = cudnn_conv.install_saved_plans(
            [{"key": "a call", "plan": 3, "uids": {"X": 1}, "blob": "bm90IGEgcGxhbg=="}], torch.device("cpu")
        )
    assert loaded == 0 and "saved cuDNN plan of a call does not load" in caplog.text
    assert ("a call", 3) not in cudnn_conv._PLANS


def test_a_corrupt_cudnn_plans_file_is_a_clear_error(tmp_path: Path) -> None:
    model = SAMPLES["resnet_stages"][0]()
    conv = kerasrt.Converter(model, batch_size=2, precision_mode="FP16", compiler="inductor")
    conv.convert()
    path = conv.save(tmp_path / "art")
    manifest = json.loads((path / "manifest.json").read_text())
    compiled = manifest["engines"][0].get("compiled")
    if not compiled or not compiled.get("files"):
        pytest.skip("no compiled engine package on this machine")  # the package tests say why
    (path / "engines/0/cudnn_plans.json").write_text('{"cudnn": "9", "plans": [{"blob": "x"}]}')
    compiled["cudnn_plans"] = "engines/0/cudnn_plans.json"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"cudnn_plans\.json is corrupt"):
        kerasrt.load(path)


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
    assert threads == [1, config.compile_threads]


def test_inductor_compiles_engines_of_kerasrt_ops_registered_first(monkeypatch) -> None:
    """Inductor's own registration of an op it meets unregistered prints the call's arguments
    (the IR upstream of them): minutes on a deep model. Engines register kerasrt's ops first."""
    from torch._inductor import graph as inductor_graph
    from torch._inductor import lowering

    ops = registry.ops()
    for op in ops:  # as in a fresh process (earlier tests compiled engines with these ops)
        monkeypatch.delitem(lowering.lowerings, op, raising=False)
    implicit: list[object] = []

    def make_fallback(op, *args, **kwargs):
        implicit.append(op)
        return lowering.make_fallback(op, *args, **kwargs)

    monkeypatch.setattr(inductor_graph, "make_fallback", make_fallback)
    model, shape = SAMPLES["resnet_stages"][0](), SAMPLES["resnet_stages"][1]
    optimized = own_kernels_converter(model, TableTuner(FAST_KERNELS), compiler="inductor").convert()
    x = random_input(shape)
    (expected,) = keras_reference(model, [x])
    np.testing.assert_allclose(optimized(x), expected, rtol=0, atol=1e-2 * np.abs(expected).max())
    assert not set(ops) & set(implicit) and all(op in lowering.lowerings for op in ops)
    program = optimized.program(optimized.engine_shapes[0])
    assert {kernel_family(n).name for n in program.kernel_nodes} == {
        "cudnn_conv",
        "dual_conv",
        "linear_gemm",  # the classifier
        "pointwise_conv",
        "pointwise_pair",
        "stem_conv",  # the 3x3 convolutions over 16 channels: a window row of 48 elements
    }


def test_linear_gemm_compiles_and_times_only_row_tiles_that_fit_the_rows() -> None:
    from kerasrt.kernels import linear_gemm

    def tiles(*shape: int) -> set[int]:
        x = torch.empty(shape, device="meta")
        return {c[0] for c in linear_gemm.CONFIGS if linear_gemm.FAMILY.timed(c, (x,))}

    assert tiles(1, 49, 768) == {64}  # ConvNeXt's last stage at batch 1: 49 rows
    assert tiles(100, 768) == {64, 128}  # 100 rows: a 256-row tile would be 60% padding
    assert tiles(4096, 768) == {c[0] for c in linear_gemm.CONFIGS}


def test_excluded_families_are_never_timed_or_chosen() -> None:
    model, shape = SAMPLES["mobile_net"][0](), SAMPLES["mobile_net"][1]
    tuner = TableTuner(FAST_KERNELS, tag="exclusions")
    tuner.exclude = frozenset({"linear_gemm", "pointwise_pair"})
    conv = own_kernels_converter(model, tuner, batch=shape[0])
    optimized = conv.convert()
    chosen = {n.layer: Choice.of(n).kernel for n in optimized.primary_graph().nodes if KERNEL in n.attrs}
    assert "classifier" not in chosen  # no family left for it: Inductor's, as for any op
    assert chosen["project"] == "pointwise_conv"  # not chained into a pair
    assert not {"linear_gemm", "pointwise_pair"} & set(tuner.measured)
    x = random_input(shape)
    (expected,) = keras_reference(model, [x])
    np.testing.assert_allclose(optimized(x), expected, rtol=0, atol=1e-2 * np.abs(expected).max())


def test_settings_name_the_excluded_families_and_refuse_unknown_ones() -> None:
    settings = kerasrt.ConversionSettings(exclude_kernels=["linear_gemm"])
    assert settings.exclude_kernels == ("linear_gemm",)
    with pytest.raises(ConversionError, match=r"exclude_kernels names no kernel family: \['tensorrt'\]"):
        kerasrt.ConversionSettings(exclude_kernels=["tensorrt"])
