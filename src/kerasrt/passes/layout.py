"""Layout clean-up: move permutes past layout-agnostic ops until inverse pairs meet.

Keras is channels-last and the IR's conv is channels-first, so the frontend wraps each conv
in NHWC->NCHW and NCHW->NHWC permutes. Pushing every permute towards the outputs through
elementwise ops, reductions, softmax, concat and pad makes consecutive convs meet their
permutes back to back, and ``merge_permutes`` cancels them.
"""

from __future__ import annotations

from kerasrt.ir.graph import Graph, Node, Value
from kerasrt.ir.ops import OPS
from kerasrt.passes.base import Pass, emit, only_user, replace, rule


def _inverse(p: list[int]) -> list[int]:
    inv = [0] * len(p)
    for i, d in enumerate(p):
        inv[d] = i
    return inv


def _permuted(value: Value) -> list[int] | None:
    node = value.producer
    return node.attrs["dims"] if node is not None and node.op == "permute" else None


def _permute_constant(graph: Graph, value: Value, p: list[int]) -> Value:
    """c' with permute(c', p) == c (after broadcasting c to rank len(p))."""
    data = value.data.reshape((1,) * (len(p) - value.data.dim()) + tuple(value.data.shape))
    if data.numel() == 1:
        return value
    return graph.add_constant(value.name + ".t", data.permute(_inverse(p)).contiguous())


@rule("sink_permute_elementwise")
def sink_elementwise(graph: Graph, node: Node) -> bool | str:
    """f(permute(a, p), c) = permute(f(a, c'), p) for elementwise f (c': c permuted back)."""
    if OPS[node.op].category != "elementwise":
        return "not elementwise"
    rank = len(node.outputs[0].shape)
    perm = None
    for value in node.inputs:
        if value.is_constant:
            if value.data.dim() > rank:
                return "constant of higher rank"
            continue
        p = _permuted(value)
        if p is None or len(value.shape) != rank:
            return f"input {value.name} is not permuted"
        if perm is not None and p != perm:
            return "inputs are permuted differently"
        perm = p
    if perm is None:
        return "no permuted input"
    inputs = [
        _permute_constant(graph, v, perm) if v.is_constant else v.producer.inputs[0] for v in node.inputs
    ]
    inner = emit(graph, node, node.op, inputs, **node.attrs)
    return replace(graph, node, emit(graph, node, "permute", [inner], dims=perm))


@rule("sink_permute_reduce", "reduce_mean", "reduce_sum", "reduce_max", "reduce_min", "reduce_var")
def sink_reduce(graph: Graph, node: Node) -> bool | str:
    """reduce(permute(a, p), dims) = permute'(reduce(a, p[dims]))."""
    p = _permuted(node.inputs[0])
    if p is None:
        return "input is not permuted"
    a = node.inputs[0].producer.inputs[0]
    dims = sorted(p[d] for d in node.attrs["dims"])
    keep = node.attrs.get("keepdim", False)
    inner = emit(graph, node, node.op, [a], **{**node.attrs, "dims": dims})
    if keep:
        return replace(graph, node, emit(graph, node, "permute", [inner], dims=p))
    remaining = [p[i] for i in range(len(p)) if i not in node.attrs["dims"]]
    order = sorted(remaining)
    q = [order.index(d) for d in remaining]
    if q == list(range(len(q))):
        return replace(graph, node, inner)
    return replace(graph, node, emit(graph, node, "permute", [inner], dims=q))


@rule("sink_permute_softmax", "softmax", "log_softmax")
def sink_softmax(graph: Graph, node: Node) -> bool | str:
    """softmax(permute(a, p), d) = permute(softmax(a, p[d]), p)."""
    p = _permuted(node.inputs[0])
    if p is None:
        return "input is not permuted"
    inner = emit(graph, node, node.op, [node.inputs[0].producer.inputs[0]], dim=p[node.attrs["dim"]])
    return replace(graph, node, emit(graph, node, "permute", [inner], dims=p))


@rule("sink_permute_concat", "concat")
def sink_concat(graph: Graph, node: Node) -> bool | str:
    """concat(permute(a_i, p), d) = permute(concat(a_i, p[d]), p)."""
    perms = [_permuted(v) for v in node.inputs]
    if perms[0] is None or any(q != perms[0] for q in perms):
        return "inputs are not all permuted the same way"
    p = perms[0]
    inner = emit(graph, node, "concat", [v.producer.inputs[0] for v in node.inputs], dim=p[node.attrs["dim"]])
    return replace(graph, node, emit(graph, node, "permute", [inner], dims=p))


