"""Merged convolutions, on the CPU: which neighbours of a ResNet-style network the rules find,
the rewrites into ``dual_conv`` and ``conv_pair`` nodes where the merged kernel beats its
parts, and engines and artifacts that run them. The merged ops' math against the IR is checked
with every family in ``test_kernels``; their Triton kernels by ``tests/gpu``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

import kerasrt
from kerasrt.ir.graph import verify
from kerasrt.ir.ops import KERNEL
from kerasrt.kernels.registry import View
from kerasrt.tuning import merges
from kerasrt.tuning.choices import Choice
from kerasrt_testing import keras_reference, random_input
from kernel_testing import FAST_KERNELS, TableTuner, own_kernels_converter, resnet_stages, sample_graph
from test_artifact import run_packages_in_fresh_process

SLOW_MERGES = {**FAST_KERNELS, "dual_conv": 5.0, "pointwise_pair": 5.0}
CUDNN_3X3 = {k: ms for k, ms in FAST_KERNELS.items() if k != "stem_conv"}
"""The 3x3 convolutions on cuDNN (the stem kernel does not run)."""


def weights(candidates: list[merges.Candidate]) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(merged op, the parts' weight shapes) of each candidate."""
    return [(c.node.op, [tuple(p.inputs[1].shape) for p in c.parts]) for c in candidates]


