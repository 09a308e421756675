"""Each optimizer rule on a tiny graph: how often it fires, which ops remain, and that the
outputs do not change (fresh random inputs); plus the cases where a rule must not fire."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from kerasrt.backend.torch_backend import TorchEngine
from kerasrt.ir.graph import Graph, Value, verify
from kerasrt.passes import LEVELS, optimize
from kerasrt.passes.algebra import ALGEBRA
from kerasrt.passes.base import Pass, PassManager
from kerasrt.passes.fusion import HORIZONTAL, VERTICAL
from kerasrt.passes.layout import LAYOUT
from kerasrt.passes.structural import CSE, STRUCTURAL

CONV = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1}
LINEAR = {"has_bias": True, "has_residual": False, "activation": None, "activation_attrs": None}
gen = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def run(graph: Graph, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(TorchEngine(graph.nodes, graph.inputs, graph.outputs, torch.device("cpu"))(*inputs))


def apply(graph: Graph, *passes: Pass) -> tuple[Counter, Counter]:
    """Run ``passes`` with verification; assert outputs are unchanged; return (fired, ops)."""
    inputs = [torch.randn(v.shape, generator=gen) for v in graph.inputs]
    before = run(graph, inputs)
    result = PassManager(passes, check=True).run(graph)
    verify(graph)
    for a, b in zip(before, run(graph, inputs)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    return result.counts, Counter(n.op for n in graph.nodes)


def nhwc_conv(g: Graph, x: Value, cout: int, cin: int, bias: bool = True, k: int = 3) -> Value:
    """What the frontend makes of a Keras Conv2D: permute, conv, permute back, bias add."""
    t = g.add_node("permute", [x], {"dims": [0, 3, 1, 2]}).outputs[0]
    pad = k // 2
    y = g.add_node(
        "conv", [t, g.add_constant("w", rand(cout, cin, k, k))], {**CONV, "padding": [pad, pad]}
    ).outputs[0]
    y = g.add_node("permute", [y], {"dims": [0, 2, 3, 1]}).outputs[0]
    if bias:
        y = g.add_node("add", [y, g.add_constant("b", rand(1, 1, 1, cout))]).outputs[0]
    return y


def keras_bn(g: Graph, x: Value, c: int, axis_shape: tuple[int, ...] | None = None) -> Value:
    """Keras's inference batch norm as traced: (x - mean) * scale + beta."""
    shape = axis_shape or (1, 1, 1, c)
    y = g.add_node("sub", [x, g.add_constant("mean", rand(*shape))]).outputs[0]
    y = g.add_node("mul", [y, g.add_constant("scale", rand(*shape).abs() + 0.5)]).outputs[0]
    return g.add_node("add", [y, g.add_constant("beta", rand(*shape))]).outputs[0]


def graph_with_input(*shape: int) -> tuple[Graph, Value]:
    g = Graph()
    return g, g.add_input("x", shape, "float32")


def test_remove_noops() -> None:
    g, x = graph_with_input(2, 3, 4)
    y = g.add_node("reshape", [x], {"shape": [2, 3, 4]}).outputs[0]
    y = g.add_node("cast", [y], {"dtype": "float32"}).outputs[0]
    y = g.add_node("permute", [y], {"dims": [0, 1, 2]}).outputs[0]
    y = g.add_node("pad", [y], {"pads": [0, 0], "mode": "constant", "value": 0.0}).outputs[0]
    y = g.add_node("reshape", [y], {"shape": [6, 4]}).outputs[0]  # a real reshape stays
    g.outputs = [g.add_node("relu", [y]).outputs[0]]
    fired, ops = apply(g, STRUCTURAL)
    assert fired["remove_noop"] == 4
    assert ops == Counter({"reshape": 1, "relu": 1})


def test_permutes_cancel_and_compose() -> None:
    g, x = graph_with_input(2, 3, 4, 5)
    a = g.add_node("permute", [x], {"dims": [0, 2, 3, 1]}).outputs[0]
    b = g.add_node("permute", [a], {"dims": [0, 3, 1, 2]}).outputs[0]  # inverse: vanishes
    c = g.add_node("permute", [x], {"dims": [1, 0, 2, 3]}).outputs[0]
    d = g.add_node("permute", [c], {"dims": [0, 1, 3, 2]}).outputs[0]  # composes into one
    g.outputs = [g.add_node("relu", [b]).outputs[0], g.add_node("relu", [d]).outputs[0]]
    fired, ops = apply(g, STRUCTURAL)
    assert fired["merge_permutes"] == 2
    assert ops["permute"] == 1 and g.nodes[0].attrs["dims"] == [1, 0, 3, 2]


