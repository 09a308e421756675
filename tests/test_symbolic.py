"""Symbolic sizes in the IR: expressions, shape inference on symbols, guards, specialization."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch
from keras import layers as L

from kerasrt.errors import IRError
from kerasrt.frontend.importer import import_model, model_inputs
from kerasrt.ir import symbolic
from kerasrt.ir.graph import Graph, verify
from kerasrt.ir.ops import OPS, infer_types
from kerasrt.ir.serialize import graph_from_json, graph_to_json
from kerasrt.ir.specialize import GUARDS, bind, broken_guard, specialize
from kerasrt_testing import random_input, randomize


@pytest.mark.parametrize(
    ("text", "bindings", "value"),
    [
        ("s0*12", {"s0": 3}, 36),
        ("(s1 - 1)//2 + 1", {"s1": 224}, 112),
        ("s1 % 2", {"s1": 7}, 1),
        ("max(s0, 2) + min(s1, 512)", {"s0": 1, "s1": 600}, 514),
        ("-s0 + s1**2", {"s0": 2, "s1": 3}, 7),
    ],
)
def test_expressions_evaluate_and_print_back_to_themselves(text: str, bindings: dict, value: int) -> None:
    assert symbolic.evaluate(text, bindings) == value
    canonical = symbolic.normalize(text)
    assert symbolic.evaluate(canonical, bindings) == value
    assert symbolic.normalize(canonical) == canonical


@pytest.mark.parametrize(
    "text", ["__import__('os').system('true')", "s0.bit_length()", "[s0]", "s0 / 2", "2.5"]
)
def test_the_expression_reader_runs_no_code(text: str) -> None:
    with pytest.raises(IRError, match=r"not a size expression|is not allowed"):
        symbolic.evaluate(text, {"s0": 4})


CASES = [
    (
        "conv",
        [("s0", 3, "s1", "s2"), (8, 3, 3, 3)],
        {"stride": [2, 2], "padding": [1, 1], "dilation": [1, 1], "groups": 1},
    ),
    (
        "max_pool",
        [("s0", 4, "s1", "s1")],
        {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1], "dilation": [1, 1]},
    ),
    ("reshape", [("s0", "s1", 16)], {"shape": ["s0*s1", 4, 4]}),
    ("expand", [("s0", 1, 8)], {"shape": ["s0", "s1", 8]}),
    ("slice", [("s0", "s1", 8)], {"dim": 1, "start": 1, "end": "s1 - 1", "step": 1}),
    ("pad", [("s0", "s1", 8)], {"pads": [0, 0, 2, 3]}),
    ("resize", [("s0", 3, "s1", "s2")], {"size": ["2*s1", 7], "mode": "bilinear", "align_corners": False}),
    ("matmul", [("s0", "s1", 16), (16, 32)], {}),
    ("concat", [("s0", "s1", 8), ("s0", "s2", 8)], {"dim": 1}),
    ("permute", [("s0", "s1", 8)], {"dims": [0, 2, 1]}),
    ("reduce_mean", [("s0", "s1", 8)], {"dims": [1], "keepdim": True}),
    ("attention", [("s0", 2, "s1", 8)] * 3, {"scale": 0.3, "is_causal": True}),
]


@pytest.mark.parametrize(("op", "shapes", "attrs"), CASES, ids=[c[0] for c in CASES])
def test_symbolic_inference_agrees_with_concrete_inference_at_every_size(
    op: str, shapes: list, attrs: dict
) -> None:
    graph = Graph()
    inputs = [graph.add_input(f"x{i}", shape, "float32") for i, shape in enumerate(shapes)]
    ((shape, _),) = infer_types(op, inputs, attrs)
    assert not symbolic.is_static(shape)
    for bindings in ({"s0": 1, "s1": 9, "s2": 12}, {"s0": 5, "s1": 32, "s2": 17}):
        concrete = Graph()
        values = [
            concrete.add_input(v.name, symbolic.specialize_value(v.shape, bindings), "float32")
            for v in inputs
        ]
        fixed = {
            k: symbolic.specialize_value(v, bindings) if k in OPS[op].dim_attrs else v
            for k, v in attrs.items()
        }
        ((want, _),) = infer_types(op, values, fixed)
        assert symbolic.specialize_value(shape, bindings) == want, (op, bindings)


def test_an_op_that_rejects_its_symbolic_inputs_names_them() -> None:
    graph = Graph()
    a, b = graph.add_input("a", ("s0", 8), "float32"), graph.add_input("b", (9, 4), "float32")
    with pytest.raises(IRError, match=r"matmul\(f32\[s0,8\], f32\[9,4\]\)"):
        infer_types("matmul", [a, b], {})


def _same_padded_cnn() -> keras.Model:
    inp = keras.Input((None, None, 3))
    x = L.Conv2D(4, 3, strides=2, padding="same", activation="relu")(inp)
    x = L.ZeroPadding2D(1)(x)
    x = L.DepthwiseConv2D(3)(x)
    return randomize(keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(x))))


def test_a_symbolic_import_records_the_branch_its_trace_took_on_a_size() -> None:
    model = _same_padded_cnn()
    inputs = model_inputs(model, None, 1)
    assert [s.shape for s in inputs.specs] == [("s0", "s1", "s2", 3)] and inputs.example is None
    graph = import_model(model, inputs.specs, hints=inputs.hints)
    verify(graph)
    assert graph.inputs[0].shape == ("s0", "s1", "s2", 3) and graph.outputs[0].shape == ("s0", 2)
    # Keras's "same" padding of a stride-2 convolution is symmetric for odd sizes only: the trace
    # (at odd hints) assumed it, and says so
    assert graph.meta[GUARDS]
    assert broken_guard(graph, bind(graph, [(1, 33, 65, 3)])) is None
    assert broken_guard(graph, bind(graph, [(4, 32, 65, 3)])) is not None
    # a size of 1 breaks only stride bookkeeping, which the IR does not model
    assert broken_guard(graph, bind(graph, [(1, 1, 1, 3)])) is None


def _run(graph: Graph, inputs: list) -> list:
    from kerasrt.ir.ops import run_reference

    env = {id(v): torch.from_numpy(x) for v, x in zip(graph.inputs, inputs)}
    env.update({id(v): v.data for v in graph.constants.values()})
    for node in graph.nodes:
        outs = run_reference(node.op, [env[id(v)] for v in node.inputs], node.attrs)
        for value, out in zip(node.outputs, outs if isinstance(outs, (tuple, list)) else [outs]):
            env[id(value)] = out
    return [env[id(v)].numpy() for v in graph.outputs]


def test_specialize_makes_every_size_concrete_and_matches_keras() -> None:
    model = _same_padded_cnn()
    inputs = model_inputs(model, None, 1)
    graph = import_model(model, inputs.specs, hints=inputs.hints)
    for shape in [(1, 9, 13, 3), (3, 21, 5, 3)]:
        concrete = specialize(graph, bind(graph, [shape]))
        assert all(symbolic.is_static(v.shape) for v in concrete.values())
        x = random_input(shape)
        want = keras.ops.convert_to_numpy(model(x))
        torch.testing.assert_close(_run(concrete, [x])[0], want, rtol=1e-4, atol=1e-5)


def _text_model() -> keras.Model:
    tokens = keras.Input((None,), dtype="int32")
    x = L.Embedding(40, 16)(tokens)
    x = L.LayerNormalization()(x + L.MultiHeadAttention(2, 8)(x, x))
    return randomize(keras.Model(tokens, L.Dense(4)(L.Dense(32, activation="gelu")(x))))


@pytest.mark.parametrize("make", [_same_padded_cnn, _text_model], ids=["cnn", "text"])
def test_the_optimizer_runs_on_a_symbolic_graph_and_its_result_serves_every_shape(make) -> None:
    """The passes handle symbols: one optimized graph, specialized per shape, matches Keras
    (the step towards engines compiled once for a range of shapes)."""
    from kerasrt.passes import optimize

    model = make()
    inputs = model_inputs(model, None, 1)
    graph = import_model(model, inputs.specs, hints=inputs.hints)
    before = len(graph.nodes)
    result = optimize(graph, 2, check=True)
    assert result.nodes_after < before and sum(result.counts.values()) > 0
    assert not symbolic.is_static(graph.inputs[0].shape)
    text = make is _text_model
    for shape in [(1, 5), (3, 17)] if text else [(1, 9, 13, 3), (2, 21, 7, 3)]:
        x = np.random.default_rng(0).integers(0, 40, shape).astype("int32") if text else random_input(shape)
        got = _run(specialize(graph, bind(graph, [shape])), [x])[0]
        torch.testing.assert_close(got, keras.ops.convert_to_numpy(model(x)), rtol=1e-4, atol=1e-5)


def test_bind_names_the_input_and_the_size_that_does_not_fit() -> None:
    graph = Graph()
    a = graph.add_input("tokens", ("s0", "s1"), "int32")
    b = graph.add_input("mask", ("s0", "s1"), "int32")
    graph.outputs = [a, b]
    assert bind(graph, [(2, 7), (2, 7)]) == {"s0": 2, "s1": 7}
    with pytest.raises(Exception, match=r"input 'mask' of shape \(2, 8\): its size s1 must equal 7"):
        bind(graph, [(2, 7), (2, 8)])
    with pytest.raises(Exception, match="input 'tokens' has shape"):
        bind(graph, [(2, 7, 1), (2, 7)])


def test_a_symbolic_graph_survives_serialization() -> None:
    model = _same_padded_cnn()
    inputs = model_inputs(model, None, 1)
    graph = import_model(model, inputs.specs, hints=inputs.hints)
    data, tensors = graph_to_json(graph)
    again = graph_from_json(data, tensors)
    verify(again)
    assert [v.shape for v in again.values()] == [v.shape for v in graph.values()]
    assert again.meta[GUARDS] == graph.meta[GUARDS]