def test_which_neighbours_merge_in_resnet_stages(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KERASRT_CACHE_DIR", str(tmp_path))
    graph, _ = sample_graph("resnet_stages", TableTuner(SLOW_MERGES))  # kernels chosen, none merged
    view = View(graph.nodes, graph.outputs)
    # each projection block's shortcut took the expansion's output as its residual (Keras adds
    # [shortcut, y]); identity blocks add their input, made by no 1x1 conv alone
    duals = merges.dual_candidates(view)
    assert weights(duals) == [
        ("dual_conv", [(64, 16, 1, 1), (64, 16, 1, 1)]),
        ("dual_conv", [(128, 64, 1, 1), (128, 32, 1, 1)]),
    ]
    first, strided = duals
    # h, the first product, is the expansion's input (the 3x3's output, read by it alone)
    assert first.node.inputs[0] is first.parts[1].inputs[0] and first.node.attrs["stride"] == [1, 1]
    assert strided.node.attrs["stride"] == [2, 2] and first.constants and first.node.attrs["has_bias"]
    # the second block's expansion is reduced by the third block's first 1x1: a pair (the
    # first block's output feeds a reduction too, through its dual: found once that is merged;
    # the last block reduces at stride 2, which the pointwise kernel does not take)
    (pair,) = merges.pair_candidates(view)
    assert weights([pair]) == [("conv_pair", [(64, 16, 1, 1), (16, 64, 1, 1)])]
    assert pair.node.attrs["operands"] == ["x", "w1", "b1", "residual", "w2", "b2"]
    # an absorbed output read outside the engine is not merged away, nor a pair's input
    assert weights(merges.dual_candidates(View(graph.nodes, [first.parts[1].outputs[0]]))) == weights(
        [strided]
    )
    assert merges.pair_candidates(View(graph.nodes, [pair.node.inputs[0]])) == []


def test_merges_are_rewritten_where_they_win_and_compute_what_their_parts_did(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KERASRT_CACHE_DIR", str(tmp_path))
    model = resnet_stages()
    x = random_input((2, 8, 8, 16))
    (expected,) = keras_reference(model, [x])
    outputs = {}
    for name, table in [("merged", FAST_KERNELS), ("apart", SLOW_MERGES)]:
        tuner = TableTuner(table, tag=name)
        optimized = kerasrt.Converter(
            model, batch_size=2, precision_mode="FP16", conv_kernels="cudnn", tuner=tuner
        ).convert()
        outputs[name] = optimized(x)
        np.testing.assert_allclose(outputs[name], expected, rtol=0, atol=1e-2 * np.abs(expected).max())
        graph = optimized.primary_graph()
        verify(graph)
        ops = sorted(n.op for n in graph.nodes if n.op in ("dual_conv", "conv_pair"))
        merged = graph.meta["kernels"]["merged"]
        if name == "merged":
            # two duals; a pair going on from the first dual, one from the second block
            assert ops == ["conv_pair", "conv_pair", "dual_conv"] and merged == {
                "dual_conv": 2,
                "conv_pair": 2,
            }
            pairs = [Choice.of(n) for n in graph.nodes if n.op == "conv_pair"]
            # the pair from the dual against the dual (0.5) and the reduction (0.8), the other
            # against its two 1x1 convolutions
            assert sorted(c.timings["apart"][1] for c in pairs) == [1.3, 1.6]
            assert next(n for n in graph.nodes if n.op == "conv_pair").attrs["operands"][:4] == [
                "x",
                "w1",
                "shortcut",
                "ws",
            ]
        else:
            assert ops == [] and merged == {}
            assert sorted(tuner.measured).count("dual_conv") == 2  # timed, and lost
    np.testing.assert_allclose(
        outputs["merged"], outputs["apart"], rtol=0, atol=5e-3 * np.abs(expected).max()
    )


def test_a_first_build_reports_its_compiling_and_timing_and_a_cached_one_does_not(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("KERASRT_CACHE_DIR", str(tmp_path))

    def build() -> list[str]:
        heard: list[str] = []
        kerasrt.Converter(
            resnet_stages(),
            batch_size=2,
            precision_mode="FP16",
            conv_kernels="cudnn",
            progress=heard.append,
            tuner=TableTuner(FAST_KERNELS),
        ).convert()
        return [m for m in heard if m.startswith(("building", "compiling", "timing"))]

    first = build()
    shapes = len({s for s in first if s.startswith("timing kernels")})
    assert shapes >= 2 and first == [
        "building the engines for input shapes (2, 8, 8, 16)",
        f"compiling kernel candidates for {shapes} layer shape(s)",
        *(f"timing kernels for layer shape {i} of {shapes}" for i in range(1, shapes + 1)),
        "timing merged kernels for 2 group(s) of neighbouring convolutions",
        "timing merged kernels for 2 group(s) of neighbouring convolutions",
    ]
    assert build() == ["building the engines for input shapes (2, 8, 8, 16)"]  # all cached


def test_inductor_runs_the_pair_in_the_buffer_of_the_convolution_it_writes_over(
    tmp_path, monkeypatch
) -> None:
    """The pair adds no memory only if Inductor hands it the 3x3 convolution's own output
    buffer to write over, and copies nothing: the compiled engine's code, line by line."""
    from torch._inductor.utils import run_and_get_code

    from kerasrt.backend.torch_backend import inductor_compiling

    monkeypatch.setenv("KERASRT_CACHE_DIR", str(tmp_path))
    _, optimized = sample_graph("resnet_stages", TableTuner(CUDNN_3X3))
    (engine,) = [s[0] for s in optimized.program(optimized.engine_shapes[0]).steps]
    torch._dynamo.reset()
    with torch.no_grad(), inductor_compiling():
        compiled = torch.compile(engine.module, fullgraph=True, dynamic=False, options={"freezing": True})
        _, code = run_and_get_code(compiled, *engine.example_inputs())
    source = "\n".join(code)
    overwritten = re.findall(r"= torch\.ops\.kerasrt\.pointwise_pair\.default\((buf\d+),", source)
    assert len(overwritten) == 2  # the pair from the dual and the other

    def maker(buffer: str) -> str:  # the call that made ``buffer``, through "bufA = bufB" aliases
        (made,) = re.findall(rf"^\s*{buffer} = (.+)$", source, re.MULTILINE)
        return maker(made.strip()) if re.fullmatch(r"buf\d+", made.strip()) else made.split("(")[0]

    assert [maker(buffer) for buffer in overwritten] == ["torch.ops.kerasrt.cudnn_conv.default"] * 2
    assert not re.search(r"clone|\.copy_\(", source)  # no copy kept for a reader of the old values


def test_compiled_packages_of_merged_kernels_run_in_a_fresh_process(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KERASRT_CACHE_DIR", str(tmp_path / "cache"))
    model = resnet_stages()
    conv = own_kernels_converter(model, TableTuner(CUDNN_3X3), compiler="inductor")
    optimized = conv.convert()
    x = random_input((2, 8, 8, 16))
    got = optimized(x)
    path = conv.save(tmp_path / "art")
    stored = json.loads((path / "manifest.json").read_text())["engines"][0]
    assert stored["compiled"]["files"]  # the engine compiled ahead of time
    assert sum(KERNEL in n["attrs"] for n in stored["graph"]["nodes"]) == 11  # 10 convs, the classifier
    # a fresh process, without the test's tuner: the packages call the ops as they were built to
    fresh = run_packages_in_fresh_process(path, x, tmp_path)
    np.testing.assert_allclose(fresh, got, rtol=0, atol=1e-3 * np.abs(got).max())