@rule("sink_permute_pad", "pad")
def sink_pad(graph: Graph, node: Node) -> bool | str:
    """pad(permute(a, p)) = permute(pad(a, pads moved to a's dims), p)."""
    p = _permuted(node.inputs[0])
    if p is None:
        return "input is not permuted"
    if node.outputs[0].users and all(u.op in _CONVS for u in node.outputs[0].users):
        return "the pad feeds convs (it folds into them where it is)"
    new_pads = _move_pads(node.attrs["pads"], len(p), p, inverse=False)
    inner = emit(graph, node, "pad", [node.inputs[0].producer.inputs[0]], **{**node.attrs, "pads": new_pads})
    return replace(graph, node, emit(graph, node, "permute", [inner], dims=p))


_CONVS = ("conv", "conv_fused")


@rule("sink_reshape_elementwise")
def sink_reshape(graph: Graph, node: Node) -> bool | str:
    """f(reshape(y), c) = reshape(f(y, c')) when the reshape keeps the trailing elements that
    c varies over together as y's last dim (a Dense on 3-D input, a bias over heads x dim):
    brings a bias or activation back next to the matmul that produced y."""
    if OPS[node.op].category != "elementwise":
        return "not elementwise"
    moving = [v for v in node.inputs if not v.is_constant]
    if len(moving) != 1 or moving[0].producer is None or moving[0].producer.op != "reshape":
        return "not one reshaped input"
    y = moving[0].producer.inputs[0]
    out = node.outputs[0].shape
    if moving[0].shape != out or not y.shape:
        return "broadcasts"
    inputs = []
    for value in node.inputs:
        if not value.is_constant:
            inputs.append(y)
            continue
        c = value.data
        while c.dim() > 0 and c.shape[0] == 1 and c.numel() > 1:
            c = c.squeeze(0)
        k = c.dim()
        tail = 1
        for d in out[len(out) - k :] if k else ():
            tail *= d
        if c.numel() == 1:
            inputs.append(value)
        elif k <= len(out) and tuple(c.shape) == tuple(out[len(out) - k :]) and tail == y.shape[-1]:
            inputs.append(graph.add_constant(value.name + ".flat", c.reshape(-1)))
        else:
            return "constant does not vary over the last dim of the reshape's input only"
    inner = emit(graph, node, node.op, inputs, **node.attrs)
    return replace(graph, node, emit(graph, node, "reshape", [inner], shape=list(out)))


def _move_pads(pads: list[int], rank: int, p: list[int], inverse: bool) -> list[int]:
    """F.pad ``pads`` (last dim first) for the same padding seen through permute(·, p)."""
    per_dim = {rank - 1 - i: (pads[2 * i], pads[2 * i + 1]) for i in range(len(pads) // 2)}
    moved = {(p.index(d) if inverse else p[d]): v for d, v in per_dim.items()}
    out: list[int] = []
    for d in range(rank - 1, min(moved) - 1, -1):
        out.extend(moved.get(d, (0, 0)))
    return out


@rule("hoist_permute_over_pad", "permute")
def hoist_over_pad(graph: Graph, node: Node) -> bool | str:
    """permute(pad(x), p) = pad(permute(x, p)) when the result feeds convs only, so the pad
    lands next to the conv and can fold into its padding."""
    pad = node.inputs[0].producer
    if pad is None or pad.op != "pad" or only_user(node.inputs[0], graph) is None:
        return "input is not a pad used only here"
    if not node.outputs[0].users or not all(u.op in _CONVS for u in node.outputs[0].users):
        return "result does not feed convs"
    p = node.attrs["dims"]
    moved = emit(graph, node, "permute", [pad.inputs[0]], dims=p)
    pads = _move_pads(pad.attrs["pads"], len(p), p, inverse=True)
    return replace(graph, node, emit(graph, node, "pad", [moved], **{**pad.attrs, "pads": pads}))


LAYOUT = Pass(
    "layout",
    (sink_elementwise, sink_reduce, sink_softmax, sink_concat, sink_pad, hoist_over_pad, sink_reshape),
)