def test_permute_of_unit_dims_becomes_a_reshape() -> None:
    g, x = graph_with_input(1, 6, 4)
    a = g.add_node("reshape", [x], {"shape": [1, 6, 4, 1]}).outputs[0]
    b = g.add_node("permute", [a], {"dims": [3, 1, 0, 2]}).outputs[0]  # unit dims move only
    c = g.add_node("reshape", [b], {"shape": [6, 4]}).outputs[0]
    d = g.add_node("permute", [x], {"dims": [0, 2, 1]}).outputs[0]  # 6 and 4 swap: stays
    g.outputs = [g.add_node("relu", [c]).outputs[0], g.add_node("relu", [d]).outputs[0]]
    fired, ops = apply(g, STRUCTURAL)
    assert fired["unit_permute_to_reshape"] == 1
    assert ops == Counter({"reshape": 1, "permute": 1, "relu": 2})  # the chain is one reshape


def test_constant_folding_and_its_limit() -> None:
    g, x = graph_with_input(4)
    c = g.add_node("add", [g.add_constant("a", rand(4)), g.add_constant("b", rand(4))]).outputs[0]
    g.outputs = [g.add_node("mul", [x, c]).outputs[0]]
    fired, ops = apply(g, STRUCTURAL)
    assert fired["fold_constants"] == 1 and ops == Counter({"mul": 1})
    g2, x2 = graph_with_input(64)
    big = g2.add_node("expand", [g2.add_constant("s", rand(1, 1))], {"shape": [4096, 64]}).outputs[0]
    g2.outputs = [g2.add_node("add", [big, x2]).outputs[0]]
    fired, _ = apply(g2, STRUCTURAL)
    assert fired["fold_constants"] == 0  # would store a far larger constant


def test_common_subexpressions() -> None:
    g, x = graph_with_input(2, 6)
    a = g.add_node("softmax", [x], {"dim": 1}).outputs[0]
    b = g.add_node("softmax", [x], {"dim": 1}).outputs[0]
    c = g.add_node("softmax", [x], {"dim": 0}).outputs[0]  # different attrs: kept
    s1 = g.add_node("mul", [a, g.add_constant("two", torch.tensor(2.0))]).outputs[0]
    s2 = g.add_node("mul", [b, g.add_constant("two_again", torch.tensor(2.0))]).outputs[0]
    g.outputs = [g.add_node("add", [g.add_node("add", [s1, s2]).outputs[0], c]).outputs[0]]
    fired, ops = apply(g, CSE)
    assert fired["common_subexpression"] == 2 and fired["dedupe_constants"] == 1
    assert ops == Counter({"softmax": 2, "mul": 1, "add": 2})


def test_layout_cleanup_removes_permutes_between_convs() -> None:
    g, x = graph_with_input(2, 8, 8, 3)
    y = nhwc_conv(g, x, 4, 3)
    y = g.add_node("relu", [y]).outputs[0]
    y = nhwc_conv(g, y, 5, 4)
    g.outputs = [g.add_node("reduce_mean", [y], {"dims": [1, 2], "keepdim": False}).outputs[0]]
    fired, ops = apply(g, STRUCTURAL, LAYOUT)
    assert ops["permute"] == 1  # only the model input's NHWC -> NCHW remains
    assert fired["sink_permute_elementwise"] >= 3 and fired["sink_permute_reduce"] == 1


def test_layout_does_not_sink_through_mixed_layouts() -> None:
    g, x = graph_with_input(2, 4, 4, 4)
    p = g.add_node("permute", [x], {"dims": [0, 3, 1, 2]}).outputs[0]
    g.outputs = [g.add_node("add", [p, g.add_input("y", (2, 4, 4, 4), "float32")]).outputs[0]]
    fired, ops = apply(g, LAYOUT)
    assert fired["sink_permute_elementwise"] == 0 and ops["add"] == 1


