"""The optimizer on real models: structural claims, output subsets, partition shapes."""

from __future__ import annotations

from collections import Counter

import keras
import numpy as np
import pytest
from keras import layers as L

import kerasrt
from kerasrt.compile.partition import Support, partition
from kerasrt.ir.graph import Graph, Node, Value
from kerasrt.report import format_report, make_report
from kerasrt_testing import convert_and_check, fallbacks, random_input, randomize


def ops(optimized) -> Counter:
    return Counter(n.op for n in optimized.primary_graph().nodes)


def test_resnet50_has_no_batch_norm_and_every_conv_carries_bias_and_relu() -> None:
    model = randomize(
        keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classifier_activation=None)
    )
    optimized = convert_and_check(model, [random_input((2, 32, 32, 3))])
    counts = ops(optimized)
    assert not {"sub", "mul", "add", "relu", "batch_norm"} & set(counts), counts
    assert counts["pad"] == 1  # conv1_pad folded into conv1; pool1_pad stays (max pool pads with -inf)
    convs = [n for n in optimized.primary_graph().nodes if n.op in ("conv", "conv_fused")]
    assert len(convs) == 53 and all(len(n.inputs) >= 3 for n in convs)  # every conv has its bias
    with_relu = [n for n in convs if n.attrs.get("activation") == "relu"]
    assert len(with_relu) == 49  # every ReLU of the model lives in a conv epilogue
    assert sum(n.attrs.get("has_residual", False) for n in convs) == 16  # and every residual add
    assert counts["permute"] == 1
    rules = optimized.primary_graph().meta["optimization"]["rules"]
    assert rules["fold_scale_into_weights"] == 53 and rules["fuse_residual_add"] == 16


def test_inception_parallel_1x1_convs_are_aggregated() -> None:
    model = randomize(
        keras.applications.InceptionV3(weights=None, input_shape=(75, 75, 3), classifier_activation=None)
    )
    optimized = convert_and_check(model, [random_input((2, 75, 75, 3))])
    rules = optimized.primary_graph().meta["optimization"]["rules"]
    assert rules["horizontal_fusion"] >= 10
    convs = sum(n.op in ("conv", "conv_fused") for n in optimized.primary_graph().nodes)
    assert convs == 94 - rules["horizontal_fusion"]


def test_attention_qkv_projections_become_one_linear() -> None:
    inp = keras.Input((16, 64))
    x = L.MultiHeadAttention(4, 16)(inp, inp)
    x = L.LayerNormalization()(L.Add()([inp, x]))
    model = randomize(keras.Model(inp, L.Dense(64, activation="gelu")(x)))
    optimized = convert_and_check(model, [random_input((2, 16, 64))])
    linears = [n for n in optimized.primary_graph().nodes if n.op == "linear"]
    assert sorted(n.outputs[0].shape[-1] for n in linears) == [64, 64, 192]  # Q, K and V in one
    counts = ops(optimized)
    assert counts["attention"] == 1 and counts["matmul"] == 0 and counts["permute"] <= 4, counts


def test_summary_reports_fusions_and_sizes() -> None:
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same")(inp)
    x = L.BatchNormalization()(x)
    model = randomize(keras.Model(inp, L.ReLU()(x)))
    conv = kerasrt.Converter(model, batch_size=2)
    conv.convert()
    text = conv.summary(print_fn=None)
    assert "optimizer (level 2): 8 -> 3 ops" in text  # permute, conv+bias+BN+relu, permute back
    assert "fold_scale_into_weights x1" in text and "fuse_activation x1" in text
    assert "100.0% in engines" in text


def test_requested_output_subset_drops_dead_branches() -> None:
    inp = keras.Input((6,))
    a = L.Dense(4, name="a")(inp)
    b = L.Dense(3, name="b")(L.Dense(5, name="hidden")(inp))
    model = randomize(keras.Model(inp, {"a": a, "b": b}))
    optimized = kerasrt.Converter(model, batch_size=2, outputs=["a"]).convert()
    layers = {n.layer for n in optimized.primary_graph().nodes}
    assert layers == {"a"}
    x = random_input((2, 6))
    np.testing.assert_allclose(optimized(x), keras.ops.convert_to_numpy(model(x)["a"]), rtol=1e-5, atol=1e-6)
    with pytest.raises(kerasrt.ConversionError, match="no output 'c'"):
        kerasrt.Converter(model, outputs=["c"]).convert()


