"""Merged convolutions: rewrites of an engine's neighbouring convolutions into one IR op that
one kernel runs, kept only where a measurement says it beats the two on their own chosen
kernels. Both merges come from ResNet-style networks, where one tensor travels between two
memory-bound convolutions through memory:

- ``dual_conv``: a stage's first block adds a 1x1 projection of its input to its last 1x1
  convolution. After fusion one of them (the lead) is a ``conv_fused`` whose residual is the
  other's output, read by nothing else::

      conv_fused(h, w, b, residual=conv(x, ws, bs, stride))  ->  dual_conv(h, w, x, ws, b + bs)

  (h: the stride-1 product's input; the projection is never written).
- ``conv_pair``: a 1x1 convolution (or a ``dual_conv``) whose output y a second 1x1
  convolution reduces back to the first's input channels, where that input x is made in the
  engine and read by the first alone::

      z = conv(y = conv_fused(x, w1, ...), w2, b2)  ->  (y, z) = conv_pair(x, w1, ..., w2, b2)

  (the kernel stores y once, never reads it back, and writes z over x).

Each rule is a pattern (``dual_candidates``, ``pair_candidates``), a check (the merged
kernel's time, cached like the tactics', against the parts' recorded times) and a rewrite
(``_replace``). Duals are rewritten first: a pair may then start from a dual.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kerasrt.ir.graph import Graph, Node, Value, dtype_name
from kerasrt.ir.ops import KERNEL, PAIR_OPERANDS
from kerasrt.kernels import conv_spec, dual_conv, pointwise_conv, pointwise_pair, registry
from kerasrt.kernels.registry import View
from kerasrt.tuning.choices import Choice, TimingCache, node_key
from kerasrt.tuning.tactics import Pending, Tuner, time_pending

log = logging.getLogger(__name__)
APART = "apart"
"""The timing entry of a merged node's parts, each on its own chosen kernel."""


@dataclass
class Candidate:
    """A merge the pattern allows: the merged node (not yet in the graph), the nodes it
    replaces (in order: the one it stands in for first) and the constants it adds."""

    node: Node
    parts: tuple[Node, ...]
    constants: tuple[Value, ...] = ()


def _plain_1x1(node: Node) -> bool:
    """A fusable 1x1, unpadded convolution over input channels ``dual_conv`` takes."""
    return conv_spec.is_plain_1x1(node) and node.inputs[0].shape[1] % dual_conv.CHANNEL_MULTIPLE == 0


def _no_epilogue(node: Node) -> bool:
    return conv_spec.epilogue_values(node)[1] is None and (node.attrs.get("activation") or "none") == "none"


def _summed_bias(parts: Sequence[Node], name: str) -> Value | None:
    """The summed bias of convolutions (added in float32), as a constant not yet in a graph."""
    biases = [b.data for b in (conv_spec.epilogue_values(n)[0] for n in parts) if b is not None]
    if not biases:
        return None
    total = sum((b.float() for b in biases[1:]), biases[0].float()).to(biases[0].dtype)
    return Value(name, total.shape, dtype_name(total.dtype), total)


def _activation_attrs(node: Node, prefix: str = "activation") -> dict:
    return {prefix: node.attrs.get("activation"), prefix + "_attrs": node.attrs.get("activation_attrs")}


def dual_candidates(view: View) -> list[Candidate]:
    """1x1 convolutions with a residual made by another 1x1 convolution without epilogue for
    it alone, one of the two at stride 1."""
    found = []
    for lead in view.nodes:
        residual = conv_spec.epilogue_values(lead)[1] if _plain_1x1(lead) else None
        other = residual.producer if residual is not None else None
        if other is None or not view.inside(other) or not _plain_1x1(other) or not _no_epilogue(other):
            continue
        if not view.private(residual, lead):
            continue
        unit = [n for n in (other, lead) if conv_spec.geometry(n)[0] == [1, 1]]
        if not unit:
            continue
        # the first product (h) is a stride-1 one, whose input is read by it alone where one
        # is: a pair may then go on from the dual and write over h
        first = next((n for n in unit if view.private(n.inputs[0], n)), unit[0])
        second = other if first is lead else lead
        bias = _summed_bias((lead, other), lead.outputs[0].name + "_dual_bias")
        inputs = [first.inputs[0], first.inputs[1], second.inputs[0], second.inputs[1]]
        attrs = {
            "stride": conv_spec.geometry(second)[0],
            "has_bias": bias is not None,
            **_activation_attrs(lead),
        }
        node = Node("dual_conv", [*inputs, *([bias] if bias is not None else [])], [], attrs, lead.layer)
        found.append(Candidate(node, (lead, other), (bias,) if bias is not None else ()))
    return found