def test_batch_norm_folds_into_conv() -> None:
    g, x = graph_with_input(2, 8, 8, 3)
    y = keras_bn(g, nhwc_conv(g, x, 6, 3), 6)
    g.outputs = [g.add_node("relu", [y]).outputs[0]]
    fired, ops = apply(g, STRUCTURAL, LAYOUT, ALGEBRA)
    assert fired["fold_scale_into_weights"] == 1 and fired["fold_shift_into_bias"] >= 1
    assert ops == Counter({"permute": 2, "conv": 1, "relu": 1})


def test_batch_norm_on_another_axis_is_not_folded() -> None:
    g, x = graph_with_input(2, 6, 6, 3)
    conv = nhwc_conv(g, x, 6, 3, bias=False)
    g.outputs = [keras_bn(g, conv, 6, axis_shape=(1, 6, 1, 1))]  # statistics over H, not channels
    fired, ops = apply(g, STRUCTURAL, LAYOUT, ALGEBRA)
    assert fired["fold_scale_into_weights"] == 0 and ops["mul"] == 1


def test_conv_output_used_elsewhere_is_not_folded_or_fused() -> None:
    g, x = graph_with_input(2, 6, 6, 3)
    conv = nhwc_conv(g, x, 4, 3)
    bn = keras_bn(g, conv, 4)
    g.outputs = [g.add_node("relu", [bn]).outputs[0], conv]
    fired, ops = apply(g, STRUCTURAL, LAYOUT, ALGEBRA, VERTICAL)
    assert fired["fold_scale_into_weights"] == 0 and fired["fuse_activation"] == 0
    assert ops["relu"] == 1


def test_vertical_fusion_conv_bias_residual_relu() -> None:
    g, x = graph_with_input(2, 4, 6, 6)
    w, b = g.add_constant("w", rand(4, 4, 3, 3)), g.add_constant("b", rand(4))
    y = g.add_node("conv", [x, w, b], CONV).outputs[0]
    y = g.add_node("add", [y, x]).outputs[0]
    g.outputs = [g.add_node("relu", [y]).outputs[0]]
    fired, _ = apply(g, VERTICAL)
    assert fired == Counter({"fuse_residual_add": 1, "fuse_activation": 1})
    (node,) = g.nodes
    assert node.op == "conv_fused" and node.attrs["activation"] == "relu" and node.attrs["has_residual"]


def test_linear_bias_and_gelu() -> None:
    g, x = graph_with_input(3, 5, 8)
    y = g.add_node("matmul", [x, g.add_constant("w", rand(8, 6))]).outputs[0]
    y = g.add_node("add", [y, g.add_constant("b", rand(6))]).outputs[0]
    g.outputs = [g.add_node("gelu", [y], {"approximate": "tanh"}).outputs[0]]
    fired, ops = apply(g, VERTICAL)
    assert fired == Counter({"fuse_linear_bias": 1, "fuse_activation": 1})
    assert ops == Counter({"linear": 1}) and g.nodes[0].attrs["activation_attrs"] == {"approximate": "tanh"}


def test_residual_add_after_a_dense_on_3d_input_joins_the_linear() -> None:
    """ConvNeXt's and transformers' x + Dense(h): the add reads the Dense's closing reshape;
    the residual is reshaped to the linear's rows and added in its epilogue."""
    g, x = graph_with_input(2, 5, 8)
    rows = g.add_node("reshape", [x], {"shape": [10, 8]}).outputs[0]
    y = g.add_node("linear", [rows, g.add_constant("w", rand(8, 8)), g.add_constant("b", rand(8))], LINEAR)
    y = g.add_node("reshape", [y.outputs[0]], {"shape": [2, 5, 8]}).outputs[0]
    g.outputs = [g.add_node("add", [x, y]).outputs[0]]
    fired, ops = apply(g, VERTICAL)
    assert fired == Counter({"fuse_residual_add": 1})
    (linear,) = [n for n in g.nodes if n.op == "linear"]
    assert linear.attrs["has_residual"] and linear.inputs[3].producer.op == "reshape"
    assert ops == Counter({"reshape": 3, "linear": 1})


def test_a_linear_with_an_activation_keeps_the_add_apart() -> None:
    g, x = graph_with_input(4, 8)
    attrs = {**LINEAR, "activation": "relu"}
    y = g.add_node("linear", [x, g.add_constant("w", rand(8, 8)), g.add_constant("b", rand(8))], attrs)
    g.outputs = [g.add_node("add", [y.outputs[0], x]).outputs[0]]
    fired, ops = apply(g, VERTICAL)
    assert not fired and ops == Counter({"linear": 1, "add": 1})


