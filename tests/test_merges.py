"""Merged convolutions, on the CPU: the two merged ops' definitions against PyTorch's
convolutions, which neighbours of a ResNet-style network merge, and engines and artifacts
that run them. The Triton kernels need a GPU: ``bench/gpu_checks.py`` checks their numerics
there and ``bench/merge_probe.py`` times them."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kerasrt
from kerasrt.backend import dual_conv, merges, pointwise_pair, tactics, triton_configs
from kerasrt_testing import randomize
from test_artifact import run_packages_in_fresh_process
from test_kernels import CUDNN_OP, convert_on_own_kernels, fake_cudnn  # noqa: F401 (a fixture)

L = keras.layers
DUAL_OP = torch.ops.kerasrt.dual_conv.default
PAIR_OP = torch.ops.kerasrt.pointwise_pair.default


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


@pytest.mark.parametrize("stride", [None, 1, 2])
def test_the_pair_op_chains_two_convolutions_and_writes_the_second_over_its_input(stride) -> None:
    """Without a shortcut (stride None): an expansion with a residual, then a reduction; with
    one: a dual's two products (the shortcut at ``stride``), then the reduction."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 6, generator=gen, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last
    )
    w1 = torch.randn(40, 16, 1, 1, generator=gen, dtype=x.dtype)
    w2 = torch.randn(16, 40, 1, 1, generator=gen, dtype=x.dtype)
    b1 = torch.randn(40, generator=gen, dtype=x.dtype)
    if stride is None:
        shortcut = ws = None
        residual = torch.randn(2, 40, 4, 6, generator=gen, dtype=x.dtype)
        added = residual
    else:
        shortcut = torch.randn(2, 24, 4 * stride, 6 * stride, generator=gen, dtype=x.dtype)
        ws = torch.randn(40, 24, 1, 1, generator=gen, dtype=x.dtype)
        residual = None
        added = F.conv2d(shortcut, ws, stride=stride)
    first = F.relu(F.conv2d(x, w1, b1) + added)
    second = F.conv2d(first, w2).clamp(-1.0, 1.0)
    storage = x.data_ptr()
    strides = [stride or 1] * 2
    y = PAIR_OP(x, w1, shortcut, ws, strides, b1, residual, w2, None, "relu", [], "clamp", [-1.0, 1.0])
    torch.testing.assert_close(y, first)
    torch.testing.assert_close(x, second)  # written over the input, in its own memory
    assert x.data_ptr() == storage and x.is_contiguous(memory_format=torch.channels_last)
    assert (x.abs() <= 1.0).all() and (x.abs() == 1.0).any()  # the clamp bit
    with pytest.raises(ValueError, match="as many channels"):
        PAIR_OP(x, w1, shortcut, ws, strides, b1, residual, w2[:8], None, "relu", [], "none", [])
    with pytest.raises(ValueError, match="with its weight"):
        PAIR_OP(x, w1, x, None, strides, b1, None, w2, None, "relu", [], "none", [])


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


def described(found: list[merges.Merge]) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """(kind, lead weight shape, absorbed weight shape) of each merge."""
    return [(m.kind, tuple(m.lead.inputs[1].shape), tuple(m.absorbed.inputs[1].shape)) for m in found]


def test_which_neighbours_merge_in_resnet_stages() -> None:
    graph = kerasrt.Converter(resnet_stages(), batch_size=2, precision_mode="FP16").convert().primary_graph()
    found = merges.candidates(graph.nodes, graph.outputs)
    # each projection block's shortcut took the expansion's output as its residual (Keras adds
    # [shortcut, y]) and absorbs it; identity blocks add their input, made by no 1x1 conv
    # alone. The first block's output feeds the second block's reduction, back to the 16
    # channels of its expansion's input (the 3x3's output, read by it alone): the dual
    # extended (dualpair). The second block's expansion feeds the third block's reduction so:
    # a pair. The last block reduces at stride 2 (no pointwise kernel)
    assert described(found) == [
        ("dual", (64, 16, 1, 1), (64, 16, 1, 1)),
        ("dualpair", (64, 16, 1, 1), (16, 64, 1, 1)),
        ("dual", (128, 64, 1, 1), (128, 32, 1, 1)),
        ("pair", (64, 16, 1, 1), (16, 64, 1, 1)),
    ]
    dual, dualpair, strided, pair = found
    assert (
        dualpair.lead is dual.lead and dualpair.inner is dual.absorbed and dualpair.others[0] is dual.absorbed
    )
    assert strided.lead.attrs["stride"] == [2, 2] and strided.absorbed.attrs["stride"] == [1, 1]
    names = [[n.outputs[0].name for n in m.others] for m in found]
    assert [m.kernel for m in found] == [":".join([m.kind, *n]) for m, n in zip(found, names)]
    assert [merges.parse(m.kernel) for m in found] == [(m.kind, n) for m, n in zip(found, names)]
    assert merges.parse("cudnn") is None and merges.parse(merges.ABSORBED) is None
    # an absorbed output read outside the engine is not merged away
    assert merges.candidates(graph.nodes, [dual.absorbed.outputs[0]]) == [strided, pair]
    # nor a pair whose input is read outside it (the pair writes over it)
    assert merges.candidates(graph.nodes, [pair.lead.inputs[0]]) == [dual, dualpair, strided]
    assert merges.candidates(graph.nodes, [dual.absorbed.inputs[0]]) == [dual, strided, pair]


