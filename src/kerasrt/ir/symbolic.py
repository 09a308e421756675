"""Symbolic dimensions: sizes that are known only when the model is called.

A dimension of an IR shape is an ``int`` or a string holding an integer expression over
symbols (``"s0"``, ``"s1*12"``, ``"(s1 - 1)//2 + 1"``): Python's integer syntax with ``+ - * //
% **``, ``min`` and ``max``. Symbols stand for graph-input dimensions (the batch, and every
dimension the model declares unknown); ``graph.meta["symbols"]`` says which input dimension
each one is. Expressions are read with a small parser (never ``eval``), so a stored graph
runs no code, and evaluated on plain integers when a shape becomes concrete.

Shape inference on symbols runs an op's reference implementation on fake tensors whose sizes
are symbolic integers of PyTorch's ``ShapeEnv`` (the machinery behind ``torch.export``'s
dynamic shapes): one declaration of the op still gives both its math and its shapes.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import operator
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import sympy
import torch

from kerasrt.errors import IRError

Dim = int | str
"""A size: a number, or an expression over symbols."""
Shape = tuple[Dim, ...]

_BINARY: dict[type, Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_CALLS: dict[str, Callable[..., int]] = {"min": min, "max": max}
_COMPARE: dict[type, Callable[[int, int], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_ALLOWED = (
    ast.BinOp,
    ast.UnaryOp,
    ast.Name,
    ast.Load,
    ast.Call,
    ast.USub,
    ast.UAdd,
    ast.Not,
    ast.Compare,
    ast.BoolOp,
    ast.And,
    ast.Or,
)


def is_static(shape: Sequence[Dim]) -> bool:
    """Whether every dimension of ``shape`` is a number."""
    return not any(isinstance(d, str) for d in shape)


def normalize(dim: Any) -> Dim:
    """An ``int``, or a canonical expression string (``"s0*2"``, not ``" 2*s0 "``)."""
    if isinstance(dim, bool):
        raise IRError(f"a size cannot be a bool ({dim!r})")
    if isinstance(dim, int):
        return dim
    if isinstance(dim, str):
        return _canonical(dim)
    if isinstance(dim, torch.SymInt):
        raise IRError("a SymInt must be read through SymbolicShapes.dim")
    try:
        return int(dim)
    except (TypeError, ValueError):
        raise IRError(f"{dim!r} is not a size") from None


@functools.lru_cache(maxsize=65536)
def _canonical(text: str) -> Dim:
    return from_sympy(to_sympy(text))


@functools.lru_cache(maxsize=65536)
def _parse(text: str) -> ast.expr:
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise IRError(f"{text!r} is not a size expression") from None
    for node in ast.walk(tree):
        ok = isinstance(node, _ALLOWED) or type(node) in _BINARY or type(node) in _COMPARE
        ok = ok or (isinstance(node, ast.Constant) and type(node.value) is int)
        if isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name) and node.func.id in _CALLS and not node.keywords
        if isinstance(node, ast.Compare):
            ok = len(node.ops) == 1
        if not ok:
            raise IRError(f"{text!r} is not a size expression ({type(node).__name__} is not allowed)")
    return tree


def _walk(
    node: ast.expr, name: Callable[[str], Any], call: Mapping[str, Callable[..., Any]], binary: Mapping
) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return name(node.id)
    if isinstance(node, ast.UnaryOp):
        value = _walk(node.operand, name, call, binary)
        if isinstance(node.op, ast.Not):
            return not value
        return binary[ast.Sub](0, value) if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Compare):
        left = _walk(node.left, name, call, binary)
        return _COMPARE[type(node.ops[0])](left, _walk(node.comparators[0], name, call, binary))
    if isinstance(node, ast.BoolOp):
        values = [_walk(v, name, call, binary) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.BinOp):
        return binary[type(node.op)](
            _walk(node.left, name, call, binary), _walk(node.right, name, call, binary)
        )
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    return call[node.func.id](*[_walk(a, name, call, binary) for a in node.args])


def evaluate(dim: Dim, bindings: Mapping[str, int]) -> int:
    """The value of ``dim`` with each symbol bound to a number."""
    if isinstance(dim, int):
        return dim

    def name(symbol: str) -> int:
        if symbol not in bindings:
            raise IRError(f"size {dim!r} uses symbol {symbol!r}, which has no value here")
        return int(bindings[symbol])

    return int(_walk(_parse(dim), name, _CALLS, _BINARY))


def evaluate_with(dim: str, name: Callable[[str], Any], emit: Callable[..., Any]) -> Any:
    """``dim`` computed by ``emit(fn, *args)`` for each operation (``operator.mul``...), from
    ``name(symbol)`` for each symbol: e.g. the nodes of a program that computes sizes."""

    def call(fn: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *args: emit(fn, *args)

    calls = {"min": call(torch.sym_min), "max": call(torch.sym_max)}
    binary = {op: call(fn) for op, fn in _BINARY.items()}
    return _walk(_parse(dim), name, calls, binary)


def holds(condition: str, bindings: Mapping[str, int]) -> bool:
    """Whether ``condition`` (a comparison of sizes, ``and``/``or``/``not`` of them) is true."""

    def name(symbol: str) -> int:
        if symbol not in bindings:
            raise IRError(f"condition {condition!r} uses symbol {symbol!r}, which has no value here")
        return int(bindings[symbol])

    return bool(_walk(_parse(condition), name, _CALLS, _BINARY))


def condition_text(expr: Any) -> str | None:
    """A guard of PyTorch's ``ShapeEnv`` (a sympy relation) in this module's syntax; ``None``
    for a fact that holds whatever the sizes, or one this syntax cannot write."""
    expr = sympy.sympify(expr)
    if expr in (sympy.true, sympy.false) or not expr.free_symbols:
        return None
    try:
        return _print_condition(expr)
    except IRError:
        return None


def _print_condition(expr: Any) -> str:
    relations = {
        sympy.Eq: "==",
        sympy.Ne: "!=",
        sympy.Lt: "<",
        sympy.Le: "<=",
        sympy.Gt: ">",
        sympy.Ge: ">=",
    }
    for cls, op in relations.items():
        if isinstance(expr, cls):
            return f"{_print(expr.lhs)} {op} {_print(expr.rhs)}"
    if isinstance(expr, (sympy.And, sympy.Or)):
        joiner = " and " if isinstance(expr, sympy.And) else " or "
        return joiner.join(f"({_print_condition(a)})" for a in expr.args)
    if isinstance(expr, sympy.Not):
        return f"not ({_print_condition(expr.args[0])})"
    raise IRError(f"condition {expr} cannot be written in the IR")


SYMBOL = re.compile(r"s\d+")
"""How symbols are named: s0 (the batch), s1, s2... in the order the model's inputs give them."""


