"""Algebraic folding: constant scale/shift chains (what BatchNormalization becomes) are
merged and folded into the weights and bias of the conv or matmul before them.

After layout clean-up a conv + BN reads  conv(x, w, b) + (-mean) * s + beta  with per-channel
constants; the rules below turn it into conv(x, w * s, (b - mean) * s + beta).
"""

from __future__ import annotations

import torch

from kerasrt.ir.graph import Graph, Node, Value
from kerasrt.passes.base import Pass, emit, only_user, replace, rule


def _float_const(value: Value) -> torch.Tensor | None:
    return value.data if value.is_constant and value.data.is_floating_point() else None


def _split_const(node: Node) -> tuple[Value, torch.Tensor] | None:
    """(x, c) for a binary node f(x, c) with one constant float operand c (second for sub/div)."""
    a, b = node.inputs
    if _float_const(b) is not None and not a.is_constant:
        return a, b.data
    if node.op in ("add", "mul") and _float_const(a) is not None and not b.is_constant:
        return b, a.data
    return None


def _same_shape(node: Node, x: Value) -> bool:
    return node.outputs[0].shape == x.shape and node.outputs[0].dtype == x.dtype


@rule("sub_to_add", "sub")
def sub_to_add(graph: Graph, node: Node) -> bool | str:
    """x - c = x + (-c)."""
    split = _split_const(node)
    if split is None or not _same_shape(node, split[0]):
        return "not x - constant"
    x, c = split
    return replace(graph, node, emit(graph, node, "add", [x, graph.add_constant(node.layer + ".neg", -c)]))


@rule("div_to_mul", "div")
def div_to_mul(graph: Graph, node: Node) -> bool | str:
    """x / c = x * (1 / c)."""
    split = _split_const(node)
    if split is None or not _same_shape(node, split[0]):
        return "not x / constant"
    x, c = split
    return replace(
        graph, node, emit(graph, node, "mul", [x, graph.add_constant(node.layer + ".recip", 1.0 / c)])
    )


@rule("merge_constant_chain", "add", "mul")
def merge_chain(graph: Graph, node: Node) -> bool | str:
    """(x + c1) + c2 = x + (c1 + c2);  (x * c1) * c2 = x * (c1 * c2)."""
    outer = _split_const(node)
    if outer is None or outer[0].producer is None or outer[0].producer.op != node.op:
        return "not a chain of two constant ops"
    inner_node = outer[0].producer
    inner = _split_const(inner_node)
    if inner is None or only_user(outer[0], graph) is None or not _same_shape(node, inner[0]):
        return "inner op is shared or broadcasts"
    c = inner[1] + outer[1] if node.op == "add" else inner[1] * outer[1]
    return replace(
        graph, node, emit(graph, node, node.op, [inner[0], graph.add_constant(node.layer + ".c", c)])
    )


@rule("distribute_scale", "mul")
def distribute_scale(graph: Graph, node: Node) -> bool | str:
    """(x + c1) * c2 = x * c2 + c1 * c2 (moves the scale next to the op producing x)."""
    outer = _split_const(node)
    if outer is None or outer[0].producer is None or outer[0].producer.op != "add":
        return "not (x + c) * c"
    inner = _split_const(outer[0].producer)
    if inner is None or only_user(outer[0], graph) is None or not _same_shape(node, inner[0]):
        return "inner add is shared or broadcasts"
    scaled = emit(graph, node, "mul", [inner[0], graph.add_constant(node.layer + ".s", outer[1])])
    shift = graph.add_constant(node.layer + ".t", inner[1] * outer[1])
    return replace(graph, node, emit(graph, node, "add", [scaled, shift]))


def _channel_vector(c: torch.Tensor, out: Value, axis: int) -> torch.Tensor | None:
    """c as a vector over ``axis`` of ``out`` if it broadcasts only along that axis."""
    rank, channels = len(out.shape), out.shape[axis]
    full = c.reshape((1,) * (rank - c.dim()) + tuple(c.shape)) if c.dim() <= rank else None
    if full is None or any(s != 1 for i, s in enumerate(full.shape) if i != axis % rank):
        return None
    return full.reshape(-1).expand(channels).clone()


def _producer_weights(x: Value, graph: Graph) -> tuple[Node, int] | None:
    """(conv or matmul node, channel axis of its output) when its weight is a constant."""
    node = x.producer
    if node is None or only_user(x, graph) is None:
        return None
    if node.op == "conv" and node.inputs[1].is_constant:
        return node, 1
    if node.op == "matmul" and node.inputs[1].is_constant and len(node.inputs[1].shape) == 2:
        return node, len(x.shape) - 1
    return None


