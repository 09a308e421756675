"""Floating-point operation counts per node (multiply-add = 2), for reports and floors."""

from __future__ import annotations

from math import prod

from kerasrt.ir.graph import Node


def node_flops(node: Node) -> int:
    """Approximate FLOPs of one node; elementwise-like ops count one per output element."""
    out = node.outputs[0].shape if node.outputs else ()
    if node.op in ("conv", "conv_fused"):
        w = node.inputs[1].shape  # (out, in / groups, *kernel)
        return 2 * prod(out) * prod(w[1:])
    if node.op == "conv_transpose":
        w = node.inputs[1].shape  # (in, out / groups, *kernel)
        return 2 * prod(node.inputs[0].shape) * prod(w[1:])
    if node.op in ("matmul", "linear"):
        return 2 * prod(out) * node.inputs[0].shape[-1]
    if node.op == "attention":
        q, k = node.inputs[0].shape, node.inputs[1].shape
        return 4 * prod(q[:-1]) * k[-2] * q[-1]
    if node.op == "keras_layer":
        return 0  # unknown: runs in Keras
    return prod(out) if out else 1
