"""Split a graph into engine segments and fallback nodes.

The partitioner knows nothing about ops: it asks ``is_supported(node)``. Segments are
maximal runs of supported nodes in topological order, so no segment can form a cycle;
runs shorter than ``minimum_segment_size`` stay outside engines and run natively (op by
op in PyTorch), as TF-TRT leaves small clusters to TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kerasrt.ir.graph import Graph, Node, Value


@dataclass(frozen=True)
class Support:
    """Whether a backend can run a node in an engine, and if not, why (shown in the report);
    ``native``: it still runs op by op outside engines (else it falls back to Keras)."""

    ok: bool
    reason: str = ""
    native: bool = False


@dataclass
class Segment:
    """A run of nodes executed together: an ``engine``, ``native`` ops, or a Keras ``fallback``."""

    index: int
    kind: str
    nodes: list[Node]
    inputs: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    reason: str = ""


def partition(
    graph: Graph, is_supported: Callable[[Node], Support], minimum_segment_size: int
) -> list[Segment]:
    """Segments covering every node of ``graph`` exactly once, in execution order."""
    runs: list[tuple[bool, list[Node], str, bool]] = []
    for node in graph.nodes:
        support = is_supported(node)
        if support.ok and runs and runs[-1][0]:
            runs[-1][1].append(node)
        else:
            runs.append((support.ok, [node], support.reason, support.native))
    segments: list[Segment] = []
    for ok, nodes, reason, native in runs:
        if native:
            kind, why = "native", reason
        elif ok:
            kind = "engine" if len(nodes) >= minimum_segment_size else "native"
            why = (
                ""
                if kind == "engine"
                else f"{len(nodes)} op(s) < minimum_segment_size={minimum_segment_size}"
            )
        else:
            kind, why = "fallback", reason
        segments.append(Segment(len(segments), kind, nodes, reason=why))
    _connect(graph, segments)
    return segments


def _connect(graph: Graph, segments: list[Segment]) -> None:
    """Fill each segment's boundary values: what it reads from outside, what others need."""
    owner: dict[int, int] = {}
    for seg in segments:
        for node in seg.nodes:
            for out in node.outputs:
                owner[id(out)] = seg.index
    graph_outputs = {id(v) for v in graph.outputs}
    for seg in segments:
        seen: set[int] = set()
        for node in seg.nodes:
            for value in node.inputs:
                if not value.is_constant and owner.get(id(value)) != seg.index and id(value) not in seen:
                    seen.add(id(value))
                    seg.inputs.append(value)
            for out in node.outputs:
                external = any(owner.get(id(o), -1) != seg.index for u in out.users for o in u.outputs)
                if external or id(out) in graph_outputs:
                    seg.outputs.append(out)