def is_size_expression(text: Any) -> bool:
    """Whether ``text`` is a symbolic size (not a string attribute such as ``"tanh"``)."""
    if not isinstance(text, str):
        return False
    try:
        names = symbols_of(text)
    except IRError:
        return False
    return bool(names) and all(SYMBOL.fullmatch(n) for n in names)


def symbols_of(dim: Dim) -> set[str]:
    if isinstance(dim, int):
        return set()
    return {n.id for n in ast.walk(_parse(dim)) if isinstance(n, ast.Name)}


def symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, positive=True)


def to_sympy(dim: Dim) -> sympy.Expr:
    """``dim`` as a sympy expression (``//`` as PyTorch's ``FloorDiv``, ``%`` as its ``Mod``)."""
    from torch.utils._sympy.functions import FloorDiv, Mod

    if isinstance(dim, int):
        return sympy.Integer(dim)
    binary = {
        ast.Add: operator.add,
        ast.Sub: operator.sub,
        ast.Mult: operator.mul,
        ast.FloorDiv: FloorDiv,
        ast.Mod: Mod,
        ast.Pow: operator.pow,
    }
    return _walk(_parse(dim), symbol, {"min": sympy.Min, "max": sympy.Max}, binary)


def from_sympy(expr: Any) -> Dim:
    """An ``int`` for a number, else the expression written in this module's syntax."""
    expr = sympy.sympify(expr)
    if expr.is_Integer:
        return int(expr)
    return _print(expr)