def test_zero_pad_folds_into_conv_only_when_symmetric() -> None:
    for pads, folds in [([1, 1, 2, 2], True), ([1, 1, 1, 2], False)]:  # (W left, W right, H top, H bottom)
        g, x = graph_with_input(1, 3, 8, 8)
        p = g.add_node("pad", [x], {"pads": pads, "mode": "constant", "value": 0.0}).outputs[0]
        g.outputs = [
            g.add_node(
                "conv", [p, g.add_constant("w", rand(2, 3, 3, 3))], {**CONV, "padding": [0, 0]}
            ).outputs[0]
        ]
        fired, ops = apply(g, VERTICAL)
        assert (fired["fold_pad_into_conv"] == 1) == folds and ("pad" in ops) != folds


def test_horizontal_fusion_of_sibling_convs() -> None:
    g, x = graph_with_input(2, 8, 5, 5)
    outs = []
    for i, cout in enumerate([3, 4, 5]):
        w, b = g.add_constant(f"w{i}", rand(cout, 8, 1, 1)), g.add_constant(f"b{i}", rand(cout))
        y = g.add_node("conv", [x, w, b], {**CONV, "padding": [0, 0]}).outputs[0]
        outs.append(g.add_node("relu", [y]).outputs[0])
    strided = g.add_node(
        "conv", [x, g.add_constant("ws", rand(2, 8, 1, 1))], {**CONV, "padding": [0, 0], "stride": [2, 2]}
    ).outputs[0]  # different stride
    g.outputs = [*outs, strided]
    fired, ops = apply(g, VERTICAL, HORIZONTAL)
    assert fired["horizontal_fusion"] == 2
    assert ops == Counter({"conv_fused": 1, "slice": 3, "conv": 1})


def test_horizontal_fusion_of_qkv_projections() -> None:
    g, x = graph_with_input(2, 7, 16)
    outs = []
    for i in range(3):
        y = g.add_node("matmul", [x, g.add_constant(f"w{i}", rand(16, 16))]).outputs[0]
        outs.append(g.add_node("add", [y, g.add_constant(f"b{i}", rand(16))]).outputs[0])
    g.outputs = outs
    fired, ops = apply(g, VERTICAL, HORIZONTAL)
    assert fired["horizontal_fusion"] == 2 and ops == Counter({"linear": 1, "slice": 3})


def test_levels_are_data_and_level_zero_changes_nothing() -> None:
    assert LEVELS[0] == () and set(LEVELS[1]) <= set(LEVELS[2])
    g, x = graph_with_input(2, 3)
    g.outputs = [g.add_node("reshape", [x], {"shape": [2, 3]}).outputs[0]]
    assert not optimize(g, 0).modified and len(g.nodes) == 1
    assert optimize(g, 1).counts["remove_noop"] == 1 and not g.nodes
    with pytest.raises(ValueError, match="optimization level"):
        optimize(g, 7)


def _bn_before(conv_padding: list[int]) -> Graph:
    """relu -> scale/shift (a BN after the activation) -> conv: BN folds forward."""
    g, x = graph_with_input(2, 3, 6, 6)
    y = g.add_node("relu", [x]).outputs[0]
    y = g.add_node("mul", [y, g.add_constant("s", rand(1, 3, 1, 1))]).outputs[0]
    y = g.add_node("add", [y, g.add_constant("t", rand(1, 3, 1, 1))]).outputs[0]
    w, b = g.add_constant("w", rand(4, 3, 3, 3)), g.add_constant("b", rand(4))
    g.outputs = [g.add_node("conv", [y, w, b], {**CONV, "padding": conv_padding}).outputs[0]]
    return g


def test_batch_norm_folds_into_the_following_conv_where_valid() -> None:
    fired, ops = apply(_bn_before([0, 0]), ALGEBRA)
    assert fired["fold_scale_into_next"] == 1 and fired["fold_shift_into_next"] == 1
    assert ops == Counter({"relu": 1, "conv": 1})
    # with padding the shift cannot move (the padding would see shifted zeros), and the
    # scale sits behind the shift, so nothing folds
    fired, ops = apply(_bn_before([1, 1]), ALGEBRA)
    assert fired["fold_scale_into_next"] == 0 and fired["fold_shift_into_next"] == 0
    assert ops == Counter({"relu": 1, "mul": 1, "add": 1, "conv": 1})


