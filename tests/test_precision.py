"""Precision modes and compiled engines, on the CPU: FP16/BF16 lowering in the graph, numerics
against Keras FP32 within each precision's tolerance, TorchInductor engines, artifacts."""

from __future__ import annotations

from collections import Counter

import keras
import numpy as np
import pytest
import torch
from keras import layers as L

import kerasrt
from kerasrt.backend.torch_backend import TorchEngine
from kerasrt.ir.graph import Graph, torch_dtype, verify
from kerasrt.passes.precision import FP32_OPS, lower_precision
from kerasrt.settings import PRECISION_RTOL
from kerasrt_testing import assert_close, keras_reference, random_input, randomize


def mixed_model() -> keras.Model:
    """Conv + BN, dense, layer norm, attention, pooling, softmax: every kind of op the
    precision rules treat differently."""
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = L.BatchNormalization()(x)
    x = L.Reshape((64, 8))(x)
    x = L.LayerNormalization()(x)
    x = L.MultiHeadAttention(2, 4)(x, x)
    x = L.GlobalAveragePooling1D()(x)
    return randomize(keras.Model(inp, L.Dense(5, activation="softmax")(L.Dense(10, activation="gelu")(x))))


def test_lowering_converts_weights_once_and_keeps_sensitive_ops_in_fp32() -> None:
    g = Graph()
    x = g.add_input("x", (2, 4, 6), "float32")
    w = g.add_constant("w", torch.randn(6, 5))
    y = g.add_node("matmul", [x, w]).outputs[0]
    y = g.add_node("relu", [y]).outputs[0]
    s = g.add_node("softmax", [y], {"dim": 2}).outputs[0]
    m = g.add_node("reduce_mean", [y], {"dims": [1], "keepdim": False}).outputs[0]
    g.outputs = [s, m]
    inputs = [torch.randn(2, 4, 6)]
    before = TorchEngine(g.nodes, g.inputs, g.outputs, torch.device("cpu"))(*inputs)
    fired = lower_precision(g, "FP16")
    verify(g)
    dtypes = {n.op: n.outputs[0].dtype for n in g.nodes if n.op != "cast"}
    assert dtypes == {"matmul": "float16", "relu": "float16", "softmax": "float32", "reduce_mean": "float32"}
    assert [c.dtype for c in g.constants.values() if c.users] == ["float16"]  # the weight, once
    assert fired["constants_converted"] == 1
    # the input is staged (taken in FP16, no cast down); one shared cast up feeding both fp32
    # ops (CSE); none at the outputs
    assert [v.dtype for v in g.inputs] == ["float16"] and fired["inputs_staged"] == 1
    assert Counter(n.attrs["dtype"] for n in g.nodes if n.op == "cast") == {"float32": 1}
    assert [v.dtype for v in g.outputs] == ["float32", "float32"]
    after = TorchEngine(g.nodes, g.inputs, g.outputs, torch.device("cpu"))(inputs[0].half())
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    assert {"softmax", "layer_norm", "reduce_sum"} <= FP32_OPS


def test_an_input_staged_only_where_every_reader_casts_it_down() -> None:
    g = Graph()
    staged = g.add_input("staged", (2, 3), "float32")
    sensitive = g.add_input("sensitive", (2, 3), "float32")  # also read by an fp32 op
    ids = g.add_input("ids", (2, 3), "int64")
    passed = g.add_input("passed", (2, 3), "float32")  # a graph output as it is
    a = g.add_node("relu", [staged]).outputs[0]
    b = g.add_node("add", [a, g.add_node("relu", [sensitive]).outputs[0]]).outputs[0]
    s = g.add_node("softmax", [sensitive], {"dim": 1}).outputs[0]
    c = g.add_node("cast", [ids], {"dtype": "float32"}).outputs[0]
    g.outputs = [g.add_node("add", [b, c]).outputs[0], s, g.add_node("relu", [passed]).outputs[0], passed]
    inputs = [torch.randn(2, 3), torch.randn(2, 3), torch.arange(6).reshape(2, 3), torch.randn(2, 3)]
    before = TorchEngine(g.nodes, g.inputs, g.outputs, torch.device("cpu"))(*inputs)
    fired = lower_precision(g, "FP16")
    verify(g)
    assert [v.dtype for v in g.inputs] == ["float16", "float32", "int64", "float32"]
    assert fired["inputs_staged"] == 1
    assert not any(n.op == "cast" and n.inputs[0] is g.inputs[0] for n in g.nodes)
    staged_inputs = [t.to(torch_dtype(v.dtype)) for t, v in zip(inputs, g.inputs)]
    after = TorchEngine(g.nodes, g.inputs, g.outputs, torch.device("cpu"))(*staged_inputs)
    for x, y in zip(after, before):
        torch.testing.assert_close(x, y, rtol=1e-2, atol=1e-2)