def pair_candidates(view: View) -> list[Candidate]:
    """A 1x1 stride-1 convolution or a ``dual_conv`` whose output a second 1x1 convolution
    without residual reduces back to the first's input channels (at most
    ``pointwise_pair.MERGE_MAX_CHANNELS``), where that input is made in the engine and read
    by the first alone (the pair writes over it)."""
    found, taken = [], set()
    for first in view.nodes:
        if id(first) in taken or not (pointwise_conv.eligible(first) or first.op == "dual_conv"):
            continue
        x = first.inputs[0]
        channels = x.shape[1]
        if channels > pointwise_pair.MERGE_MAX_CHANNELS or not view.private(x, first):
            continue
        if first.op == "dual_conv" and first.inputs[2].shape[1] > pointwise_pair.MAX_CHANNELS:
            continue
        output = first.outputs[0]
        for user in output.users:
            if id(user) in taken or not view.inside(user) or not pointwise_conv.eligible(user):
                continue
            if conv_spec.epilogue_values(user)[1] is not None or user.inputs[0] is not output:
                continue
            if user.outputs[0].shape != x.shape:
                continue
            found.append(_pair(first, user))
            taken |= {id(first), id(user)}
            break
    return found


def _pair(first: Node, reduction: Node) -> Candidate:
    operands: dict[str, Value] = {}
    if first.op == "dual_conv":
        h, w, x, ws, *bias = first.inputs
        operands.update(x=h, w1=w, shortcut=x, ws=ws)
        if bias:
            operands["b1"] = bias[0]
        stride = list(first.attrs["stride"])
    else:
        bias, residual = conv_spec.epilogue_values(first)
        operands.update(x=first.inputs[0], w1=first.inputs[1])
        if bias is not None:
            operands["b1"] = bias
        if residual is not None:
            operands["residual"] = residual
        stride = [1, 1]
    operands["w2"] = reduction.inputs[1]
    b2 = conv_spec.epilogue_values(reduction)[0]
    if b2 is not None:
        operands["b2"] = b2
    names = [n for n in PAIR_OPERANDS if n in operands]
    attrs = {
        "operands": names,
        "stride": stride,
        **_activation_attrs(first),
        **_activation_attrs(reduction, "activation2"),
    }
    node = Node("conv_pair", [operands[n] for n in names], [], attrs, first.layer)
    return Candidate(node, (first, reduction))


RULES: tuple[tuple[str, Callable[[View], list[Candidate]]], ...] = (
    ("dual_conv", dual_candidates),
    ("conv_pair", pair_candidates),
)


def merge(
    graph: Graph,
    nodes: list[Node],
    outputs: Sequence[Value],
    tuner: Tuner,
    timings: TimingCache,
    progress: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Apply each rule to the engine whose nodes are ``nodes`` (updated in place as the graph
    is rewritten; ``outputs``: its values read outside it), keeping the merges whose kernel
    beats their parts. Returns how often each rule fired."""
    fired: dict[str, int] = {}
    for op, rule in RULES:
        view = View(list(nodes), outputs)
        chosen = [c for c in rule(view) if _apart_ms(c) is not None]
        family = next((f for f in registry.families() if op in f.ops), None)
        if not chosen or family is None or not tuner.available(family):
            continue
        keys = {id(c): node_key(c.node, view) for c in chosen}
        untimed = [c for c in chosen if family.name not in timings.get(keys[id(c)])]
        operands = tuner.operands()
        if untimed:
            if progress is not None:
                progress(f"timing merged kernels for {len(untimed)} group(s) of neighbouring convolutions")
            pending = [Pending(c.node, keys[id(c)], [family], [family.name], [family.name]) for c in untimed]
            prebuilt = tuner.prepare(pending, view, operands)
            for p in pending:
                time_pending(p, view, tuner, operands, timings, prebuilt)
        replaced: dict[int, Value] = {}  # outputs of rewritten parts -> what reads in their place
        for c in chosen:
            merged = timings.get(keys[id(c)]).get(family.name)
            apart = _apart_ms(c)
            if merged is None or merged[1] is None or apart is None or merged[1] >= apart:
                continue
            timed = {family.name: merged, APART: (0, round(apart, 5))}
            c.node.attrs[KERNEL] = Choice(family.name, merged[0], timed).attr()
            _replace(graph, nodes, c, replaced)
            fired[op] = fired.get(op, 0) + 1
    return fired


def _apart_ms(candidate: Candidate) -> float | None:
    """The parts' time on their own chosen kernels, where each was timed."""
    times = [choice.ms if choice is not None else None for choice in map(Choice.of, candidate.parts)]
    return None if None in times else sum(times)


def _replace(graph: Graph, nodes: list[Node], candidate: Candidate, replaced: dict[int, Value]) -> None:
    """Put the merged node in the graph where its first part was, its outputs read in place of
    the parts' (in order), and drop the parts. ``replaced``: the outputs of parts rewritten
    earlier (a candidate found before may read one), by id -> the value read instead."""
    lead = candidate.parts[0]
    inputs = [
        graph.add_constant(v.name, v.data)
        if any(v is c for c in candidate.constants)
        else replaced.get(id(v), v)
        for v in candidate.node.inputs
    ]
    node = graph.add_node(
        candidate.node.op,
        inputs,
        candidate.node.attrs,
        layer=lead.layer,
        name=lead.outputs[0].name,
        before=lead,
    )
    for part, value in zip(candidate.parts, node.outputs):
        graph.replace_uses(part.outputs[0], value)
        replaced[id(part.outputs[0])] = value
    graph.remove_unused()  # the parts, now unread
    nodes[nodes.index(lead)] = node
    for part in candidate.parts[1:]:
        nodes.remove(part)
    log.debug("merged %s into %s", [p.outputs[0].name for p in candidate.parts], node.op)
