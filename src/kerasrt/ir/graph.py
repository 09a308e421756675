"""The IR: values that know their producer and users, nodes of primitive ops, and graphs.

A graph holds its nodes in topological order. Constants (weights) are values with
``data`` set and no producer. A dimension is a number or an expression over symbols
(``kerasrt.ir.symbolic``): one imported graph serves every input shape, and ``specialize``
makes the concrete graph an engine is built from.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kerasrt.errors import IRError
from kerasrt.ir.symbolic import Dim, normalize

Shape = tuple[Dim, ...]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_SHORT = {
    "float32": "f32",
    "float16": "f16",
    "bfloat16": "bf16",
    "float64": "f64",
    "float8_e4m3fn": "f8e4m3",
    "bool": "b1",
}


def _row_major_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for an IR dtype name."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise IRError(f"unknown dtype {name!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The IR dtype name of a torch dtype."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise IRError(f"dtype {dtype} has no IR equivalent") from None


class Value:
    """A tensor in the graph: a graph input, a constant, or a node output."""

    __slots__ = ("data", "dtype", "name", "producer", "shape", "users")

    def __init__(self, name: str, shape: Sequence[Dim], dtype: str, data: torch.Tensor | None = None):
        self.name = name
        self.shape: Shape = tuple(normalize(d) for d in shape)
        self.dtype = dtype
        self.producer: Node | None = None
        self.users: list[Node] = []
        self.data = data

    @property
    def is_constant(self) -> bool:
        return self.data is not None

    def type_str(self) -> str:
        return f"{_SHORT.get(self.dtype, self.dtype)}[{','.join(map(str, self.shape))}]"

    def __repr__(self) -> str:
        return f"Value({self.name}: {self.type_str()})"


@dataclass(eq=False)
class Node:
    """One primitive op applied to values; ``layer`` names the Keras layer it came from."""

    op: str
    inputs: list[Value]
    outputs: list[Value]
    attrs: dict[str, Any] = field(default_factory=dict)
    layer: str = ""

    def __repr__(self) -> str:
        return f"Node({self.op} -> {[v.name for v in self.outputs]}, layer={self.layer!r})"


class Graph:
    """A graph of nodes in topological order, with named inputs, outputs and constants."""

    def __init__(self) -> None:
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.nodes: list[Node] = []
        self.constants: dict[str, Value] = {}
        self.meta: dict[str, Any] = {}  # JSON-safe notes, e.g. what the optimizer did
        self._names: set[str] = set()
        self._counter = itertools.count()

    # -- construction -------------------------------------------------------------------
    def fresh_name(self, hint: str) -> str:
        """A value name not used yet in this graph, based on ``hint``."""
        hint = hint or "v"
        name = hint
        while name in self._names:
            name = f"{hint}_{next(self._counter)}"
        self._names.add(name)
        return name

    def add_input(self, name: str, shape: Sequence[Dim], dtype: str) -> Value:
        value = Value(self.fresh_name(name), shape, dtype)
        self.inputs.append(value)
        return value

    def add_constant(self, name: str, data: torch.Tensor) -> Value:
        data = data.detach()
        if data.stride() != _row_major_strides(data.shape):
            # A folded permute can leave a "contiguous" tensor whose size-1 dims carry odd
            # strides; kernels pick their algorithm (and rounding) by strides, and a saved and
            # reloaded constant has row-major ones: store that layout from the start.
            data = data.clone(memory_format=torch.contiguous_format)
        value = Value(self.fresh_name(name), data.shape, dtype_name(data.dtype), data=data)
        self.constants[value.name] = value
        return value

    def add_node(
        self,
        op: str,
        inputs: Sequence[Value],
        attrs: dict[str, Any] | None = None,
        *,
        layer: str = "",
        output_types: Sequence[tuple[Sequence[Dim], str]] | None = None,
        name: str | None = None,
        before: Node | None = None,
    ) -> Node:
        """Add a node (at the end, or just before ``before``); output types are inferred
        from the op unless given."""
        from kerasrt.ir.ops import infer_types

        attrs = dict(attrs or {})
        if output_types is None:
            output_types = infer_types(op, inputs, attrs)
        node = Node(op, list(inputs), [], attrs, layer)
        hint = name or op
        for shape, dtype in output_types:
            out = Value(self.fresh_name(hint), shape, dtype)
            out.producer = node
            node.outputs.append(out)
        for value in node.inputs:
            value.users.append(node)
        if before is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self.nodes.index(before), node)
        return node

    # -- queries and edits --------------------------------------------------------------
    def values(self) -> Iterable[Value]:
        yield from self.inputs
        yield from self.constants.values()
        for node in self.nodes:
            yield from node.outputs

    def remove_unused(self) -> int:
        """Drop nodes and constants that no graph output depends on; returns nodes removed."""
        live: set[int] = {id(v) for v in self.outputs}
        kept: list[Node] = []
        for node in reversed(self.nodes):
            if any(id(o) in live for o in node.outputs):
                kept.append(node)
                live.update(id(v) for v in node.inputs)
            else:
                for value in node.inputs:
                    value.users.remove(node)
        removed = len(self.nodes) - len(kept)
        self.nodes = kept[::-1]
        self.constants = {k: v for k, v in self.constants.items() if v.users or id(v) in live}
        return removed

    def replace_uses(self, old: Value, new: Value) -> None:
        """Make every user of ``old`` (and the graph outputs) read ``new`` instead."""
        for user in old.users:
            user.inputs = [new if v is old else v for v in user.inputs]
            new.users.append(user)
        old.users = []
        self.outputs = [new if v is old else v for v in self.outputs]


def verify(graph: Graph) -> None:
    """Check every invariant of ``graph``; raise IRError naming the first one broken."""
    from kerasrt.ir.ops import OPS, infer_types

    seen: set[int] = set()
    names: set[str] = set()

    def define(value: Value, where: str) -> None:
        if value.name in names:
            raise IRError(f"value name {value.name!r} defined twice ({where})")
        names.add(value.name)
        seen.add(id(value))

    for value in graph.inputs:
        if value.producer is not None or value.is_constant:
            raise IRError(f"graph input {value.name} has a producer or data")
        define(value, "input")
    for key, value in graph.constants.items():
        if key != value.name or not value.is_constant or value.producer is not None:
            raise IRError(f"constant {key} is malformed")
        if tuple(value.data.shape) != value.shape or dtype_name(value.data.dtype) != value.dtype:
            raise IRError(f"constant {key} data does not match its declared type")
        define(value, "constant")
    for node in graph.nodes:
        if node.op not in OPS:
            raise IRError(f"node {node!r} uses unknown op {node.op!r}")
        opdef = OPS[node.op]
        for value in node.inputs:
            if id(value) not in seen:
                raise IRError(f"{node!r} reads {value.name}, which is not defined before it")
            if node not in value.users:
                raise IRError(f"{value.name} does not list {node!r} among its users")
        unknown = set(node.attrs) - set(opdef.attrs)
        if unknown:
            raise IRError(f"{node!r} has undeclared attributes {sorted(unknown)}")
        if opdef.infer:
            expected = infer_types(node.op, node.inputs, node.attrs)
            actual = [(v.shape, v.dtype) for v in node.outputs]
            if [(tuple(s), d) for s, d in expected] != actual:
                raise IRError(f"{node!r} declares {actual} but its op infers {expected}")
        for out in node.outputs:
            if out.producer is not node:
                raise IRError(f"{out.name} does not name {node!r} as its producer")
            define(out, repr(node))
    for value in graph.values():
        for user in value.users:
            if value not in user.inputs:
                raise IRError(f"{value.name} lists a user that does not read it")
    for value in graph.outputs:
        if id(value) not in seen:
            raise IRError(f"graph output {value.name} is not defined")


def _fmt_attr(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt_attr(v) for v in value) + "]"
    return str(value)


def dump(graph: Graph) -> str:
    """A readable text form of the graph, one node per line (used by inspect and tests)."""
    lines = [
        "graph("
        + ", ".join(f"%{v.name}: {v.type_str()}" for v in graph.inputs)
        + ") -> ("
        + ", ".join(f"%{v.name}" for v in graph.outputs)
        + ")"
    ]
    for value in graph.constants.values():
        lines.append(f"  @{value.name}: {value.type_str()}")
    for node in graph.nodes:
        outs = ", ".join(f"%{v.name}: {v.type_str()}" for v in node.outputs)
        ins = ", ".join(("@" if v.is_constant else "%") + v.name for v in node.inputs)
        attrs = ", ".join(
            f"{k}={_fmt_attr(v)}" for k, v in node.attrs.items() if k not in ("call", "kernel_choice")
        )
        choice = node.attrs.get("kernel_choice")
        if choice:  # the kernel chosen to run it, and its config (``inspect --tactics`` has the timings)
            attrs += (", " if attrs else "") + f"kernel={choice['kernel']}#{choice['config']}"
        line = f"  {outs} = {node.op}({ins})" + (f" {{{attrs}}}" if attrs else "")
        if node.layer:
            line += f"  # {node.layer}"
        lines.append(line)
    return "\n".join(lines)
