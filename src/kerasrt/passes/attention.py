"""Attention written out as matrix products becomes one ``attention`` op.

Keras's ``MultiHeadAttention`` (and every keras_hub transformer built on it) computes attention
as einsums and a masked softmax: ``scores = q @ k^T``; ``where(mask, scores, -big)``;
softmax; ``where(mask, probs, 0)``; ``probs @ v``. Run that way, the (batch, heads, queries,
keys) scores are written and read four times, the whole point of a fused attention kernel
(PyTorch's scaled-dot-product attention: flash, memory-efficient or cuDNN kernels) that
never writes them. The query arrives scaled (Keras scales it before the product), so the
fused op's scale is 1.
"""

from __future__ import annotations

import torch

from kerasrt.ir.graph import Graph, Node, Value, torch_dtype
from kerasrt.passes.base import Pass, emit, only_user, replace, rule


def _producer(value: Value, graph: Graph, op: str) -> Node | None:
    """The producer of ``value`` if it is an ``op`` node and ``value`` has no other reader."""
    node = value.producer
    if node is None or node.op != op or only_user(value, graph) is None:
        return None
    return node


def _skip_cast(value: Value, graph: Graph) -> Value:
    cast = _producer(value, graph, "cast")
    return cast.inputs[0] if cast is not None else value


def _is_scalar(value: Value, fill: float | None = None) -> bool:
    """A constant of one element (equal to ``fill`` where given)."""
    if not value.is_constant or value.data.numel() != 1:
        return False
    return fill is None or float(value.data.reshape(-1)[0]) == fill


def _masked_by(value: Value, graph: Graph, fill: float | None) -> tuple[Value, Value | None] | str:
    """(x, mask) where ``value`` is ``where(mask, x, fill)`` (any scalar fill where ``fill`` is
    None); (value, None) where it is no where; a reason where the where is not such a mask."""
    where = _producer(value, graph, "where")
    if where is None:
        return value, None
    cond, x, other = where.inputs
    if cond.dtype != "bool" or not _is_scalar(other, fill):
        return "a where that is not a boolean mask with the masked softmax's fill"
    return x, cond


@rule("fuse_attention", "matmul")
def fuse_attention(graph: Graph, node: Node) -> bool | str:
    """reshape(probs) @ v where probs = [where(mask, .., 0)] softmax([where(mask, s, -big)])
    and s = reshape(q @ k^T), heads folded into the products' batch  ->  attention(q, k, v,
    mask), and rows whose keys are all masked set to 0 as Keras's masked softmax leaves them."""
    flat_probs, v = node.inputs
    if len(v.shape) != 3 or v.is_constant:
        return "not a batched product of activations"
    unflat = _producer(flat_probs, graph, "reshape")
    if unflat is None or len(unflat.inputs[0].shape) != 4:
        return "the left operand is not (batch, heads, queries, keys) folded"
    probs = _masked_by(unflat.inputs[0], graph, 0.0)
    if isinstance(probs, str):
        return probs
    probs, mask = probs
    softmax = _producer(_skip_cast(probs, graph), graph, "softmax")
    if softmax is None or softmax.attrs["dim"] not in (3, -1):
        return "not a softmax over the keys"
    scores = _masked_by(_skip_cast(softmax.inputs[0], graph), graph, None)
    if isinstance(scores, str):
        return scores
    scores, score_mask = scores
    if score_mask is not mask:
        return "the scores and the probabilities are not masked alike"
    fold = _producer(scores, graph, "reshape")
    product = None if fold is None else _producer(fold.inputs[0], graph, "matmul")
    if product is None:
        return "the scores are not a batched q @ k^T"
    q, kt = product.inputs
    b, h, sq, sk = scores.shape
    if len(q.shape) != 3 or len(kt.shape) != 3 or q.shape[1] != sq or kt.shape[2] != sk or v.shape[1] != sk:
        return "the products' shapes are not attention's"
    d, dv = q.shape[2], v.shape[2]
    q4 = emit(graph, node, "reshape", [q], from_node=product, shape=[b, h, sq, d])
    kt4 = emit(graph, node, "reshape", [kt], from_node=product, shape=[b, h, d, sk])
    k4 = emit(graph, node, "permute", [kt4], from_node=product, dims=[0, 1, 3, 2])
    v4 = emit(graph, node, "reshape", [v], from_node=node, shape=[b, h, sk, dv])
    inputs = [q4, k4, v4] + ([mask] if mask is not None else [])
    out = emit(graph, node, "attention", inputs, from_node=node, scale=1.0, is_causal=False)
    if mask is not None:  # no key to attend to: Keras's masked softmax gives zeros
        rank = len(mask.shape)
        anyone = emit(graph, node, "reduce_any", [mask], from_node=node, dims=[rank - 1], keepdim=True)
        zero = graph.add_constant(f"{node.layer}.zero", torch.zeros((), dtype=torch_dtype(out.dtype)))
        out = emit(graph, node, "where", [anyone, out, zero], from_node=node)
    shape = list(node.outputs[0].shape)
    return replace(graph, node, emit(graph, node, "reshape", [out], from_node=node, shape=shape))


ATTENTION = Pass("attention_fusion", (fuse_attention,))