def test_the_timed_launch_arguments_are_the_op_call_s_with_the_lead_s_output_buffer() -> None:
    """``choose`` times each kernel on ``_arguments`` (``launch``'s order); the engine calls the
    op on ``op_arguments``. Less the lead's output buffer, the timed arguments are the op's
    (launch's parameters are the op schema's plus that buffer), and they make a tensor like
    that buffer."""
    graph = kerasrt.Converter(resnet_stages(), batch_size=2, precision_mode="FP16").convert().primary_graph()
    for merge in merges.candidates(graph.nodes, graph.outputs):
        launch_args = merges._arguments(merge, torch.device("cpu"))
        slot = merges._OUT_SLOT[merge.kind]
        out, op_args = launch_args[slot], launch_args[:slot] + launch_args[slot + 1 :]
        op = DUAL_OP if merge.kind == "dual" else PAIR_OP
        launch = list(inspect.signature(merges._OPS[merge.kind].launch).parameters)[1:]  # after config
        assert launch[slot] in ("out", "y") and launch[:slot] + launch[slot + 1 :] == [
            a.name for a in op._schema.arguments
        ]
        got = op(*op_args)
        assert got.shape == out.shape == tuple(merge.lead.outputs[0].shape), merge.kind
        assert got.dtype == out.dtype == torch.float16 and torch.isfinite(got).all()
        tensors = [a for a in launch_args if isinstance(a, torch.Tensor)]
        assert len({id(t) for t in tensors}) == len(tensors)  # no operand passed twice


@pytest.fixture
def fast_merges(monkeypatch, fake_cudnn):  # noqa: F811 (the fixture imported above)
    """The merged kernels "available" on the CPU, every config timed at 0.3 ms (faster than
    the 0.5 + 0.5 ms of two fake cuDNN kernels). Returns the timed merges."""
    timed: list[str] = []

    def best_config(configs, run, what):
        timed.append(what.outputs[0].name)
        return 2, 0.3

    monkeypatch.setattr(dual_conv, "available", lambda device: True)
    monkeypatch.setattr(pointwise_pair, "available", lambda device: True)
    monkeypatch.setattr(tactics, "best_config", best_config)
    monkeypatch.setattr(triton_configs, "_CHOSEN", {})
    return timed


