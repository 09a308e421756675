"""Graph optimization: passes over the IR, grouped into optimization levels (data)."""

from __future__ import annotations

from kerasrt.ir.graph import Graph
from kerasrt.passes.algebra import ALGEBRA
from kerasrt.passes.attention import ATTENTION
from kerasrt.passes.base import Budget, Pass, PassManager, PassResult
from kerasrt.passes.fusion import HORIZONTAL, VERTICAL
from kerasrt.passes.layout import LAYOUT
from kerasrt.passes.structural import CSE, STRUCTURAL

LEVELS: dict[int, tuple[Pass, ...]] = {
    0: (),
    1: (STRUCTURAL, CSE, LAYOUT),
    2: (STRUCTURAL, CSE, LAYOUT, ALGEBRA, VERTICAL, HORIZONTAL, ATTENTION),
}
"""0: none; 1: exact structural clean-ups; 2: everything (the default)."""


def optimize(graph: Graph, level: int = 2, check: bool = False, budget: Budget | None = None) -> PassResult:
    """Rewrite ``graph`` in place with the passes of ``level``; ``check`` verifies after each
    pass; ``budget`` caps the number of rewrites (for bisecting a miscompile)."""
    if level not in LEVELS:
        raise ValueError(f"optimization level must be one of {sorted(LEVELS)}, got {level}")
    return PassManager(LEVELS[level], check=check, budget=budget).run(graph)


__all__ = ["LEVELS", "Budget", "PassResult", "optimize"]