def test_levels_give_the_same_outputs() -> None:
    model = randomize(
        keras.applications.MobileNetV3Small(weights=None, input_shape=(32, 32, 3), classifier_activation=None)
    )
    x = random_input((2, 32, 32, 3))
    converted = [
        kerasrt.Converter(model, batch_size=2, optimization_level=lvl).convert() for lvl in (0, 1, 2)
    ]
    results = [m(x) for m in converted]
    sizes = [len(m.primary_graph().nodes) for m in converted]
    assert sizes[2] < sizes[1] < sizes[0] and sizes[2] < sizes[0] / 2
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=1e-4, atol=1e-4 * np.abs(results[0]).max())


def _chain(kinds: str) -> Graph:
    """A chain of relu nodes, with 'F' marking a Keras fallback node and 'N' a node kept out of
    engines."""
    g = Graph()
    v: Value = g.add_input("x", (2, 3), "float32")
    for i, k in enumerate(kinds):
        if k == "F":
            node = g.add_node(
                "keras_layer",
                [v],
                {"layer": f"f{i}", "reason": "test", "call": {}},
                layer=f"f{i}",
                output_types=[((2, 3), "float32")],
            )
        else:
            node = g.add_node("relu", [v], layer=f"{'n' if k == 'N' else 'r'}{i}")
        v = node.outputs[0]
    g.outputs = [v]
    return g


def _supported(node: Node) -> Support:
    if node.layer.startswith("n"):  # kept out of engines, runs op by op
        return Support(False, "excluded", native=True)
    return Support(node.op != "keras_layer", "runs in Keras")


@pytest.mark.parametrize(
    "kinds, minimum, expected",
    [
        ("RRRRR", 3, ["engine:5"]),
        ("RRRFRRR", 3, ["engine:3", "fallback:1", "engine:3"]),
        ("RRFRRRR", 3, ["native:2", "fallback:1", "engine:4"]),
        ("RFR", 1, ["engine:1", "fallback:1", "engine:1"]),
        ("FF", 3, ["fallback:1", "fallback:1"]),
        ("RRRNRRR", 3, ["engine:3", "native:1", "engine:3"]),
    ],
)
def test_partition_names_the_expected_segments(kinds: str, minimum: int, expected: list[str]) -> None:
    segments = partition(_chain(kinds), _supported, minimum)
    assert [f"{s.kind}:{len(s.nodes)}" for s in segments] == expected
    assert segments[-1].outputs and all(s.inputs for s in segments)


def test_fallback_in_the_middle_gives_two_engines() -> None:
    from test_models import HostRoundTrip

    inp = keras.Input((4, 4, 2))
    x = L.Conv2D(4, 3, padding="same", activation="relu")(L.Conv2D(4, 3, padding="same")(inp))
    x = HostRoundTrip(name="host")(L.Reshape((16, 4))(x))
    x = L.Dense(3)(L.Dense(8, activation="relu")(L.Flatten()(x)))
    model = randomize(keras.Model(inp, L.Softmax()(L.Dense(3)(x))))
    optimized = convert_and_check(
        model, [random_input((2, 4, 4, 2))], allow_fallback=True, minimum_segment_size=2
    )
    assert [n.layer for n in fallbacks(optimized)] == ["host"]
    kinds = [s.kind for s in optimized.program(optimized.engine_shapes[0]).segments]
    assert kinds == ["engine", "fallback", "engine"]


def test_keep_in_keras_takes_op_types_and_refuses_unknown_names() -> None:
    inp = keras.Input((16, 32))
    x = L.MultiHeadAttention(2, 16)(inp, inp)
    model = randomize(keras.Model(inp, L.Dense(8, activation="relu")(x)))
    optimized = convert_and_check(
        model, [random_input((2, 16, 32))], allow_fallback=True, keep_in_keras=["attention"]
    )
    segments = optimized.program(optimized.engine_shapes[0]).segments
    assert [(s.kind, [n.op for n in s.nodes][:1]) for s in segments if s.kind != "engine"] == [
        ("native", ["attention"])
    ]
    assert "kept out of engines" in segments[[s.kind for s in segments].index("native")].reason
    assert "1 native segment(s), 0 Keras fallback(s)" in format_report(make_report(optimized))
    assert [s.kind for s in segments].count("engine") == 2
    with pytest.raises(kerasrt.ConversionError, match=r"names no layer.*\['no_such_layer'\]"):
        kerasrt.Converter(model, keep_in_keras=["no_such_layer"]).convert()