@rule("fold_scale_into_weights", "mul")
def fold_scale(graph: Graph, node: Node) -> bool | str:
    """conv(x, w, b) * s = conv(x, w * s, b * s) for per-output-channel s; same for x @ W."""
    split = _split_const(node)
    if split is None:
        return "not x * constant"
    x, c = split
    found = _producer_weights(x, graph)
    if found is None or not _same_shape(node, x):
        return "x is not the only use of a conv/matmul with constant weights"
    prod, axis = found
    s = _channel_vector(c, x, axis)
    if s is None:
        return "scale is not per output channel"
    w = prod.inputs[1].data
    if prod.op == "conv":
        new_w = w * s.reshape(-1, *([1] * (w.dim() - 1)))
    else:
        new_w = w * s.reshape(1, -1)
    inputs = [prod.inputs[0], graph.add_constant(prod.layer + ".w", new_w.to(w.dtype))]
    if len(prod.inputs) > 2:
        inputs.append(graph.add_constant(prod.layer + ".b", prod.inputs[2].data * s))
    return replace(graph, node, emit(graph, node, prod.op, inputs, from_node=prod, **prod.attrs))


@rule("fold_shift_into_bias", "add")
def fold_shift(graph: Graph, node: Node) -> bool | str:
    """conv(x, w, b) + t = conv(x, w, b + t) for per-output-channel t."""
    split = _split_const(node)
    if split is None:
        return "not x + constant"
    x, c = split
    prod = x.producer
    if prod is None or prod.op != "conv" or only_user(x, graph) is None or not _same_shape(node, x):
        return "x is not the only use of a conv"
    t = _channel_vector(c, x, 1)
    if t is None:
        return "shift is not per output channel"
    bias = prod.inputs[2].data + t if len(prod.inputs) > 2 else t
    inputs = [prod.inputs[0], prod.inputs[1], graph.add_constant(prod.layer + ".b", bias.to(c.dtype))]
    return replace(graph, node, emit(graph, node, "conv", inputs, from_node=prod, **prod.attrs))


def _next_weights(node: Node, graph: Graph) -> Node | None:
    """The conv (groups 1) or matmul with constant weights that alone reads ``node``'s output."""
    user = only_user(node.outputs[0], graph)
    if user is None or user.op not in ("conv", "matmul") or user.inputs[0] is not node.outputs[0]:
        return None
    if not user.inputs[1].is_constant:
        return None
    if user.op == "conv" and user.attrs["groups"] == 1:
        return user
    if user.op == "matmul" and len(user.inputs[1].shape) == 2:
        return user
    return None


def _feeds_weights(node: Node, graph: Graph) -> tuple[Value, torch.Tensor, Node] | str:
    """(x, per-input-channel vector c, next node) for f(x, c) read only by a conv/matmul."""
    split = _split_const(node)
    nxt = _next_weights(node, graph)
    if split is None or nxt is None or not _same_shape(node, split[0]):
        return f"not x {node.op} constant feeding only a conv/matmul with constant weights"
    x, c = split
    vector = _channel_vector(c, x, 1 if nxt.op == "conv" else len(x.shape) - 1)
    if vector is None:
        return "constant is not per input channel"
    return x, vector, nxt


@rule("fold_scale_into_next", "mul")
def fold_scale_next(graph: Graph, node: Node) -> bool | str:
    """conv(x * s, w) = conv(x, w * s) for per-input-channel s (any padding: 0 * s = 0);
    (x * s) @ W = x @ (s[:, None] * W)."""
    found = _feeds_weights(node, graph)
    if isinstance(found, str):
        return found
    x, s, nxt = found
    w = nxt.inputs[1].data
    new_w = w * (s.reshape(1, -1, *([1] * (w.dim() - 2))) if nxt.op == "conv" else s.reshape(-1, 1))
    inputs = [x, graph.add_constant(nxt.layer + ".w", new_w.to(w.dtype)), *nxt.inputs[2:]]
    return replace(graph, nxt, emit(graph, nxt, nxt.op, inputs, **nxt.attrs))


@rule("fold_shift_into_next", "add")
def fold_shift_next(graph: Graph, node: Node) -> bool | str:
    """conv(x + t, w, b) = conv(x, w, b + sum(w * t)) when the conv pads nothing (padding
    would see shifted zeros otherwise); (x + t) @ W = x @ W + t @ W."""
    found = _feeds_weights(node, graph)
    if isinstance(found, str):
        return found
    x, t, nxt = found
    w = nxt.inputs[1].data
    if nxt.op == "matmul":
        product = emit(graph, nxt, "matmul", [x, nxt.inputs[1]])
        shift = graph.add_constant(nxt.layer + ".t", (t @ w).to(w.dtype))
        return replace(graph, nxt, emit(graph, nxt, "add", [product, shift]))
    if any(nxt.attrs["padding"]):
        return "the conv pads its input: a shift cannot move past the padding"
    extra = (w * t.reshape(1, -1, *([1] * (w.dim() - 2)))).sum(dim=tuple(range(1, w.dim())))
    bias = nxt.inputs[2].data + extra if len(nxt.inputs) > 2 else extra
    inputs = [x, nxt.inputs[1], graph.add_constant(nxt.layer + ".b", bias.to(w.dtype))]
    return replace(graph, nxt, emit(graph, nxt, "conv", inputs, **nxt.attrs))


ALGEBRA = Pass(
    "algebra",
    (
        sub_to_add,
        div_to_mul,
        merge_chain,
        distribute_scale,
        fold_scale,
        fold_shift,
        fold_scale_next,
        fold_shift_next,
    ),
)
