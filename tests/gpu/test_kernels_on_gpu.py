"""Every kernel family on a CUDA device against the IR op it implements, in FP16 and BF16:
every config on every sample node the family runs, called directly and replayed from a
captured CUDA graph; each Triton family inlined into an AOTInductor package; whole models
with kernels chosen by real timing against Keras."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import kerasrt
from kerasrt.backend import aoti
from kerasrt.backend.torch_backend import inductor_compiling, kernel_family
from kerasrt.kernels import op_library, registry
from kerasrt.kernels.registry import View
from kerasrt.tuning import tactics
from kerasrt_testing import keras_reference, random_input
from kernel_testing import FAST_KERNELS, SAMPLES, GraphValues, TableTuner, ir_result, sample_graph

FAMILIES = [f.name for f in registry.families()]
PRECISIONS = sorted({p for f in registry.families() for p in f.precisions})
TOLERANCE = {"FP16": 2e-2, "BF16": 6e-2, "INT8": 2e-2, "FP8": 2e-2}
"""Largest error allowed, relative to the largest magnitude of the IR op's result."""


class CudaTableTuner(TableTuner):
    """A table decides, as on the CPU, while every op runs on the GPU: each family gets the
    nodes it wins in the table (merged kernels included), whatever the card would choose."""

    def __init__(self, ms: dict[str, float]):
        super().__init__(ms, tag="gpu table")
        self.device = torch.device("cuda")

    def available(self, family: registry.KernelFamily) -> bool:
        return family.available(self.device)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[tuple[str, str], object]:
    with pytest.MonkeyPatch.context() as m:
        m.setenv("KERASRT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return {
            (sample, precision): sample_graph(sample, CudaTableTuner(FAST_KERNELS), precision, "cuda")[0]
            for sample in SAMPLES
            for precision in PRECISIONS
        }


def nodes_of(name: str, graphs: dict) -> list[tuple[object, object, str]]:
    found = []
    for (_, precision), graph in graphs.items():
        view = View(graph.nodes, graph.outputs)
        found += [
            (graph, node, precision)
            for node in graph.nodes
            if node.op in registry.family(name).ops and registry.family(name).eligible(node, view)
        ]
    return found


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-6))


def configs_of(family: registry.KernelFamily, args: tuple, precision: str) -> list[int]:
    """Every config of a family in FP16, its first and last in BF16 (the same code with
    another element type; each config is a Triton compile); for cuDNN, plan 0 and the
    fastest plan timed here."""
    if family.configs != ():
        every = list(range(len(family.configs)))
        return every if precision == "FP16" else sorted({every[0], every[-1]})
    best = family.tune(args, {}, tactics.device_ms)
    return sorted({0, best[0]}) if best else [0]


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_matches_its_ir_op_directly_and_in_a_cuda_graph(name: str, graphs) -> None:
    family = registry.family(name)
    cases = [c for c in nodes_of(name, graphs) if c[2] in family.precisions]
    assert {p for _, _, p in cases} == set(family.precisions), f"{name} runs no sample node in some precision"
    for graph, node, precision in cases:
        view = View(graph.nodes, graph.outputs)
        base = GraphValues(graph, device="cuda")
        for config in configs_of(family, family.arguments(node, base, view), precision):
            values = GraphValues(graph, device="cuda")  # fresh: the pair writes over its input
            expected = ir_result(node, values)
            args = family.arguments(node, values, view)
            got = family.results(family.call(args, config), args)
            for g, e in zip(got, expected):
                assert g.dtype == e.dtype and g.shape == e.shape
                err = relative_error(g, e)
                assert err < TOLERANCE[precision], (name, precision, config, node, err)
            # captured and replayed, as engines run: the same result
            replay = GraphValues(graph, device="cuda")
            args = family.arguments(node, replay, view)
            family.call(args, config)  # first call eagerly (split-K makes its counters)
            replay = GraphValues(graph, device="cuda")
            args = family.arguments(node, replay, view)
            inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            cuda_graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                family.call(args, config)
            torch.cuda.current_stream().wait_stream(stream)
            for a, i in zip(args, inputs):  # the warm-up call may have written over an input
                if isinstance(a, torch.Tensor):
                    a.copy_(i)
            with torch.cuda.graph(cuda_graph):
                captured = family.results(family.call(args, config), args)
            for a, i in zip(args, inputs):
                if isinstance(a, torch.Tensor):
                    a.copy_(i)
            cuda_graph.replay()
            torch.cuda.synchronize()
            for c, g in zip(captured, got):
                assert relative_error(c, g) < 1e-3, (name, precision, config, "CUDA graph replay")
        if family.configs:
            with pytest.raises(ValueError, match="configs, not config"):
                family.call(
                    family.arguments(node, GraphValues(graph, device="cuda"), view), len(family.configs)
                )


