"""Quantization placement: INT8/FP8 quantize/dequantize (Q/DQ) pairs made explicit in the graph,
TensorRT's explicit-quantization model.

The math that low precision pays for is in convolutions and matrix products, so those are
the *sites*: each convolution and dense layer (``conv``, ``conv_fused``, ``linear``, a
``matmul`` with a constant operand) reads its activation through ``dequantize(quantize(x,
s_x), s_x)`` with one calibrated scale ``s_x = amax / q_max`` per tensor, and its weight as
``dequantize(w_q, s_w)`` with ``w_q`` stored quantized and one scale per output channel. The
ops between sites keep the engine's float precision (FP16): on the CPU the graph computes
exactly the quantized model's values (the reference path); an engine folds each pair into
its kernel's scales where it has a quantized kernel.

Placement rules say why a node stays in floating point: a depthwise convolution reads as
many bytes as it computes (bound by memory, INT8 does not pay), a grouped convolution or a
product of two activations has no quantized kernel, the accuracy search kept it (see
``kerasrt.quantization.accuracy``), or its input has no calibration statistics. Runs after
precision lowering (``passes.precision``), so weights are quantized from their FP16 values.

A site is keyed ``"{layer}#{k}"``: the Keras layer it came from and its position among that
layer's sites. The optimizer rewrites a model the same way at every input shape, so the key
of a calibrated range holds for every shape an engine is built for (no recalibration).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from kerasrt.ir.graph import Graph, Node, Value, torch_dtype
from kerasrt.ir.ops import QUANTIZED_RANGE, quantize

QUANTIZED_DTYPES = {"INT8": "int8", "FP8": "float8_e4m3fn"}
"""Precision modes that quantize, and the dtype of their quantized tensors."""
CALIBRATION = "calibration"
"""Source ``graph.meta`` key: the calibrated quantization of the model, for every shape:
{"mode", "dtype", "calibrator", "amax": {site key: range}, "keep": {site key: reason}}."""
QUANTIZATION = "quantization"
"""Engine ``graph.meta`` key: what placement did, site by site (the report lists it)."""
SITE_OPS = frozenset({"conv", "conv_fused", "linear", "matmul"})


@dataclass(frozen=True)
class Site:
    """A node whose products could run quantized: its key, its data input and weight, the
    weight's per-channel axis, and why it stays in floating point (None: it can quantize)."""

    key: str
    node: Node
    weight_index: int
    axis: int | None
    excluded: str | None


def sites(graph: Graph) -> list[Site]:
    """Every node of ``graph`` the placement rules consider, in graph order."""
    found: list[Site] = []
    per_layer: Counter[str] = Counter()
    for node in graph.nodes:
        if node.op not in SITE_OPS:
            continue
        placed = _rule(node)
        if placed is None:
            continue
        key = f"{node.layer}#{per_layer[node.layer]}"
        per_layer[node.layer] += 1
        found.append(Site(key, node, *placed))
    return found


def _rule(node: Node) -> tuple[int, int | None, str | None] | None:
    """(weight input index, weight channel axis, reason it is excluded or None) for a node of
    ``SITE_OPS``; None where the node is no site at all (no float data)."""
    x = node.inputs[0]
    if not torch_dtype(x.dtype).is_floating_point:
        return None
    if node.op in ("conv", "conv_fused"):
        groups = node.attrs.get("groups", 1)
        if groups > 1:
            depthwise = groups == x.shape[1]
            why = (
                "depthwise convolution: bound by memory, not math, so INT8 does not pay"
                if depthwise
                else "grouped convolution: no quantized kernel for groups > 1"
            )
            return 1, 0, why
        if not node.inputs[1].is_constant:
            return 1, 0, "convolution with a computed weight"
        return 1, 0, None
    if node.op == "linear":
        return (
            1,
            (1 if node.inputs[1].is_constant else None),
            (None if node.inputs[1].is_constant else "dense layer with a computed weight"),
        )
    a, b = node.inputs[0], node.inputs[1]
    if a.is_constant:
        return 1, None, "product with a constant left operand: no quantized kernel"
    if b.is_constant and len(b.shape) == 2:
        return 1, 1, None
    if b.is_constant:
        return 1, None, "batched product with a constant: no quantized kernel"
    return 1, None, "product of two activations: no calibrated weight"


def quantize_graph(graph: Graph, calibration: dict[str, Any]) -> Counter[str]:
    """Insert Q/DQ pairs at every site that ``calibration`` (``CALIBRATION``'s dict) quantizes;
    record each site's decision in ``graph.meta[QUANTIZATION]``. Returns counts of what was done."""
    dtype = calibration["dtype"]
    amaxes: dict[str, float] = calibration["amax"]
    keep: dict[str, str] = calibration.get("keep", {})
    fired: Counter[str] = Counter()
    decisions = []
    for site in sites(graph):
        node = site.node
        reason = site.excluded
        if reason is None and site.key in keep:
            reason = keep[site.key]
        if reason is None and site.key not in amaxes:
            reason = "no calibration statistics for its input (the optimizer rewrote this shape differently)"
        decisions.append(
            {
                "key": site.key,
                "layer": node.layer,
                "op": node.op,
                "quantized": reason is None,
                "reason": reason,
            }
        )
        if reason is not None:
            fired["sites_kept"] += 1
            continue
        _quantize_input(graph, node, 0, amaxes[site.key], dtype, site.key)
        _quantize_weight(graph, node, site.weight_index, site.axis, dtype, site.key)
        fired["sites_quantized"] += 1
    graph.remove_unused()
    graph.meta[QUANTIZATION] = {
        "mode": calibration["mode"],
        "dtype": dtype,
        "calibrator": calibration["calibrator"],
        "sites": decisions,
    }
    return fired


def input_scale(amax: float, dtype: str) -> torch.Tensor:
    """The per-tensor scale of a calibrated range (1 for a tensor that was always zero)."""
    return torch.tensor(amax / QUANTIZED_RANGE[dtype] if amax > 0 else 1.0, dtype=torch.float32)


def _quantize_input(graph: Graph, node: Node, index: int, amax: float, dtype: str, key: str) -> None:
    x = node.inputs[index]
    scale = graph.add_constant(f"{key}.input_scale", input_scale(amax, dtype))
    q = graph.add_node("quantize", [x, scale], {"axis": None, "dtype": dtype}, layer=node.layer, before=node)
    dq = graph.add_node(
        "dequantize", [q.outputs[0], scale], {"axis": None, "dtype": x.dtype}, layer=node.layer, before=node
    )
    _rewire(node, index, dq.outputs[0])


def _quantize_weight(graph: Graph, node: Node, index: int, axis: int | None, dtype: str, key: str) -> None:
    from kerasrt.quantization.calibrators import weight_scales

    w = node.inputs[index]
    scales = weight_scales(w.data, axis, dtype)
    stored = graph.add_constant(f"{key}.weight_q", quantize(w.data, scales, axis=axis, dtype=dtype))
    scale = graph.add_constant(f"{key}.weight_scale", scales)
    dq = graph.add_node(
        "dequantize", [stored, scale], {"axis": axis, "dtype": w.dtype}, layer=node.layer, before=node
    )
    _rewire(node, index, dq.outputs[0])


def _rewire(node: Node, index: int, new: Value) -> None:
    """Make ``node`` read ``new`` as its input ``index`` (the old value loses this use)."""
    old = node.inputs[index]
    node.inputs[index] = new
    old.users.remove(node)  # (one entry per input position that reads it)
    new.users.append(node)