def test_fallback_layers_get_their_traced_dtypes() -> None:
    g = Graph()
    x = g.add_input("x", (2, 3), "float32")
    y = g.add_node("relu", [x]).outputs[0]
    k = g.add_node(
        "keras_layer", [y], {"layer": "k", "reason": "test", "call": {}}, output_types=[((2, 3), "float32")]
    )
    g.outputs = [g.add_node("relu", [k.outputs[0]]).outputs[0]]
    lower_precision(g, "BF16")
    verify(g)
    (fallback,) = [n for n in g.nodes if n.op == "keras_layer"]
    assert [v.dtype for v in fallback.inputs] == ["float32"]  # cast back up before Keras runs it
    assert g.outputs[0].dtype == "float32"


@pytest.mark.parametrize("precision", ["FP16", "BF16", "TF32"])
def test_reduced_precision_matches_keras_fp32_within_its_tolerance(precision: str) -> None:
    model = mixed_model()
    x = random_input((2, 8, 8, 3))
    optimized = kerasrt.Converter(model, precision_mode=precision, input_shapes=[x.shape]).convert()
    got = optimized(x)
    ref = keras_reference(model, [x])[0]
    assert got.dtype == np.float32
    assert_close(got, ref, rtol=PRECISION_RTOL[precision])
    graph = optimized.primary_graph()
    if precision != "TF32":
        low = {"FP16": "float16", "BF16": "bfloat16"}[precision]
        compute = Counter(
            n.outputs[0].dtype for n in graph.nodes if n.op in ("linear", "conv_fused", "attention")
        )
        assert set(compute) == {low}, compute
        assert all(n.outputs[0].dtype == "float32" for n in graph.nodes if n.op in ("softmax", "layer_norm"))
        assert graph.meta["precision"]["mode"] == precision


def test_inductor_engines_match_and_survive_an_artifact_round_trip(tmp_path) -> None:
    model = mixed_model()
    x = random_input((2, 8, 8, 3))
    conv = kerasrt.Converter(model, precision_mode="FP16", input_shapes=[x.shape], compiler="inductor")
    optimized = conv.convert()
    eager = kerasrt.Converter(
        model, precision_mode="FP16", input_shapes=[x.shape], compiler="eager"
    ).convert()
    compiled_out = optimized(x)
    assert_close(compiled_out, eager(x), rtol=PRECISION_RTOL["FP16"])
    engine = optimized.program(optimized.engine_shapes[0]).steps[0][0]
    assert engine.compiler == "inductor" and engine._run is not engine.module
    path = conv.save(tmp_path / "m_krt")
    loaded = kerasrt.load(path)
    assert loaded.settings.compiler == "inductor" and loaded.settings.precision_mode == "FP16"
    weights = [c for c in loaded.primary_graph().constants.values() if c.data.dim() >= 2]
    assert weights and all(c.dtype == "float16" for c in weights)  # stored converted, once
    np.testing.assert_allclose(loaded(x), compiled_out, rtol=1e-3, atol=1e-3 * np.abs(compiled_out).max())


def test_unknown_precision_and_compiler_are_refused() -> None:
    with pytest.raises(kerasrt.ConversionError, match="precision_mode 'INT4' is not supported"):
        kerasrt.ConversionSettings(precision_mode="INT4")
    with pytest.raises(kerasrt.ConversionError, match="compiler must be one of"):
        kerasrt.ConversionSettings(compiler="tensorrt")


def test_fp32_ops_can_be_told_otherwise() -> None:
    model = mixed_model()
    x = random_input((2, 8, 8, 3))
    optimized = kerasrt.Converter(
        model, precision_mode="FP16", input_shapes=[x.shape], fp32_ops=["softmax"]
    ).convert()
    graph = optimized.primary_graph()
    dtypes = {
        n.op: n.outputs[0].dtype for n in graph.nodes if n.op in ("softmax", "layer_norm", "reduce_mean")
    }
    assert dtypes == {"softmax": "float32", "layer_norm": "float16", "reduce_mean": "float16"}
    assert_close(optimized(x), keras_reference(model, [x])[0], rtol=PRECISION_RTOL["FP16"])
    with pytest.raises(kerasrt.ConversionError, match=r"fp32_ops names unknown IR op types: \['softmaxx'\]"):
        kerasrt.ConversionSettings(fp32_ops=["softmaxx"])