def _print(expr: sympy.Expr) -> str:
    from torch.utils._sympy.functions import CeilDiv, FloorDiv, Mod, PowByNatural, PythonMod

    def wrap(e: sympy.Expr) -> str:
        text = _print(e)
        return (
            text
            if (e.is_Atom or isinstance(e, (sympy.Min, sympy.Max))) and not text.startswith("-")
            else f"({text})"
        )

    if expr.is_Integer:
        return str(int(expr))
    if expr.is_Symbol:
        return expr.name
    if isinstance(expr, sympy.Add):
        terms = sorted(expr.args, key=lambda t: (t.is_Number, sympy.default_sort_key(t)))
        text = _print(terms[0])
        for term in terms[1:]:
            coeff, rest = term.as_coeff_Mul()
            if coeff.is_Number and coeff < 0:
                text += " - " + (_print(-term) if not isinstance(-term, sympy.Add) else f"({_print(-term)})")
            else:
                text += " + " + _print(term)
        return text
    if isinstance(expr, sympy.Mul):
        coeff, rest = expr.as_coeff_Mul()
        if coeff == -1:
            return "-" + wrap(rest)
        factors = sorted(expr.args, key=lambda t: (not t.is_Number, sympy.default_sort_key(t)))
        if any(f.is_Rational and not f.is_Integer for f in factors):
            raise IRError(f"size expression {expr} is not an integer expression")
        return "*".join(wrap(f) for f in factors)
    if isinstance(expr, FloorDiv):
        return f"{wrap(expr.args[0])}//{wrap(expr.args[1])}"
    if isinstance(expr, CeilDiv):
        return f"-((-{wrap(expr.args[0])})//{wrap(expr.args[1])})"
    if isinstance(expr, (Mod, PythonMod)):
        return f"{wrap(expr.args[0])} % {wrap(expr.args[1])}"
    if isinstance(expr, (sympy.Pow, PowByNatural)):
        base, exp = expr.args
        if not (exp.is_Integer and exp > 0):
            raise IRError(f"size expression {expr} is not an integer expression")
        return f"{wrap(base)}**{int(exp)}"
    if isinstance(expr, (sympy.Min, sympy.Max)):
        name = "min" if isinstance(expr, sympy.Min) else "max"
        return f"{name}({', '.join(_print(a) for a in expr.args)})"
    raise IRError(f"size expression {expr} ({type(expr).__name__}) cannot be written in the IR")


def specialize_value(value: Any, bindings: Mapping[str, int]) -> Any:
    """``value`` (a size, or a list of sizes) with every expression evaluated."""
    if isinstance(value, str):
        return evaluate(value, bindings)
    if isinstance(value, (list, tuple)):
        return type(value)(specialize_value(v, bindings) for v in value)
    return value


