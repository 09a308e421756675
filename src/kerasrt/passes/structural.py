"""Exact structural clean-ups: no-op removal, constant folding, common subexpressions."""

from __future__ import annotations

import json
from collections import Counter

import torch

from kerasrt.ir import symbolic
from kerasrt.ir.graph import Graph, Node, Value
from kerasrt.ir.ops import OPS, run_reference
from kerasrt.passes.base import Pass, emit, replace, rule


@rule("remove_noop", "reshape", "cast", "permute", "expand", "slice", "pad", "concat")
def remove_noop(graph: Graph, node: Node) -> bool | str:
    """reshape/expand to the same shape, cast to the same dtype, identity permute, full
    slice, zero pad, single-input concat: y = x."""
    x, out = node.inputs[0], node.outputs[0]
    same = {
        "reshape": x.shape == out.shape,
        "expand": x.shape == out.shape,
        "cast": x.dtype == out.dtype,
        "permute": node.attrs.get("dims") == list(range(len(x.shape))),
        "slice": x.shape == out.shape,
        "pad": not any(node.attrs.get("pads", [])) and node.attrs.get("mode") == "constant",
        "concat": len(node.inputs) == 1,
    }[node.op]
    return replace(graph, node, x) if same else "changes its input"


@rule("merge_reshapes", "reshape")
def merge_reshapes(graph: Graph, node: Node) -> bool | str:
    """reshape(reshape(x, s1), s2) = reshape(x, s2)."""
    inner = node.inputs[0].producer
    if inner is None or inner.op != "reshape":
        return "input is not a reshape"
    return replace(graph, node, emit(graph, node, "reshape", [inner.inputs[0]], shape=node.attrs["shape"]))


@rule("merge_permutes", "permute")
def merge_permutes(graph: Graph, node: Node) -> bool | str:
    """permute(permute(x, p), q) = permute(x, p[q]); identity compositions vanish."""
    inner = node.inputs[0].producer
    if inner is None or inner.op != "permute":
        return "input is not a permute"
    p, q = inner.attrs["dims"], node.attrs["dims"]
    dims = [p[i] for i in q]
    x = inner.inputs[0]
    if dims == list(range(len(dims))):
        return replace(graph, node, x)
    return replace(graph, node, emit(graph, node, "permute", [x], dims=dims))


@rule("unit_permute_to_reshape", "permute")
def unit_permute_to_reshape(graph: Graph, node: Node) -> bool | str:
    """A permute that keeps the order of the dims larger than 1 only moves unit dims, which
    does not move any element: it is reshape(x, out.shape). Done only next to a reshape, where
    it merges into a reshape chain (elsewhere, e.g. around a conv on 1x1 maps, the permute is
    better kept: it cancels against its inverse in the layout clean-up)."""
    x, dims = node.inputs[0], node.attrs["dims"]
    beside_reshape = (x.producer is not None and x.producer.op == "reshape") or (
        node.outputs[0].users and all(u.op == "reshape" for u in node.outputs[0].users)
    )
    if not beside_reshape:
        return "neither reads nor feeds a reshape"
    moved = [d for d in dims if x.shape[d] != 1]
    if moved != sorted(moved):
        return "reorders dims larger than 1"
    return replace(graph, node, emit(graph, node, "reshape", [x], shape=list(node.outputs[0].shape)))


def _foldable(node: Node) -> bool | str:
    if OPS[node.op].category == "fallback":
        return "runs in Keras"
    if not node.inputs or not all(v.is_constant for v in node.inputs):
        return "has a non-constant input"
    if not symbolic.is_static(node.outputs[0].shape):
        return "its output size is symbolic (known only once the graph is specialized)"
    return True


@rule("fold_constants")
def fold_constants(graph: Graph, node: Node) -> bool | str:
    """An op whose inputs are all constants is computed once, now."""
    ok = _foldable(node)
    if ok is not True:
        return ok
    result = run_reference(node.op, [v.data for v in node.inputs], node.attrs)
    if (
        isinstance(result, torch.Tensor)
        and result.numel() > 4 * max(v.data.numel() for v in node.inputs) + 4096
    ):
        return "folding would store a much larger constant"
    value = graph.add_constant(f"{node.layer or node.op}.folded", result)
    return replace(graph, node, value)


def _key(node: Node) -> str:
    return json.dumps([node.op, [id(v) for v in node.inputs], node.attrs], sort_keys=True, default=str)


def common_subexpressions(graph: Graph) -> Counter[str]:
    """Equal small constants become one value; then the same op on the same inputs with
    the same attributes is computed once (its duplicates' users read the first)."""
    fired: Counter[str] = Counter()
    canonical: dict[tuple, Value] = {}
    for value in list(graph.constants.values()):
        if value.data.numel() <= 64 and value.users:
            key = (value.dtype, value.shape, tuple(value.data.flatten().tolist()))
            first = canonical.setdefault(key, value)
            if first is not value:
                graph.replace_uses(value, first)
                fired["dedupe_constants"] += 1
    seen: dict[str, Node] = {}
    for node in graph.nodes:
        if OPS[node.op].category == "fallback" or not any(o.users for o in node.outputs):
            continue
        first = seen.setdefault(_key(node), node)
        if first is not node:
            for a, b in zip(first.outputs, node.outputs):
                graph.replace_uses(b, a)
            fired["common_subexpression"] += 1
    return fired


@rule("drop_unit_batch_of_weight", "matmul")
def drop_unit_batch(graph: Graph, node: Node) -> bool | str:
    """x @ W with a constant W of shape (1, ..., 1, K, N) = x @ W[K, N] when x has at least
    W's rank (the unit batch dims only broadcast)."""
    x, w = node.inputs
    if (
        not w.is_constant
        or w.data.dim() <= 2
        or any(d != 1 for d in w.shape[:-2])
        or len(x.shape) < len(w.shape)
    ):
        return "weight is not a constant with unit batch dims"
    flat = graph.add_constant(w.name + ".2d", w.data.reshape(w.shape[-2:]))
    return replace(graph, node, emit(graph, node, "matmul", [x, flat]))


STRUCTURAL = Pass(
    "structural",
    (remove_noop, merge_reshapes, merge_permutes, unit_permute_to_reshape, fold_constants, drop_unit_batch),
)
CSE = Pass("cse", transform=common_subexpressions)