def package_inlines_kernels(path: Path) -> bool:
    """Whether the AOTInductor package at ``path`` carries compiled kernels (cubin files) and
    calls no kerasrt op."""
    with zipfile.ZipFile(path) as package:
        names = package.namelist()
        calls_op = any(re.search(rb"kerasrt::|ops\.kerasrt\.", package.read(name)) for name in names)
    return not calls_op and any(name.endswith(".cubin") for name in names)


@pytest.mark.parametrize("name", [f.name for f in registry.families() if f.triton])
def test_each_triton_family_inlines_into_a_package_that_computes_the_op(name: str, graphs, tmp_path) -> None:
    family = registry.family(name)
    graph, node, _ = next(c for c in nodes_of(name, graphs) if c[2] == "FP16")
    view = View(graph.nodes, graph.outputs)
    values = GraphValues(graph, device="cuda")
    args = family.arguments(node, values, view)
    slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    config = len(family.configs) - 1

    class Call(torch.nn.Module):
        def forward(self, *tensors):
            full = list(args)
            for i, t in zip(slots, tensors):
                full[i] = t
            return (*family.results(family.call(tuple(full), config), tuple(full)),)

    def fresh() -> tuple:
        return tuple(args[i].clone() for i in slots)

    expected = Call()(*fresh())
    with torch.no_grad(), inductor_compiling(), op_library.inlining_kernels():
        exported = torch.export.export(Call(), fresh())
        aoti.compile_package(exported, tmp_path / "op.pt2")
    assert package_inlines_kernels(tmp_path / "op.pt2")
    got = aoti.load_package(tmp_path / "op.pt2", torch.device("cuda"))(*fresh())
    for g, e in zip(got, expected):
        assert relative_error(g, e) < 1e-3


@pytest.mark.parametrize(
    "sample, conv_kernels",
    [("resnet_stages", "auto"), ("mobile_net", "auto"), ("resnet_stages", "cudnn"), ("mlp_block", "auto")],
)
def test_models_on_kernels_chosen_by_timing_match_keras(
    sample: str, conv_kernels: str, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("KERASRT_CACHE_DIR", str(tmp_path))
    make, shape = SAMPLES[sample]
    model = make()
    x = random_input(shape)
    (expected,) = keras_reference(model, [x])
    conv = kerasrt.Converter(model, batch_size=shape[0], precision_mode="FP16", conv_kernels=conv_kernels)
    optimized = conv.convert()
    got = optimized(x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-2 * np.abs(expected).max())
    program = optimized.program(optimized.engine_shapes[0])
    assert program.captured  # replayed as one CUDA graph
    if conv_kernels == "cudnn":
        assert program.kernel_nodes
    # saved and loaded: the packages run the same choices, and nothing is timed again
    loaded = kerasrt.load(conv.save(tmp_path / "art"))
    np.testing.assert_allclose(loaded(x), got, rtol=0, atol=2e-3 * np.abs(expected).max())
    assert [kernel_family(n) for n in loaded.program(loaded.engine_shapes[0]).kernel_nodes] == [
        kernel_family(n) for n in program.kernel_nodes
    ]


@pytest.mark.parametrize("precision", ["INT8", "FP8"])
def test_quantized_models_on_kernels_chosen_by_timing_match_the_cpu_reference(
    precision: str, tmp_path, monkeypatch
) -> None:
    """Dense layers calibrated once, built on the GPU with kernels chosen by real timing
    (quantized_gemm against Inductor's Q/DQ + FP16 GEMM), replayed as a CUDA graph, saved
    and loaded: the values of the same quantized model computed op by op on the CPU."""
    monkeypatch.setenv("KERASRT_CACHE_DIR", str(tmp_path))
    make, shape = SAMPLES["dense_tokens"]
    model = make()
    x = random_input((64, *shape[1:]))
    calibration = [random_input((64, *shape[1:]), seed=11)]
    cpu = kerasrt.Converter(model, batch_size=64, precision_mode=precision, device="cpu").convert(calibration)
    conv = kerasrt.Converter(model, batch_size=64, precision_mode=precision, device="cuda")
    optimized = conv.convert(calibration)
    expected = cpu(x)
    got = optimized(x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-2 * np.abs(expected).max())
    program = optimized.program(optimized.engine_shapes[0])
    assert program.captured
    loaded = kerasrt.load(conv.save(tmp_path / "art"))
    np.testing.assert_allclose(loaded(x), got, rtol=0, atol=2e-3 * np.abs(expected).max())
