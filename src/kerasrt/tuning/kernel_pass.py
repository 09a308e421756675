"""The kernel pass: the cost-guided pass that writes kernel choices into a graph.

For each engine segment it records the fastest kernel of every node a family runs
(``tactics.choose``), then rewrites neighbouring convolutions into merged IR ops where one
kernel beats their parts (``merges.merge``). ``graph.meta["kernels"]`` says for which
environment, ``conv_kernels`` mode and excluded families the choices were made: a graph that carries them for
this environment is left as it is (a loaded artifact times nothing); choices made for
another are dropped and made again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kerasrt.compile.partition import Segment
from kerasrt.ir.graph import Graph
from kerasrt.kernels.registry import View
from kerasrt.tuning import merges, tactics


def choose_kernels(
    graph: Graph,
    engines: Sequence[Segment],
    mode: str,
    tuner: tactics.Tuner,
    progress: Callable[[str], None] | None = None,
) -> bool:
    """Choose (``mode``: "auto", "cudnn"; "inductor" chooses nothing) the kernels of the nodes
    of ``engines``, segments of ``graph``, by ``tuner``'s timings. Returns whether the graph
    changed shape (merges: the segments must be made again)."""
    if mode == "inductor" or not engines:  # the graph's choices, if any, run as they are
        return False
    environment = tuner.environment()
    made = graph.meta.get("kernels")
    excluded = sorted(tuner.exclude)
    if (
        made is not None
        and made.get("environment") == environment
        and made.get("mode") == mode
        and made.get("excluded", []) == excluded
    ):
        return False
    tactics.strip(graph.nodes)
    timings = tuner.timing_cache()
    merged: dict[str, int] = {}
    try:
        for seg in engines:
            tactics.choose(seg.nodes, View(seg.nodes, seg.outputs), mode, tuner, timings, progress)
            for op, count in merges.merge(graph, seg.nodes, seg.outputs, tuner, timings, progress).items():
                merged[op] = merged.get(op, 0) + count
    finally:
        tuner.release()
    timings.persist()
    graph.meta["kernels"] = {"environment": environment, "mode": mode, "excluded": excluded, "merged": merged}
    return bool(merged)