def test_scale_shift_folds_into_the_following_matmul() -> None:
    g, x = graph_with_input(2, 5, 8)
    y = g.add_node("tanh", [x]).outputs[0]
    y = g.add_node("mul", [y, g.add_constant("s", rand(8))]).outputs[0]
    y = g.add_node("add", [y, g.add_constant("t", rand(8))]).outputs[0]
    g.outputs = [g.add_node("matmul", [y, g.add_constant("w", rand(8, 3))]).outputs[0]]
    fired, ops = apply(g, ALGEBRA, VERTICAL)
    assert fired["fold_scale_into_next"] == 1 and fired["fold_shift_into_next"] == 1
    assert ops == Counter({"tanh": 1, "linear": 1})


def test_other_layout_rules() -> None:
    g, x = graph_with_input(2, 4, 5, 3)  # NHWC
    p = g.add_node("permute", [x], {"dims": [0, 3, 1, 2]}).outputs[0]
    a = g.add_node("softmax", [p], {"dim": 1}).outputs[0]
    b = g.add_node("permute", [g.add_input("y", (2, 4, 5, 3), "float32")], {"dims": [0, 3, 1, 2]}).outputs[0]
    c = g.add_node("concat", [a, b], {"dim": 1}).outputs[0]
    d = g.add_node("pad", [c], {"pads": [1, 1, 0, 2], "mode": "constant", "value": 0.0}).outputs[0]
    g.outputs = [g.add_node("permute", [d], {"dims": [0, 2, 3, 1]}).outputs[0]]
    fired, ops = apply(g, STRUCTURAL, LAYOUT)
    assert (
        fired["sink_permute_softmax"] == 1
        and fired["sink_permute_concat"] == 1
        and fired["sink_permute_pad"] == 1
    )
    assert ops == Counter({"softmax": 1, "concat": 1, "pad": 1})  # every permute cancelled


def test_softmax_and_concat_keep_permutes_they_cannot_pass() -> None:
    g, x = graph_with_input(2, 4, 5, 3)  # NHWC
    p = g.add_node("permute", [x], {"dims": [0, 3, 1, 2]}).outputs[0]
    y = g.add_input("y", (2, 3, 4, 5), "float32")  # already NCHW: not permuted at all
    mixed = g.add_node("concat", [p, y], {"dim": 1}).outputs[0]
    plain = g.add_node("softmax", [y], {"dim": 1}).outputs[0]
    g.outputs = [mixed, plain]
    fired, ops = apply(g, LAYOUT)
    assert fired["sink_permute_concat"] == 0 and fired["sink_permute_softmax"] == 0
    assert ops == Counter({"permute": 1, "concat": 1, "softmax": 1})


def test_pad_feeding_a_conv_pulls_the_permute_above_it() -> None:
    g, x = graph_with_input(1, 6, 6, 2)  # NHWC, as Keras's ZeroPadding2D before a Conv2D
    p = g.add_node("pad", [x], {"pads": [0, 0, 1, 1, 1, 1], "mode": "constant", "value": 0.0}).outputs[0]
    t = g.add_node("permute", [p], {"dims": [0, 3, 1, 2]}).outputs[0]
    w = g.add_constant("w", rand(3, 2, 3, 3))
    g.outputs = [g.add_node("conv", [t, w], {**CONV, "padding": [0, 0]}).outputs[0]]
    fired, ops = apply(g, LAYOUT, VERTICAL)
    assert fired["hoist_permute_over_pad"] == 1 and fired["fold_pad_into_conv"] == 1
    assert ops == Counter({"permute": 1, "conv": 1}) and g.nodes[-1].attrs["padding"] == [1, 1]


def test_reshape_chain_and_division_rules() -> None:
    g, x = graph_with_input(2, 12)
    y = g.add_node("reshape", [x], {"shape": [2, 3, 4]}).outputs[0]
    y = g.add_node("reshape", [y], {"shape": [6, 4]}).outputs[0]
    y = g.add_node("div", [y, g.add_constant("d", rand(4).abs() + 1)]).outputs[0]
    g.outputs = [g.add_node("relu", [y]).outputs[0]]
    fired, ops = apply(g, STRUCTURAL, ALGEBRA)
    assert fired["merge_reshapes"] == 1 and fired["div_to_mul"] == 1
    assert ops == Counter({"reshape": 1, "mul": 1, "relu": 1})