def test_merged_convolutions_run_as_one_op_and_artifacts_keep_them(
    tmp_path: Path, fast_merges, monkeypatch
) -> None:
    precompiled: list[tuple] = []  # the merged kernels' compile jobs, made before any timing
    monkeypatch.setattr(
        tactics,
        "precompile",
        lambda jobs, device, requests=(): (
            precompiled.extend(
                operands()
                for candidates, operands in jobs
                if getattr(candidates, "func", None) is merges._merged_candidates
            )
            or {}
        ),
    )
    model = resnet_stages()
    conv, optimized, x, got = convert_on_own_kernels(model, (2, 8, 8, 16))
    assert len(fast_merges) == 4  # two duals, the first extended to a dualpair, a pair
    assert sorted(len(args) for args in precompiled) == [9, 9, 14, 14]
    program = optimized.program(optimized.engine_shapes[0])
    (engine,) = program.compiled_engines.values()
    calls = [n.target for n in engine.module.graph.nodes if n.op == "call_function"]
    assert calls.count(DUAL_OP) == 1 and calls.count(PAIR_OP) == 2 and calls.count(CUDNN_OP) == 7
    kinds = sorted(k.partition(":")[0] for k in program.kernel_convs.values())
    assert kinds == ["cudnn"] * 7 + ["dual", "dualpair"] + [merges.ABSORBED] * 4 + ["pair"]
    merged = {s: c for s, c in program.kernel_choices.items() if merges.is_merge_signature(s)}
    # the dualpair against its dual (0.3 ms) and the reduction (0.5); the others against their parts
    assert sorted((c.kernel, c.config, c.apart_ms) for c in merged.values()) == [
        ("triton", 2, 0.8),
        ("triton", 2, 1.0),
        ("triton", 2, 1.0),
    ]
    assert {triton_configs.chosen(s) for s in merged} == {2}
    summary = conv.summary(print_fn=None)
    assert "3 merged kernels, each running two or three neighbouring convolutions" in summary

    # a second build on this machine takes the cached choices: nothing is timed again
    kerasrt.Converter(
        model, batch_size=2, precision_mode="FP16", compiler="inductor", conv_kernels="cudnn"
    ).convert()
    assert len(fast_merges) == 4 and len(precompiled) == 4

    path = conv.save(tmp_path / "art")
    entry = json.loads((path / "manifest.json").read_text())["engines"][0]
    assert entry["compiled"]["kernel_convs"] == program.kernel_convs
    assert {c["kernel"] for s, c in entry["tactics"]["choices"].items() if merges.is_merge_signature(s)} == {
        "triton"
    }
    fresh = run_packages_in_fresh_process(path, x, tmp_path)
    np.testing.assert_allclose(fresh, got, rtol=0, atol=1e-3 * np.abs(got).max())


def test_inductor_runs_the_pair_in_the_buffer_of_the_convolution_it_writes_over(fast_merges) -> None:
    """The pair adds no memory only if Inductor hands it the 3x3 convolution's own output
    buffer to write over, and copies nothing: the compiled engine's code, line by line."""
    import re

    from torch._inductor.utils import run_and_get_code

    from kerasrt.backend.torch_backend import inductor_compiling

    _, optimized, _, _ = convert_on_own_kernels(resnet_stages(), (2, 8, 8, 16))
    (engine,) = optimized.program(optimized.engine_shapes[0]).compiled_engines.values()
    torch._dynamo.reset()
    with torch.no_grad(), inductor_compiling():
        compiled = torch.compile(engine.module, fullgraph=True, dynamic=False, options={"freezing": True})
        _, code = run_and_get_code(compiled, *engine.example_inputs())
    source = "\n".join(code)
    overwritten = re.findall(r"= torch\.ops\.kerasrt\.pointwise_pair\.default\((buf\d+),", source)
    assert len(overwritten) == 2  # the dualpair and the pair

    def maker(buffer: str) -> str:  # the call that made ``buffer``, through "bufA = bufB" aliases
        (made,) = re.findall(rf"^\s*{buffer} = (.+)$", source, re.MULTILINE)
        return maker(made.strip()) if re.fullmatch(r"buf\d+", made.strip()) else made.split("(")[0]

    assert [maker(buffer) for buffer in overwritten] == ["torch.ops.kerasrt.cudnn_conv.default"] * 2
    assert not re.search(r"clone|\.copy_\(", source)  # no copy kept for a reader of the old values


def test_merges_that_lose_to_their_parts_are_not_taken(monkeypatch, fast_merges) -> None:
    monkeypatch.setattr(tactics, "best_config", lambda configs, run, what: (0, 1.5))
    _, optimized, _, _ = convert_on_own_kernels(resnet_stages(), (2, 8, 8, 16))
    program = optimized.program(optimized.engine_shapes[0])
    (engine,) = program.compiled_engines.values()
    calls = [n.target for n in engine.module.graph.nodes if n.op == "call_function"]
    assert DUAL_OP not in calls and PAIR_OP not in calls
    assert set(program.kernel_convs.values()) == {"cudnn"}
    env = tactics.environment(torch.device("cpu"))
    lost = [c for s, c in tactics.choice_table(env).items() if merges.is_merge_signature(s)]
    assert len(lost) == 3 and {(c.kernel, c.apart_ms, c.triton_ms) for c in lost} == {("apart", 1.0, 1.5)}


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
        "timing merged kernels for 4 group(s) of neighbouring convolutions",
    ]
    assert build() == ["building the engines for input shapes (2, 8, 8, 16)"]  # all cached
