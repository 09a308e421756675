"""Rewrite rules and the pass manager.

A rule looks at one node: it rewrites the graph and returns True, or returns a string
saying why it did not match. A pass is an ordered list of rules swept over the graph until
none fires; the manager runs passes in order, to a fixed point, counting firings per rule.
Rewrites only add nodes before the node they match and redirect uses, so topological
order is kept; dead nodes are dropped after each sweep.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kerasrt.ir.graph import Graph, Node, Value, verify

log = logging.getLogger(__name__)

RuleFn = Callable[[Graph, Node], "bool | str"]


@dataclass(frozen=True)
class Rule:
    """A named rewrite of one node; ``ops`` are the node ops it looks at (empty: all)."""

    name: str
    fn: RuleFn
    ops: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Pass:
    """An ordered list of rules applied together to a fixed point, or a whole-graph
    ``transform`` returning firings per rule name (for rewrites that need a global view)."""

    name: str
    rules: tuple[Rule, ...] = ()
    transform: Callable[[Graph], Counter[str]] | None = None


@dataclass
class PassResult:
    """What a run changed: firings per rule, and graph size before and after."""

    counts: Counter[str] = field(default_factory=Counter)
    nodes_before: int = 0
    nodes_after: int = 0

    @property
    def modified(self) -> bool:
        return bool(self.counts)


def rule(name: str, *ops: str) -> Callable[[RuleFn], Rule]:
    """Declare a rule: ``@rule("cancel_permutes", "permute") def ...``."""

    def wrap(fn: RuleFn) -> Rule:
        return Rule(name, fn, frozenset(ops))

    return wrap


@dataclass
class Budget:
    """Stop rewriting after ``remaining`` firings (bisection of optimizer bugs); ``last``
    names the final firing as (rule, Keras layer)."""

    remaining: int
    last: tuple[str, str] | None = None

    def spend(self, rule_name: str, layer: str) -> None:
        self.remaining -= 1
        self.last = (rule_name, layer)


def run_pass(
    graph: Graph, p: Pass, counts: Counter[str], budget: Budget | None = None, max_sweeps: int = 50
) -> bool:
    """Sweep ``p`` over ``graph`` until no rule fires; returns whether anything changed."""
    if budget is not None and budget.remaining <= 0:
        return False
    if p.transform is not None:
        fired = p.transform(graph)
        counts.update(fired)
        graph.remove_unused()
        if budget is not None and fired:
            budget.spend(p.name, "(whole graph)")
        return bool(fired)
    changed = False
    for _ in range(max_sweeps):
        fired = False
        outputs = {id(v) for v in graph.outputs}
        for node in list(graph.nodes):
            if budget is not None and budget.remaining <= 0:
                break
            if not any(o.users or id(o) in outputs for o in node.outputs):
                continue  # dead since an earlier rewrite in this sweep
            for r in p.rules:
                if (not r.ops or node.op in r.ops) and r.fn(graph, node) is True:
                    counts[r.name] += 1
                    if budget is not None:
                        budget.spend(r.name, node.layer)
                    fired = True
                    break
        if not fired:
            return changed
        graph.remove_unused()
        changed = True
    log.warning("pass %s did not settle after %d sweeps", p.name, max_sweeps)
    return changed


class PassManager:
    """Runs passes in order, repeating the list until the graph stops changing."""

    def __init__(
        self, passes: Sequence[Pass], check: bool = False, max_rounds: int = 10, budget: Budget | None = None
    ):
        self.passes = list(passes)
        self.check = check
        self.max_rounds = max_rounds
        self.budget = budget

    def run(self, graph: Graph) -> PassResult:
        result = PassResult(nodes_before=len(graph.nodes))
        graph.remove_unused()
        for _ in range(self.max_rounds):
            changed = False
            for p in self.passes:
                changed |= run_pass(graph, p, result.counts, self.budget)
                if self.check:
                    verify(graph)
            if not changed:
                break
        result.nodes_after = len(graph.nodes)
        return result


# -- helpers for rules ----------------------------------------------------------------------
def only_user(value: Value, graph: Graph) -> Node | None:
    """The single node reading ``value`` (None if several readers or a graph output)."""
    if len(value.users) != 1 or value in graph.outputs:
        return None
    return value.users[0]


def replace(graph: Graph, node: Node, value: Value) -> bool:
    """Redirect every use of ``node``'s (single) output to ``value``; the node becomes dead."""
    graph.replace_uses(node.outputs[0], value)
    return True


def emit(
    graph: Graph,
    before: Node,
    op: str,
    inputs: list[Value],
    *,
    from_node: Node | None = None,
    **attrs: object,
) -> Value:
    """Add a node just before ``before``, attributed to the Keras layer of ``from_node``
    (default: ``before``)."""
    layer = (from_node or before).layer
    return graph.add_node(op, inputs, dict(attrs), layer=layer, before=before).outputs[0]
