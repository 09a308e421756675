"""IR invariants, shape inference, text dump and JSON round trip."""

from __future__ import annotations

import pytest
import torch

from kerasrt.errors import IRError
from kerasrt.ir.graph import Graph, Value, dump, verify
from kerasrt.ir.ops import OPS, infer_types
from kerasrt.ir.serialize import graph_from_json, graph_to_json


def small_graph() -> Graph:
    g = Graph()
    x = g.add_input("x", (2, 3, 8, 8), "float32")
    w = g.add_constant("w", torch.randn(4, 3, 3, 3))
    b = g.add_constant("b", torch.randn(4))
    conv = g.add_node(
        "conv",
        [x, w, b],
        {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1},
        layer="conv",
    )
    relu = g.add_node("relu", conv.outputs, layer="conv")
    pooled = g.add_node("reduce_mean", relu.outputs, {"dims": [2, 3], "keepdim": False}, layer="gap")
    g.outputs = list(pooled.outputs)
    return g


def test_values_know_producer_and_users() -> None:
    g = small_graph()
    conv, relu, pool = g.nodes
    assert conv.outputs[0].producer is conv
    assert conv.outputs[0].users == [relu]
    assert g.inputs[0].users == [conv]
    assert pool.outputs[0].shape == (2, 4)
    verify(g)


def test_shape_inference_uses_the_reference_impl() -> None:
    x = Value("x", (1, 16, 9, 9), "float32")
    ((shape, dtype),) = infer_types(
        "max_pool",
        [x],
        {"kernel": [3, 3], "stride": [2, 2], "padding": [0, 0], "dilation": [1, 1], "ceil_mode": True},
    )
    assert shape == (1, 16, 4, 4) and dtype == "float32"
    ((shape, dtype),) = infer_types("lt", [x, Value("y", (), "float32")], {})
    assert dtype == "bool"


def test_invalid_op_use_is_reported() -> None:
    g = Graph()
    x = g.add_input("x", (2, 3), "float32")
    y = g.add_input("y", (4, 5), "float32")
    with pytest.raises(IRError, match="matmul"):
        g.add_node("matmul", [x, y])


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda g: g.nodes.reverse(), "not defined before"),
        (lambda g: g.nodes[1].inputs[0].users.clear(), "does not list"),
        (lambda g: g.nodes[0].attrs.update(bogus=1), "undeclared attributes"),
        (lambda g: setattr(g.nodes[1].outputs[0], "shape", (1, 2)), "infers"),
        (lambda g: setattr(g.nodes[2], "op", "no_such_op"), "unknown op"),
        (lambda g: g.outputs.append(Value("ghost", (1,), "float32")), "not defined"),
    ],
)
def test_verify_catches_broken_invariants(breakage, message) -> None:
    g = small_graph()
    breakage(g)
    with pytest.raises(IRError, match=message):
        verify(g)


def test_dump_is_readable() -> None:
    text = dump(small_graph())
    lines = text.splitlines()
    assert lines[0] == "graph(%x: f32[2,3,8,8]) -> (%reduce_mean)"
    assert "  @w: f32[4,3,3,3]" in lines
    assert (
        "  %conv: f32[2,4,8,8] = conv(%x, @w, @b) {stride=[1,1], padding=[1,1], dilation=[1,1], groups=1}  # conv"
        in lines
    )


def test_json_round_trip_preserves_graph() -> None:
    g = small_graph()
    data, tensors = graph_to_json(g)
    g2 = graph_from_json(data, tensors)
    verify(g2)
    assert dump(g2) == dump(g)


def test_remove_unused_drops_dead_nodes() -> None:
    g = small_graph()
    dead = g.add_node("sigmoid", [g.inputs[0]])
    assert g.remove_unused() == 1
    assert dead not in g.nodes and dead not in g.inputs[0].users
    verify(g)


def test_every_op_declares_a_reference_impl() -> None:
    for name, opdef in OPS.items():
        assert callable(opdef.impl), name
        assert opdef.category, name
