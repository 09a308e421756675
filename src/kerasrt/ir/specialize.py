"""A symbolic graph made concrete: the graph an engine for one set of input shapes is built from.

``graph.meta["symbols"]`` maps each symbol to the input dimension it names (``{"input": i,
"dim": d}``); a graph input's shape holds either numbers or bare symbols there. ``bind``
reads the symbols' values off concrete input shapes (checking that the fixed dimensions and
repeated symbols agree), ``specialize`` evaluates every size of a copy of the graph (a
``full_like`` or ``arange`` node becomes the constant it now is). The copy shares the constants' tensors:
passes replace constants, never write into them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from kerasrt.errors import InputSignatureError
from kerasrt.ir import symbolic
from kerasrt.ir.graph import Graph, Node, Value, torch_dtype, verify
from kerasrt.ir.ops import OPS

SYMBOLS = "symbols"
"""``graph.meta`` key: {symbol: {"input": input index, "dim": dimension index}}."""
GUARDS = "guards"
"""``graph.meta`` key: the conditions on the symbols that the traced code branched on
(``kerasrt.ir.symbolic.SymbolicShapes.guards``): the graph computes the model only where
they hold."""


MATERIALIZED = {
    "full_like": lambda shape, attrs, _: torch.full(shape, attrs["value"], dtype=torch_dtype(attrs["dtype"])),
    "arange": lambda _, attrs, b: torch.arange(
        symbolic.evaluate(attrs["start"], b),
        symbolic.evaluate(attrs["end"], b),
        attrs["step"],
        dtype=torch_dtype(attrs["dtype"]),
    ),
}
"""Ops whose result depends only on sizes: a concrete graph holds them as constants."""


def is_symbolic(graph: Graph) -> bool:
    return any(not symbolic.is_static(v.shape) for v in graph.inputs)


def bind(graph: Graph, shapes: Sequence[Sequence[int]]) -> dict[str, int]:
    """Each symbol's value for inputs of ``shapes``; InputSignatureError names the input whose
    shape does not fit."""
    if len(shapes) != len(graph.inputs):
        raise InputSignatureError(f"the graph takes {len(graph.inputs)} inputs, got {len(shapes)} shapes")
    bindings: dict[str, int] = {}
    for value, shape in zip(graph.inputs, shapes):
        if len(shape) != len(value.shape):
            raise InputSignatureError(
                f"input {value.name!r} has shape {symbolic.shape_str(value.shape)}, got rank {len(shape)}"
            )
        for want, got in zip(value.shape, shape):
            got = int(got)
            if isinstance(want, int):
                if want != got:
                    raise InputSignatureError(
                        f"input {value.name!r} must have shape {symbolic.shape_str(value.shape)}, "
                        f"got {tuple(shape)}"
                    )
            elif bindings.setdefault(want, got) != got:
                raise InputSignatureError(
                    f"input {value.name!r} of shape {tuple(shape)}: its size {want} must equal "
                    f"{bindings[want]}, the size of the same dimension of another input"
                )
            elif got < 1:
                raise InputSignatureError(f"input {value.name!r} has an empty dimension: {tuple(shape)}")
    return bindings


def broken_guard(graph: Graph, bindings: Mapping[str, int]) -> str | None:
    """The first of the graph's guards that ``bindings`` break, or None where the graph
    serves them.

    A guard broken only because a size is 1 is ignored: such guards come from PyTorch's
    stride and contiguity bookkeeping (a size-1 dimension has any stride), which the IR does
    not model, and IR ops broadcast size-1 dimensions themselves; ``specialize`` re-infers
    every shape, so a size that does matter fails there.
    """
    above_one = {k: (v if v != 1 else 2) for k, v in bindings.items()}
    for guard in graph.meta.get(GUARDS, ()):
        if not symbolic.holds(guard, bindings) and not (
            above_one != bindings and symbolic.holds(guard, above_one)
        ):
            return guard
    return None


def specialize(graph: Graph, bindings: Mapping[str, int], check: bool = True) -> Graph:
    """A copy of ``graph`` with every symbol replaced by its value in ``bindings``.

    ``check`` re-infers every node's types at the concrete sizes (``verify``): a model whose
    trace assumed something about a size that these values break is refused here, with the
    node that breaks, rather than computing wrong numbers.
    """
    out = Graph()
    out.meta = {k: v for k, v in graph.meta.items() if k not in (SYMBOLS, GUARDS)}
    out.meta["bindings"] = dict(bindings)
    copies: dict[int, Value] = {}

    def copy(value: Value) -> Value:
        new = Value(value.name, symbolic.specialize_value(value.shape, bindings), value.dtype, value.data)
        out._names.add(value.name)
        copies[id(value)] = new
        return new

    out.inputs = [copy(v) for v in graph.inputs]
    for name, value in graph.constants.items():
        out.constants[name] = copy(value)
    for node in graph.nodes:
        if node.op in MATERIALIZED:  # its sizes are known now: a constant, as a static import makes
            (value,) = node.outputs
            data = MATERIALIZED[node.op](
                symbolic.specialize_value(value.shape, bindings), node.attrs, bindings
            )
            copies[id(value)] = out.add_constant(out.fresh_name(value.name), data)
            continue
        dims = OPS[node.op].dim_attrs if node.op in OPS else ()
        attrs = {k: symbolic.specialize_value(v, bindings) if k in dims else v for k, v in node.attrs.items()}
        new = Node(node.op, [copies[id(v)] for v in node.inputs], [], attrs, node.layer)
        for value in node.outputs:
            result = copy(value)
            result.producer = new
            new.outputs.append(result)
        for value in new.inputs:
            value.users.append(new)
        out.nodes.append(new)
    out.outputs = [copies[id(v)] for v in graph.outputs]
    if check:
        verify(out)
    return out