def test_dense_on_3d_input_fuses_through_its_reshapes() -> None:
    """Keras's Dense on (B, S, C) traces as reshape -> mm -> reshape -> bias add -> act."""
    g, x = graph_with_input(2, 5, 8)
    flat = g.add_node("reshape", [x], {"shape": [1, 10, 8]}).outputs[0]
    y = g.add_node("matmul", [flat, g.add_constant("w", rand(1, 8, 6))]).outputs[0]  # unit-batch weight
    y = g.add_node("reshape", [y], {"shape": [2, 5, 2, 3]}).outputs[0]
    y = g.add_node("add", [y, g.add_constant("b", rand(2, 3))]).outputs[0]  # bias over (heads, dim)
    g.outputs = [g.add_node("relu", [y]).outputs[0]]
    fired, ops = apply(g, STRUCTURAL, LAYOUT, VERTICAL)
    assert fired["drop_unit_batch_of_weight"] == 1 and fired["sink_reshape_elementwise"] == 2
    assert ops == Counter({"reshape": 2, "linear": 1})


def test_reshape_does_not_sink_when_the_constant_spans_other_dims() -> None:
    g, x = graph_with_input(2, 6)
    y = g.add_node("reshape", [x], {"shape": [2, 2, 3]}).outputs[0]
    g.outputs = [g.add_node("add", [y, g.add_constant("c", rand(2, 1))]).outputs[0]]
    fired, ops = apply(g, LAYOUT)
    assert fired["sink_reshape_elementwise"] == 0 and ops == Counter({"reshape": 1, "add": 1})


def _keras_attention(masked: bool, probs_fill: float = 0.0) -> tuple[Graph, list[torch.Tensor]]:
    """Keras's MultiHeadAttention as its einsums trace: scores = q @ k^T (heads folded into the
    batch), where(mask, scores, -1e9), softmax, where(mask, probs, fill), probs @ v."""
    b, h, sq, sk, d = 2, 3, 4, 5, 8
    g = Graph()
    q, kt, v = (
        g.add_input(n, s, "float32")
        for n, s in (("q", (b * h, sq, d)), ("kt", (b * h, d, sk)), ("v", (b * h, sk, d)))
    )
    s = g.add_node("reshape", [g.add_node("matmul", [q, kt]).outputs[0]], {"shape": [b, h, sq, sk]}).outputs[
        0
    ]
    inputs = [torch.randn(v.shape, generator=gen) for v in (q, kt, v)]
    if masked:
        mask = g.add_input("mask", (b, 1, 1, sk), "bool")
        s = g.add_node("where", [mask, s, g.add_constant("neg", torch.tensor(-1e9))]).outputs[0]
        inputs.append(torch.tensor([[True, True, False, True, False], [False] * 5]).reshape(b, 1, 1, sk))
    p = g.add_node("softmax", [s], {"dim": 3}).outputs[0]
    if masked:
        p = g.add_node("where", [mask, p, g.add_constant("fill", torch.tensor(probs_fill))]).outputs[0]
    p = g.add_node("reshape", [p], {"shape": [b * h, sq, sk]}).outputs[0]
    g.outputs = [g.add_node("matmul", [p, v]).outputs[0]]
    return g, inputs


@pytest.mark.parametrize("masked", [False, True])
def test_keras_attention_products_become_one_attention_op(masked: bool) -> None:
    from kerasrt.passes.attention import ATTENTION

    g, inputs = _keras_attention(masked)
    (before,) = run(g, inputs)
    result = PassManager((ATTENTION, STRUCTURAL), check=True).run(g)
    verify(g)
    assert result.counts["fuse_attention"] == 1
    ops = Counter(n.op for n in g.nodes)
    assert ops["attention"] == 1 and ops["matmul"] == 0 and ops["softmax"] == 0
    (after,) = run(g, inputs)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    if masked:  # the second batch attends to no key: zeros, as Keras's masked softmax gives
        assert torch.count_nonzero(after[3:]) == 0


def test_a_masked_softmax_that_keeps_masked_probabilities_is_left_alone() -> None:
    from kerasrt.passes.attention import ATTENTION

    g, _ = _keras_attention(True, probs_fill=0.5)
    assert PassManager((ATTENTION,), check=True).run(g).counts["fuse_attention"] == 0