def shape_str(shape: Iterable[Dim]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


class SymbolicShapes:
    """Fake tensors with symbolic sizes, for running ops on shapes that hold symbols.

    Each symbol of ``hints`` becomes a ``ShapeEnv`` symbol whose hint is its value there:
    the hint only picks the branch where an op's shape code branches (a size compared with
    another), so the hints must be distinct, and at least 2 (PyTorch treats sizes 0 and 1 as
    constants). ``dim`` turns the sizes of the results back into ``Dim``s.
    """

    def __init__(self, hints: Mapping[str, int], allow_constants: bool = True):
        from torch._dynamo.source import ConstantSource
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

        self.env = ShapeEnv(duck_shape=False, specialize_zero_one=False)
        self.fake_mode = FakeTensorMode(shape_env=self.env, allow_non_fake_inputs=allow_constants)
        self._ours: dict[sympy.Symbol, sympy.Symbol] = {}  # the env's symbol -> ours
        self._theirs: dict[sympy.Symbol, sympy.Symbol] = {}
        self.hints = {k: int(v) for k, v in hints.items()}
        for name, hint in self.hints.items():
            source = ConstantSource(f"kerasrt_{name}")
            theirs = self.env.create_symbol(hint, source, dynamic_dim=DimDynamic.DYNAMIC)
            self._ours[theirs] = symbol(name)
            self._theirs[symbol(name)] = theirs

    @contextlib.contextmanager
    def mode(self) -> Iterator[None]:
        """Run ops on this env's fake tensors, through PyTorch's Python decompositions (as
        ``make_fx`` does: several C++ meta kernels would fix a symbol to its hint)."""
        from torch._dispatch.python import enable_python_dispatcher

        with self.fake_mode, enable_python_dispatcher():
            yield

    def specialized(self) -> list[str]:
        """The symbols an op fixed to their hint (such an op needs concrete sizes)."""
        return sorted(self._ours[s].name for s in self.env.replacements if s in self._ours)

    def symint(self, dim: Dim) -> int | torch.SymInt:
        if isinstance(dim, int):
            return dim
        expr = to_sympy(dim)
        missing = {s.name for s in expr.free_symbols} - set(self.hints)
        if missing:
            raise IRError(f"size {dim!r} uses symbols {sorted(missing)} with no hint")
        return self.env.create_symintnode(expr.xreplace(self._theirs), hint=evaluate(dim, self.hints))

    def sizes(self, shape: Sequence[Dim]) -> list[int | torch.SymInt]:
        return [self.symint(d) for d in shape]

    def empty(self, shape: Sequence[Dim], dtype: torch.dtype) -> torch.Tensor:
        """A fake tensor of ``shape`` (call inside ``self.mode()``)."""
        return torch.empty(self.sizes(shape), dtype=dtype)

    def dim(self, size: Any) -> Dim:
        """A ``Dim`` for a size that ops computed (an int or a SymInt of this env)."""
        if isinstance(size, torch.SymInt):
            expr = self.env.simplify(size.node.expr)
            unknown = expr.free_symbols - set(self._ours)
            if unknown:
                raise IRError(
                    f"size {expr} depends on tensor values ({sorted(map(str, unknown))}), not on shapes"
                )
            return from_sympy(expr.xreplace(self._ours))
        return int(size)

    def shape(self, sizes: Iterable[Any]) -> Shape:
        return tuple(self.dim(s) for s in sizes)

    def guards(self) -> list[str]:
        """What the traced code assumed about the sizes (each comparison it branched on), in
        this module's syntax: the sizes a trace holds for.

        Left out: facts that hold for any sizes, and guards raised inside PyTorch's fake and
        meta kernels (strides, memory formats, shape checks). Those decide how a tensor is
        laid out or whether an op accepts its inputs, not which ops the trace recorded: the IR
        does not model strides, and ``specialize`` runs every shape check again at the
        concrete sizes. What stays are branches in the model's code (Keras's or the
        user's, ``torch.nn.functional``'s), which shaped the recorded ops."""
        texts: dict[str, None] = {}
        for guard in self.env.guards:
            if _from_shape_bookkeeping(guard):
                continue
            expr = self.env.simplify(guard.expr)
            text = condition_text(expr.xreplace(self._ours)) if expr.free_symbols <= set(self._ours) else None
            if text is not None:
                texts[text] = None
        return list(texts)


_BOOKKEEPING = tuple(
    f"{os.sep}{path}"
    for path in (
        os.path.join("torch", "_prims_common"),
        os.path.join("torch", "_prims"),
        os.path.join("torch", "_subclasses"),
        os.path.join("torch", "_meta_registrations.py"),
        os.path.join("torch", "_refs"),
        os.path.join("torch", "fx"),
        os.path.join("kerasrt", ""),
    )
)


def _from_shape_bookkeeping(guard: Any) -> bool:
    """Whether a ShapeEnv guard was raised in PyTorch's own fake/meta kernels (or in
    kerasrt's tracing code, which only forwards to them)."""
    location = getattr(getattr(guard, "sloc", None), "framework_loc", None)
    filename = getattr(location, "filename", None)
    return isinstance(filename, str) and any(part in filename for part in _BOOKKEEPING)


DEFAULT_HINTS = (61, 67, 71, 73, 79, 83, 89, 97, 101, 103, 107, 109, 113, 127, 131, 137)
"""Hints for symbols with no size to go by: distinct primes, so no two symbols (nor products
of them) look equal to the op code that branches on sizes."""


def hints(names: Iterable[str], given: Mapping[str, int] | None = None) -> dict[str, int]:
    """A hint for every symbol: its size in ``given`` where there is one, else the next of
    ``DEFAULT_HINTS`` (symbols in order); raised where needed so that every hint is at least
    2 and no two are equal (``SymbolicShapes`` says why). A raise is by 64, which keeps the
    size's remainders (a trace branches on parity, not on 224 vs 288)."""
    given = given or {}
    names = sorted(set(names), key=lambda n: (len(n), n))
    if sum(n not in given for n in names) > len(DEFAULT_HINTS):
        raise IRError(f"{len(names)} symbolic dimensions; kerasrt handles at most {len(DEFAULT_HINTS)}")
    defaults = iter(DEFAULT_HINTS)
    chosen: dict[str, int] = {}
    for name in names:
        hint = max(given[name] if name in given else next(defaults), 2)
        while hint in chosen.values():
            hint += 64
        chosen[name] = hint
    return chosen
