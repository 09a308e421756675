"""Fusion, TensorRT-style.

Vertical: conv + bias (+ residual add) (+ activation) become one ``conv_fused``; a matmul with
a constant weight plus bias (+ activation) becomes one ``linear``. Horizontal: sibling convs
or linears that read the same tensor with compatible parameters become one op on
concatenated weights whose output is sliced again for each consumer (Inception's parallel
1x1 convs, attention's Q/K/V projections).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch

from kerasrt.ir.graph import Graph, Node, Value
from kerasrt.ir.ops import EPILOGUE_ACTIVATIONS
from kerasrt.passes.base import Pass, emit, only_user, replace, rule

_CONV_ATTRS = ("stride", "padding", "dilation", "groups")


def _as_fused(node: Node) -> tuple[list[Value], dict] | None:
    """(inputs, attrs) of ``node`` as a conv_fused/linear with an empty epilogue, if it is one."""
    if node.op == "conv":
        attrs = {k: node.attrs[k] for k in _CONV_ATTRS}
        attrs.update(
            has_bias=len(node.inputs) > 2, has_residual=False, activation=None, activation_attrs=None
        )
        return list(node.inputs), attrs
    if node.op in ("conv_fused", "linear"):
        return list(node.inputs), dict(node.attrs)
    return None


def _fused_op(node: Node) -> str:
    return "linear" if node.op == "linear" else "conv_fused"


def _through_reshape(y: Value, graph: Graph) -> tuple[Node | None, Node | None]:
    """(producer of ``y``, the reshape between them or None): a Dense layer applied to a
    rank-3+ tensor is a linear on its rows between two reshapes, and the add after it reads
    the second reshape."""
    prod = y.producer
    if prod is not None and prod.op == "reshape" and prod.inputs[0].producer is not None:
        inner = prod.inputs[0]
        if inner.producer.op == "linear" and only_user(inner, graph) is not None:
            return inner.producer, prod
    return prod, None


@rule("fuse_residual_add", "add")
def fuse_residual(graph: Graph, node: Node) -> bool | str:
    """conv(x) + b + r  ->  conv_fused(x, w, b, r): the residual add joins the conv epilogue;
    the same for a linear (through the reshape a Dense layer on rank-3+ inputs ends with)."""
    for i in (0, 1):
        y, r = node.inputs[i], node.inputs[1 - i]
        prod, reshape = _through_reshape(y, graph)
        if prod is None or prod.op not in ("conv", "conv_fused", "linear") or only_user(y, graph) is None:
            continue
        inputs, attrs = _as_fused(prod)
        if attrs["has_residual"] or attrs["activation"] is not None:
            continue
        if r.is_constant or r.shape != y.shape or r.dtype != y.dtype:
            continue
        attrs["has_residual"] = True
        if reshape is not None:  # the residual takes the linear's row shape, the sum y's again
            rows = prod.outputs[0].shape
            r = emit(graph, node, "reshape", [r], from_node=prod, shape=list(rows))
            fused = emit(graph, node, "linear", [*inputs, r], from_node=prod, **attrs)
            return replace(
                graph, node, emit(graph, node, "reshape", [fused], from_node=prod, shape=list(y.shape))
            )
        return replace(graph, node, emit(graph, node, _fused_op(prod), [*inputs, r], from_node=prod, **attrs))
    return "no conv or linear output used only by this add with a same-shape tensor"


@rule("fuse_activation", *EPILOGUE_ACTIVATIONS)
def fuse_activation(graph: Graph, node: Node) -> bool | str:
    """act(conv(x) + b [+ r])  ->  conv_fused(..., activation=act); same for linear."""
    y = node.inputs[0]
    prod = y.producer
    if len(node.inputs) != 1 or prod is None or only_user(y, graph) is None:
        return "input is shared or not a conv/linear"
    fused = _as_fused(prod)
    if fused is None or fused[1]["activation"] is not None:
        return "input is not a conv/linear with a free epilogue"
    inputs, attrs = fused
    attrs.update(activation=node.op, activation_attrs=dict(node.attrs) or None)
    return replace(graph, node, emit(graph, node, _fused_op(prod), inputs, from_node=prod, **attrs))


@rule("fuse_linear_bias", "add")
def fuse_linear_bias(graph: Graph, node: Node) -> bool | str:
    """x @ W + b  ->  linear(x, W, b) for constant W (in, out) and b over the last dim."""
    for i in (0, 1):
        y, b = node.inputs[i], node.inputs[1 - i]
        prod = y.producer
        if prod is None or prod.op != "matmul" or only_user(y, graph) is None:
            continue
        w = prod.inputs[1]
        if not w.is_constant or len(w.shape) != 2 or not b.is_constant or b.data.numel() != w.shape[1]:
            continue
        if node.outputs[0].shape != y.shape:
            continue
        bias = graph.add_constant(prod.layer + ".bias", b.data.reshape(-1))
        return replace(
            graph,
            node,
            emit(
                graph,
                node,
                "linear",
                [prod.inputs[0], w, bias],
                from_node=prod,
                has_bias=True,
                has_residual=False,
                activation=None,
                activation_attrs=None,
            ),
        )
    return "not matmul(x, constant W) + bias"


def _sibling_key(node: Node) -> tuple | None:
    """What siblings must share to be merged into one op."""
    fused = _as_fused(node)
    if fused is None or fused[1]["has_residual"]:
        return None
    inputs, attrs = fused
    if not all(v.is_constant for v in inputs[1:]):
        return None
    if node.op == "linear":
        if len(inputs[1].shape) != 2:
            return None
        return (
            "linear",
            id(inputs[0]),
            attrs["has_bias"],
            attrs["activation"],
            str(attrs["activation_attrs"]),
        )
    if attrs["groups"] != 1:
        return None
    kernel = tuple(inputs[1].shape[2:])
    return (
        "conv",
        id(inputs[0]),
        kernel,
        *(str(attrs[k]) for k in _CONV_ATTRS),
        attrs["has_bias"],
        attrs["activation"],
        str(attrs["activation_attrs"]),
    )


def horizontal_fusion(graph: Graph) -> Counter[str]:
    """Merge sibling convs/linears on one input into one op on concatenated weights + slices."""
    fired: Counter[str] = Counter()
    groups: dict[tuple, list[Node]] = defaultdict(list)
    for node in graph.nodes:
        key = _sibling_key(node)
        if key is not None:
            groups[key].append(node)
    for key, siblings in groups.items():
        if len(siblings) < 2:
            continue
        first = siblings[0]
        inputs, attrs = _as_fused(first)
        axis = 1 if key[0] == "linear" else 0  # weight axis holding output channels
        weights = torch.cat([s.inputs[1].data for s in siblings], dim=axis)
        merged_inputs = [inputs[0], graph.add_constant(first.layer + ".hw", weights)]
        if attrs["has_bias"]:
            merged_inputs.append(
                graph.add_constant(first.layer + ".hb", torch.cat([s.inputs[2].data for s in siblings]))
            )
        op = "linear" if key[0] == "linear" else "conv_fused"
        merged = emit(graph, first, op, merged_inputs, **attrs)
        out_axis = len(merged.shape) - 1 if op == "linear" else 1
        start = 0
        for s in siblings:
            width = s.outputs[0].shape[out_axis]
            part = emit(graph, first, "slice", [merged], dim=out_axis, start=start, end=start + width, step=1)
            graph.replace_uses(s.outputs[0], part)
            start += width
        fired["horizontal_fusion"] += len(siblings) - 1
    return fired


@rule("fold_pad_into_conv", "conv", "conv_fused")
def fold_pad(graph: Graph, node: Node) -> bool | str:
    """conv(pad(x, zeros)) = conv(x) with more padding, for symmetric spatial zero pads."""
    x = node.inputs[0]
    pad = x.producer
    if pad is None or pad.op != "pad" or pad.attrs.get("mode") != "constant" or pad.attrs.get("value"):
        return "input is not a zero pad"
    spatial = len(node.attrs["stride"])
    pads = pad.attrs["pads"] + [0] * (2 * len(x.shape) - len(pad.attrs["pads"]))
    per_dim = [(pads[2 * i], pads[2 * i + 1]) for i in range(len(x.shape))][::-1]  # first dim first
    if any(p != (0, 0) for p in per_dim[: len(x.shape) - spatial]):
        return "pads non-spatial dims"
    if any(lo != hi for lo, hi in per_dim[-spatial:]):
        return "asymmetric padding cannot be folded"
    padding = [p + lo for p, (lo, _) in zip(node.attrs["padding"], per_dim[-spatial:])]
    inputs = [pad.inputs[0], *node.inputs[1:]]
    return replace(graph, node, emit(graph, node, node.op, inputs, **{**node.attrs, "padding": padding}))


VERTICAL = Pass("vertical_fusion", (fold_pad, fuse_residual, fuse_activation, fuse_linear_bias))
HORIZONTAL = Pass("horizontal_fusion", transform=horizontal_fusion)
