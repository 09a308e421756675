"""Lower an ATen-level torch.fx graph (from tracing Keras on its torch backend) into the IR.

``LOWERINGS`` maps each supported ``torch._ops.OpOverload`` to its lowering function; the
only way in is the ``lowering`` decorator. It takes op packets (``aten.add``: every overload)
or single overloads, and each op's in-place twin (``aten.add_``) gets the same lowering, so
a lookup is one exact dict hit on the traced node's target. One function can lower a family
of variants (``max_pool2d`` and ``max_pool2d_with_indices``, ``softmax`` and
``log_softmax``): each registration binds keyword arguments that tell it which variant it
lowers, so no lowering inspects the op it is called for.

A node whose tensor inputs are all constants is evaluated right away (weights get permuted
once, here, not per call; an in-place op runs on a copy, so nodes that already read the
constant keep its old value). A surviving in-place op (its schema writes its first argument)
rebinds that argument to its result, so later readers see the update. Every lowered value
is checked against the shape and dtype the tracer recorded, so a wrong lowering is refused
instead of producing wrong numbers.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import sympy
import torch
from torch._ops import OpOverload, OpOverloadPacket
from torch.fx.operator_schemas import normalize_function

from kerasrt.ir import symbolic
from kerasrt.ir.graph import Graph, Value, dtype_name
from kerasrt.ir.symbolic import Dim

aten = torch.ops.aten


class UnsupportedOp(Exception):
    """An ATen op has no lowering (or lowers to something that does not check out)."""


class _Unavailable:
    """An output of a multi-output op that kerasrt does not compute (e.g. pooling indices)."""

    def __init__(self, what: str):
        self.what = what


@dataclass(frozen=True)
class _ValueIndex:
    """An integer the traced code read from a tensor of the graph (``Tensor.item()``; a KV
    cache's write position): the start of a slice it cuts becomes a gather at run time."""

    value: Value
    """The one-element tensor it was read from."""
    symbol: Any
    """The tracer's (unbacked) symbol for it."""


@dataclass(frozen=True)
class _FromValues:
    """A size or condition computed from integers read from tensors: only the end of a slice
    whose start is a ``_ValueIndex`` may be one."""

    expression: Any
    """The tracer's sympy expression."""


def _reads_values(val: Any) -> bool:
    """Whether a traced SymInt/SymBool/SymFloat depends on tensor values (unbacked symbols)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    return isinstance(val, (torch.SymInt, torch.SymBool, torch.SymFloat)) and bool(free_unbacked_symbols(val))


def _read(env: dict, node: torch.fx.Node) -> Any:
    value = env[node]
    if isinstance(value, _Unavailable):
        raise UnsupportedOp(value.what)
    return value


def _optional(name: str) -> OpOverloadPacket | None:
    """An ATen op that some supported torch versions lack (``lowering`` skips ``None``)."""
    return getattr(aten, name, None)


def _writes_first_arg(op: OpOverload) -> bool:
    """Whether ``op`` updates its first argument in place (``relu_``, ``add_.Tensor``...)."""
    args = op._schema.arguments
    return bool(args) and args[0].alias_info is not None and args[0].alias_info.is_write


def _in_place_twin(op: OpOverloadPacket | OpOverload) -> OpOverloadPacket | OpOverload | None:
    """``aten.relu_`` for ``aten.relu`` (``aten.add_.Tensor`` for ``aten.add.Tensor``), if it exists."""
    packet = op.overloadpacket if isinstance(op, OpOverload) else op
    namespace, name = packet._qualified_op_name.split("::")
    twin = getattr(getattr(torch.ops, namespace), name + "_", None)
    if twin is None or isinstance(op, OpOverloadPacket):
        return twin
    return getattr(twin, op._overloadname, None)


def _overloads_of(op: OpOverloadPacket | OpOverload | None) -> list[OpOverload]:
    if isinstance(op, OpOverloadPacket):
        return [getattr(op, name) for name in op.overloads()]
    return [] if op is None else [op]


def overloads(*ops: OpOverloadPacket | OpOverload | None) -> list[OpOverload]:
    """The overloads named by ``ops`` (a packet stands for all of its overloads, ``None`` for
    none), plus those of their in-place twins."""
    out: list[OpOverload] = []
    for op in ops:
        if op is not None and not isinstance(op, (OpOverloadPacket, OpOverload)):
            raise TypeError(f"expected a torch op such as aten.relu, got {op!r}")
        out.extend(_overloads_of(op))
        if op is not None:
            out.extend(o for o in _overloads_of(_in_place_twin(op)) if _writes_first_arg(o))
    return out


# Ops that only pass their input through at inference time.
_IDENTITY = (
    aten.clone,
    aten.contiguous,
    aten.alias,
    aten.alias_copy,
    aten.detach,
    aten.detach_copy,
    aten.lift_fresh_copy,
    aten.lift_fresh,
    aten.dropout,
    aten.feature_dropout,
    aten.alpha_dropout,
)
# Ops whose result depends only on the static shape of their input: always evaluated.
_SHAPE_ONLY = frozenset(
    overloads(
        aten.zeros_like,
        aten.ones_like,
        aten.full_like,
        aten.empty_like,
        aten.new_zeros,
        aten.new_ones,
        aten.new_full,
        aten.new_empty,
        aten.rand_like,
        aten.randn_like,
    )
)
# Ops that may take an integer read from a tensor (``_ValueIndex``): a slice from it.
_VALUE_INDEXED = frozenset(overloads(aten.slice, aten.slice_copy))
# Ops that fill a tensor shaped like their input, and their fill value (None: an argument).
_FILLS: dict[OpOverload, float | None] = {
    **{op: 0.0 for op in overloads(aten.zeros_like, aten.empty_like)},
    **{op: 1.0 for op in overloads(aten.ones_like)},
    **{op: None for op in overloads(aten.full_like)},
}
# Ops that only rearrange elements into the recorded shape.
_RESHAPES = (
    aten.view,
    aten._unsafe_view,
    aten.reshape,
    aten.view_copy,
    aten.unsqueeze,
    aten.unsqueeze_copy,
    aten.squeeze,
    aten.squeeze_copy,
    aten.flatten,
    aten.unflatten,
    _optional("_reshape_alias"),
    aten.view_as,
)
# ATen ops that become the IR op of the same name.
_UNARY = (
    "relu",
    "sigmoid",
    "tanh",
    "exp",
    "log",
    "log1p",
    "expm1",
    "sqrt",
    "rsqrt",
    "neg",
    "abs",
    "erf",
    "silu",
    "reciprocal",
    "sin",
    "cos",
    "floor",
    "ceil",
    "round",
    "sign",
    "logical_not",
    "hardsigmoid",
    "hardswish",
    "isnan",
)
# ATen op -> IR op.
_BINARY = {
    aten.mul: "mul",
    aten.maximum: "maximum",
    aten.minimum: "minimum",
    aten.eq: "eq",
    aten.ne: "ne",
    aten.lt: "lt",
    aten.le: "le",
    aten.gt: "gt",
    aten.ge: "ge",
    aten.logical_and: "logical_and",
    aten.logical_or: "logical_or",
    aten.remainder: "remainder",
    aten.floor_divide: "floor_divide",
    aten.atan2: "atan2",
    aten.pow: "pow",
    aten.bitwise_and: "logical_and",
    aten.bitwise_or: "logical_or",
    aten.fmod: "remainder",
}
_REDUCTIONS = {
    aten.mean: "reduce_mean",
    aten.sum: "reduce_sum",
    aten.amax: "reduce_max",
    aten.amin: "reduce_min",
    aten.any: "reduce_any",
    aten.all: "reduce_all",
}


class AtenLowering:
    """Lowers one traced fx graph into ``graph``, tagging nodes with ``layer``."""

    def __init__(
        self,
        graph: Graph,
        layer: str,
        constant: Callable[[torch.Tensor, str], Value],
        dims: Callable[[Any], Dim] = int,
    ):
        """``dims`` turns a traced size (an int, or a SymInt of a symbolic trace) into an IR
        ``Dim``."""
        self.graph = graph
        self.layer = layer
        self._constant = constant
        self.dims = dims
        self.fx_node: torch.fx.Node | None = None
        self.known: dict[Any, sympy.Integer] = {}
        """Values of the tracer's unbacked symbols that the lowering knows: integers read from
        constants, sizes of the slices cut at a ``_ValueIndex``."""

    # -- helpers used by the lowering table ------------------------------------------------
    def constant(self, tensor: torch.Tensor) -> Value:
        return self._constant(tensor, f"{self.layer}.const")

    def emit(self, op: str, inputs: list[Value], **attrs: Any) -> Value:
        """Add an IR node, or fold it into a constant when every input is a constant (and no
        attribute is a symbolic size)."""
        sized = any(_is_size(a) for a in torch.utils._pytree.tree_leaves(attrs))
        if inputs and all(v.is_constant for v in inputs) and not sized:
            from kerasrt.ir.ops import run_reference

            return self.constant(run_reference(op, [v.data for v in inputs], attrs))
        return self.graph.add_node(op, inputs, attrs, layer=self._layer_of(self.fx_node)).outputs[0]

    def _layer_of(self, node: torch.fx.Node | None) -> str:
        """The Keras layer path of a traced node: the traced layer, plus its sublayer if known."""
        sub = (node.meta.get("custom") or {}).get("keras_layer") if node is not None else None
        return f"{self.layer}/{sub}" if sub else self.layer

    def scalar(self, value: float | int | bool, like: Value) -> Value:
        """A 0-d constant that combines with ``like`` as PyTorch's wrapped scalars do."""
        dtype = torch.result_type(torch.empty((), dtype=_torch(like)), value)
        return self.constant(torch.tensor(value, dtype=dtype))

    def tensor(self, arg: Any, like: Value | None = None) -> Value:
        if isinstance(arg, Value):
            return arg
        if isinstance(arg, (int, float, bool)) and like is not None:
            return self.scalar(arg, like)
        raise UnsupportedOp(f"expected a tensor, got {type(arg).__name__}")

    def out_shape(self) -> tuple[Dim, ...]:
        return tuple(self.dim(d) for d in self.fx_node.meta["val"].shape)

    def dim(self, size: Any) -> Dim:
        """``dims`` of a traced size, after putting in the unbacked symbols' known values."""
        if isinstance(size, torch.SymInt) and self.known:
            expr = size.node.expr.xreplace(self.known)
            if expr.is_number:
                return int(expr)
        return self.dims(size)

    def reshape(self, x: Value, shape: tuple[Dim, ...]) -> Value:
        return x if x.shape == tuple(shape) else self.emit("reshape", [x], shape=list(shape))

    # -- driver --------------------------------------------------------------------------
    def lower(self, gm: torch.fx.GraphModule, inputs: list[Value]) -> list[Value]:
        gm.graph.eliminate_dead_code()  # e.g. unused pooling indices
        env: dict[torch.fx.Node, Any] = {}
        placeholders = iter(inputs)
        result: list[Value] = []
        for node in gm.graph.nodes:
            self.fx_node = node
            if node.op == "placeholder":
                env[node] = next(placeholders)
            elif node.op == "get_attr":
                env[node] = self.constant(getattr(gm, node.target))
            elif node.op == "output":
                outs = torch.utils._pytree.tree_leaves(node.args[0])
                result = [_read(env, o) if isinstance(o, torch.fx.Node) else None for o in outs]
                if any(not isinstance(v, Value) for v in result):
                    raise UnsupportedOp("the layer returns something other than tensors")
            elif node.op == "call_function" and _reads_values(node.meta.get("val")):
                env[node] = self._read_from_values(node, env)
            elif node.op == "call_function" and isinstance(node.meta.get("val"), torch.SymInt):
                env[node] = self.dim(node.meta["val"])  # a size computed from input sizes
            elif node.op == "call_function" and isinstance(
                node.meta.get("val"), (torch.SymBool, torch.SymFloat)
            ):
                raise UnsupportedOp(f"{node.target} computes a {type(node.meta['val']).__name__} from sizes")
            elif node.op == "call_function":
                args = torch.fx.node.map_arg(node.args, lambda n: _read(env, n))
                kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: _read(env, n))
                env[node] = self._lower_call(node, args, kwargs)
                if isinstance(node.target, OpOverload) and _writes_first_arg(node.target):
                    # a surviving in-place op: later readers of its input see the result
                    first = node.args[0]
                    if isinstance(first, torch.fx.Node):
                        env[first] = env[node]
            else:
                raise UnsupportedOp(f"unexpected fx node kind {node.op}")
        return result

    def _read_from_values(self, node: torch.fx.Node, env: dict) -> Any:
        """An integer the traced code read from a tensor, or computed from such: the value
        itself where it is known (read from a constant), else a ``_ValueIndex`` (read from a
        graph tensor) or a ``_FromValues`` (computed)."""
        expr = node.meta["val"].node.expr
        if node.target is aten._local_scalar_dense.default:
            source = _read(env, node.args[0])
            if isinstance(source, Value) and source.is_constant:
                self.known[expr] = sympy.Integer(int(source.data.reshape(-1)[0]))
                return int(self.known[expr])
            return _ValueIndex(source, expr)
        expr = expr.xreplace(self.known)
        return int(expr) if expr.is_number else _FromValues(expr)

    def _learn_sizes(self, node: torch.fx.Node, result: Any) -> None:
        """Where the traced output's size is an unbacked symbol (a slice cut at a position read
        from a tensor) and the lowered value's is known, remember it for later nodes."""
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and isinstance(result, Value):
            for traced, size in zip(val.shape, result.shape):
                if isinstance(traced, torch.SymInt) and traced.node.expr.is_Symbol and isinstance(size, int):
                    self.known.setdefault(traced.node.expr, sympy.Integer(size))

    def _lower_call(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
        target = node.target
        if target is operator.getitem:
            item = args[0][args[1]]
            return (
                _Unavailable(f"output {args[1]} of {node.args[0]} is not supported") if item is None else item
            )
        if not isinstance(target, OpOverload):
            raise UnsupportedOp(f"call to {getattr(target, '__name__', target)} is not an ATen op")
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        read = [a for a in leaves if isinstance(a, (_ValueIndex, _FromValues))]
        if read and target not in _VALUE_INDEXED:
            raise UnsupportedOp(f"{target} takes an integer read from a tensor ({read[0]})")
        values = [a for a in leaves if isinstance(a, Value)]
        if target in _FILLS and values and not symbolic.is_static(values[0].shape):
            return self._fill_like(target, args, kwargs, values[0])
        sized = any(_is_size(a) for a in leaves)
        if target in _SHAPE_ONLY or (
            not sized and not read and ((values and all(v.is_constant for v in values)) or not values)
        ):
            return self._evaluate(target, args, kwargs)
        lower = LOWERINGS.get(target)
        if lower is None:
            raise UnsupportedOp(f"no lowering for {target}")
        normalized = normalize_function(target, args, kwargs, normalize_to_only_use_kwargs=True)
        a = dict(normalized.kwargs) if normalized is not None else {}
        if "self" in a:
            a["input"] = a.pop("self")
        out = lower(self, a)
        self._learn_sizes(node, out)
        self._check(out)
        return out

    def _fill_like(self, target: OpOverload, args: tuple, kwargs: dict, like: Value) -> Value:
        """``zeros_like(x)`` (``ones_like``, ``full_like``) of a tensor of symbolic shape: a
        ``full_like`` node, a constant again once the shape is concrete (``specialize``)."""
        value = _FILLS[target]
        if value is None:
            normalized = normalize_function(target, args, kwargs, normalize_to_only_use_kwargs=True)
            value = normalized.kwargs["fill_value"] if normalized is not None else args[1]
        dtype = dtype_name(self.fx_node.meta["val"].dtype)
        node = self.graph.add_node(
            "full_like", [like], {"value": value, "dtype": dtype}, layer=self._layer_of(self.fx_node)
        )
        return node.outputs[0]

    def _evaluate(self, target: Any, args: tuple, kwargs: dict) -> Any:
        """Run an op whose result is fixed at conversion time; keep it as a constant."""
        meta = self.fx_node.meta.get("val")
        # an in-place op must not write into a constant that earlier nodes already read
        copy = isinstance(target, OpOverload) and _writes_first_arg(target)

        def concrete(a: Any) -> Any:
            if isinstance(a, Value):
                if not a.is_constant:
                    if not symbolic.is_static(a.shape):
                        raise UnsupportedOp(f"{target} of a tensor of symbolic shape {a.type_str()}")
                    return torch.zeros(a.shape, dtype=_torch(a))
                return a.data.clone() if copy else a.data
            if symbolic.is_size_expression(a):
                raise UnsupportedOp(f"{target} with the symbolic size {a} as an argument")
            return a

        result = target(
            *torch.utils._pytree.tree_map(concrete, args), **torch.utils._pytree.tree_map(concrete, kwargs)
        )
        if isinstance(meta, torch.Tensor) and isinstance(result, torch.Tensor):
            return self.constant(result)
        if isinstance(result, (tuple, list)):
            return [self.constant(r) if isinstance(r, torch.Tensor) else r for r in result]
        raise UnsupportedOp(f"cannot fold {target}")

    def _check(self, out: Any) -> None:
        meta = self.fx_node.meta.get("val")
        pairs = list(zip(out, meta)) if isinstance(out, (list, tuple)) else [(out, meta)]
        for value, expected in pairs:
            if value is None or not isinstance(expected, torch.Tensor):
                continue
            shape = tuple(self.dim(d) for d in expected.shape)
            if value.shape != shape or value.dtype != dtype_name(expected.dtype):
                raise UnsupportedOp(
                    f"lowering of {self.fx_node.target} gave {value.type_str()}, "
                    f"expected {symbolic.shape_str(shape)} {expected.dtype}"
                )


def _is_size(arg: Any) -> bool:
    """Whether ``arg`` is a symbolic size (a size the traced code computed from input sizes)."""
    return symbolic.is_size_expression(arg)


def _torch(value: Value) -> torch.dtype:
    from kerasrt.ir.graph import torch_dtype

    return torch_dtype(value.dtype)


Lowering = Callable[[AtenLowering, dict[str, Any]], Any]
LOWERINGS: dict[OpOverload, Lowering] = {}
_F = TypeVar("_F", bound=Callable[..., Any])


def lowering(*ops: OpOverloadPacket | OpOverload | None, **params: Any) -> Callable[[_F], _F]:
    """Register the decorated ``fn(c, a, **params)`` as the lowering of ``overloads(*ops)``.

    ``a`` holds the node's arguments by schema name (``self`` renamed ``input``). ``params``
    are bound now: they tell a function that lowers several variants which one these ops
    are. The function is returned as is, so registrations stack.
    """
    targets = overloads(*ops)

    def register(fn: _F) -> _F:
        taken = [str(op) for op in targets if op in LOWERINGS]
        if taken:
            raise ValueError(f"{', '.join(taken)} already lowered")
        bound = functools.partial(fn, **params) if params else fn
        LOWERINGS.update(dict.fromkeys(targets, bound))
        return fn

    return register


def _first_of(y: Value, outputs: int) -> Value | list[Value | None]:
    """``y``, as the only computed output of an op that returns ``outputs`` values."""
    return y if outputs == 1 else [y] + [None] * (outputs - 1)


# -- pass-through, casts and shapes ------------------------------------------------------------
@lowering(*_IDENTITY)
def _identity(c: AtenLowering, a: dict) -> Value:
    return a["input"]


@lowering(aten._assert_tensor_metadata)
def _assert_metadata(c: AtenLowering, a: dict) -> None:
    """The tracer already checked the metadata, and every lowered value is checked again."""
    return None


@lowering(aten._to_copy, aten.to, aten.type_as, aten._autocast_to_reduced_precision)
def _cast(c: AtenLowering, a: dict) -> Value:
    x = a["input"]
    target = dtype_name(c.fx_node.meta["val"].dtype)
    return x if target == x.dtype else c.emit("cast", [x], dtype=target)


@lowering(*_RESHAPES)
def _reshape(c: AtenLowering, a: dict) -> Value:
    return c.reshape(a["input"], c.out_shape())


@lowering(aten.expand, aten.expand_copy, aten.expand_as, aten.broadcast_to)
def _expand(c: AtenLowering, a: dict) -> Value:
    x, shape = a["input"], c.out_shape()
    return x if x.shape == shape else c.emit("expand", [x], shape=list(shape))


@lowering(aten.repeat)
def _repeat(c: AtenLowering, a: dict) -> Value:
    """x.repeat(reps): each dim d_i becomes r_i copies of it, one after the other, i.e. x
    viewed as (1, d_0, 1, d_1, ...), expanded to (r_0, d_0, r_1, d_1, ...), and merged."""
    x, reps = a["input"], [symbolic.normalize(r) for r in a["repeats"]]
    shape = (1,) * (len(reps) - len(x.shape)) + tuple(x.shape)
    interleaved = [d for size in shape for d in (1, size)]
    expanded = [d for rep, size in zip(reps, shape) for d in (rep, size)]
    y = c.emit("expand", [c.reshape(x, tuple(interleaved))], shape=expanded)
    return c.reshape(y, c.out_shape())


@lowering(aten.arange)
def _arange(c: AtenLowering, a: dict) -> Value:
    """An arange with a symbolic bound (position ids of a sequence of unknown length); one with
    numbers only is folded into a constant before lowering."""
    start, end = a.get("start", 0), a["end"]
    dtype = dtype_name(c.fx_node.meta["val"].dtype)
    return c.emit(
        "arange",
        [],
        start=symbolic.normalize(start),
        end=symbolic.normalize(end),
        step=a.get("step", 1),
        dtype=dtype,
    )


@lowering(aten.permute, aten.permute_copy)
def _permute(c: AtenLowering, a: dict) -> Value:
    return c.emit("permute", [a["input"]], dims=[d % len(a["input"].shape) for d in a["dims"]])


@lowering(aten.transpose, aten.transpose_copy, aten.swapaxes)
def _transpose(c: AtenLowering, a: dict) -> Value:
    x = a["input"]
    dims = list(range(len(x.shape)))
    d0, d1 = a.get("dim0", a.get("axis0")) % len(dims), a.get("dim1", a.get("axis1")) % len(dims)
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return c.emit("permute", [x], dims=dims)


@lowering(aten.t, aten.numpy_T)
def _t(c: AtenLowering, a: dict) -> Value:
    x = a["input"]
    return c.emit("permute", [x], dims=list(range(len(x.shape)))[::-1]) if len(x.shape) > 1 else x


def _slice(c: AtenLowering, x: Value, dim: int, start: Dim | None, end: Dim | None, step: int) -> Value:
    dim %= len(x.shape)
    size = x.shape[dim]
    if isinstance(size, int) and not isinstance(start, str) and not isinstance(end, str):
        start, end, step = slice(start, end, step).indices(size)
        if start == 0 and end >= size and step == 1:
            return x
        return c.emit("slice", [x], dim=dim, start=start, end=end, step=step)
    # a symbolic size or bound: Python's clamping is left to the op (the tracer's recorded
    # shape checks the result); negative bounds count from the end
    start = _from_end(0 if start is None else start, size)
    end = size if end is None or (isinstance(end, int) and end >= 2**62) else _from_end(end, size)
    if start == 0 and end == size and step == 1:
        return x
    return c.emit("slice", [x], dim=dim, start=start, end=end, step=step)


def _from_end(index: Dim, size: Dim) -> Dim:
    return symbolic.normalize(f"{size} - {-index}") if isinstance(index, int) and index < 0 else index


@lowering(aten.slice, aten.slice_copy)
def _slice_op(c: AtenLowering, a: dict) -> Value:
    if isinstance(a["start"], _ValueIndex):
        if a["step"] != 1:
            raise UnsupportedOp("a strided slice from a position read from a tensor")
        return _gather_from(c, a["input"], a["dim"], a["start"], a["end"])
    if isinstance(a["end"], (_ValueIndex, _FromValues)):
        raise UnsupportedOp("a slice whose end, not its start, is read from a tensor")
    return _slice(c, a["input"], a["dim"], a["start"], a["end"], a["step"])


def _gather_from(c: AtenLowering, x: Value, dim: int, start: _ValueIndex, end: Any) -> Value:
    """``x``'s slice along ``dim`` from a position known only at run time (Keras's
    ``ops.slice`` with a tensor start: a position embedding at a KV cache's write position):
    a gather of ``start + arange(length)``. The length is the traced output's, or ``end -
    start`` where that is one number for every start (Keras's bounds handle a negative start
    in a term that vanishes for starts >= 0). The start must lie in [0, size - length]: a
    gather does not clamp as Python slicing does."""
    dim %= len(x.shape)
    traced = c.fx_node.meta["val"].shape[dim]
    if isinstance(traced, int) or not _reads_values(traced):
        length = c.dim(traced)
    else:
        end_expr = sympy.sympify(end.expression if isinstance(end, _FromValues) else end)
        lengths = {end_expr.xreplace({**c.known, start.symbol: s}) - s for s in (0, 1, 7)}
        if len(lengths) != 1 or not next(iter(lengths)).is_number:
            raise UnsupportedOp("a slice of a length that depends on tensor values")
        length = int(lengths.pop())
    if not isinstance(length, int):
        raise UnsupportedOp("a slice of symbolic length from a position read from a tensor")
    first = c.emit("cast", [c.reshape(start.value, ())], dtype="int64")
    positions = c.emit("add", [c.constant(torch.arange(length)), first])
    return c.emit("gather", [x, positions], dim=dim)


@lowering(aten.select, aten.select_copy)
def _select(c: AtenLowering, a: dict) -> Value:
    x, dim = a["input"], a["dim"] % len(a["input"].shape)
    size, index = x.shape[dim], a["index"]
    index = index % size if isinstance(size, int) and isinstance(index, int) else _from_end(index, size)
    end = index + 1 if isinstance(index, int) else symbolic.normalize(f"{index} + 1")
    return c.reshape(_slice(c, x, dim, index, end, 1), c.out_shape())


@lowering(aten.narrow, aten.narrow_copy)
def _narrow(c: AtenLowering, a: dict) -> Value:
    return _slice(c, a["input"], a["dim"], a["start"], a["start"] + a["length"], 1)


def _split_at(c: AtenLowering, x: Value, dim: int, sizes: list[int]) -> list[Value]:
    out, start = [], 0
    for size in sizes:
        out.append(_slice(c, x, dim, start, start + size, 1))
        start += size
    return out


@lowering(aten.split, aten.split_with_sizes, aten.split_copy, aten.split_with_sizes_copy)
def _split(c: AtenLowering, a: dict) -> list[Value]:
    x, dim = a["input"], a["dim"] % len(a["input"].shape)
    size = a.get("split_size", a.get("split_sizes"))
    if isinstance(size, int):
        size = [min(size, x.shape[dim] - s) for s in range(0, x.shape[dim], size)]
    return _split_at(c, x, dim, list(size))


@lowering(aten.unbind, aten.unbind_copy)
def _unbind(c: AtenLowering, a: dict) -> list[Value]:
    x, dim = a["input"], a["dim"] % len(a["input"].shape)
    shape = x.shape[:dim] + x.shape[dim + 1 :]
    return [c.reshape(v, shape) for v in _split_at(c, x, dim, [1] * x.shape[dim])]


@lowering(aten.chunk)
def _chunk(c: AtenLowering, a: dict) -> list[Value]:
    x, dim = a["input"], a["dim"] % len(a["input"].shape)
    size = -(-x.shape[dim] // a["chunks"])
    return _split_at(c, x, dim, [min(size, x.shape[dim] - s) for s in range(0, x.shape[dim], size)])


@lowering(aten.cat, aten.concat, aten.concatenate)
def _cat(c: AtenLowering, a: dict) -> Value:
    xs = [x for x in a["tensors"] if x.shape != (0,)]
    if len(xs) == 1:
        return xs[0]
    return c.emit("concat", xs, dim=a["dim"] % len(xs[0].shape))


@lowering(aten.stack)
def _stack(c: AtenLowering, a: dict) -> Value:
    xs = a["tensors"]
    dim = a["dim"] % (len(xs[0].shape) + 1)
    shape = xs[0].shape[:dim] + (1,) + xs[0].shape[dim:]
    parts = [c.reshape(x, shape) for x in xs]
    return parts[0] if len(parts) == 1 else c.emit("concat", parts, dim=dim)


# -- elementwise -----------------------------------------------------------------------------
def _unary(c: AtenLowering, a: dict, op: str) -> Value:
    return c.emit(op, [a["input"]])


for _name in _UNARY:
    lowering(getattr(aten, _name), op=_name)(_unary)


def _binary(c: AtenLowering, op: str, x: Any, y: Any) -> Value:
    if not isinstance(x, Value):
        x = c.tensor(x, y)
    return c.emit(op, [x, c.tensor(y, x)])


def _binary_op(c: AtenLowering, a: dict, op: str) -> Value:
    return _binary(c, op, a["input"], a.get("other", a.get("exponent")))


for _packet, _op in _BINARY.items():
    lowering(_packet, op=_op)(_binary_op)


@lowering(aten.add, op="add")
@lowering(aten.sub, op="sub")
def _add_sub(c: AtenLowering, a: dict, op: str) -> Value:
    other = a["other"]
    if a.get("alpha", 1) != 1:
        other = _binary(c, "mul", other, a["alpha"]) if isinstance(other, Value) else other * a["alpha"]
    return _binary(c, op, a["input"], other)


@lowering(aten.rsub)
def _rsub(c: AtenLowering, a: dict) -> Value:
    x = a["input"]
    if a.get("alpha", 1) != 1:
        x = _binary(c, "mul", x, a["alpha"])
    return _binary(c, "sub", a["other"], x)


@lowering(aten.div)
def _div(c: AtenLowering, a: dict) -> Value:
    mode = a.get("rounding_mode")
    if mode is None:
        return _binary(c, "div", a["input"], a["other"])
    if mode == "floor":
        return _binary(c, "floor_divide", a["input"], a["other"])
    raise UnsupportedOp(f"div with rounding_mode={mode!r}")


@lowering(aten.square)
def _square(c: AtenLowering, a: dict) -> Value:
    return c.emit("mul", [a["input"], a["input"]])


@lowering(aten.where)
def _where(c: AtenLowering, a: dict) -> Value:
    x, y = a["input"], a["other"]
    x = c.tensor(x, y) if not isinstance(x, Value) else x
    return c.emit("where", [a["condition"], x, c.tensor(y, x)])


@lowering(aten.bitwise_not)
def _bitwise_not(c: AtenLowering, a: dict) -> Value:
    if a["input"].dtype != "bool":
        raise UnsupportedOp("bitwise_not on integers")
    return c.emit("logical_not", [a["input"]])


@lowering(aten.gelu)
def _gelu(c: AtenLowering, a: dict) -> Value:
    return c.emit("gelu", [a["input"]], approximate=a.get("approximate", "none"))


def _min_max(a: dict) -> tuple[Any, Any]:
    return a.get("min"), a.get("max")


@lowering(aten.clamp, aten.clip, bounds=_min_max)
@lowering(aten.clamp_min, bounds=lambda a: (a["min"], None))
@lowering(aten.clamp_max, bounds=lambda a: (None, a["max"]))
@lowering(aten.hardtanh, bounds=lambda a: (a.get("min_val", -1.0), a.get("max_val", 1.0)))
@lowering(aten.relu6, bounds=lambda a: (0.0, 6.0))
def _clamp(c: AtenLowering, a: dict, bounds: Callable[[dict], tuple[Any, Any]]) -> Value:
    """``bounds(a)`` gives the (lower, upper) limits, ``None`` for none."""
    lo, hi = bounds(a)
    if isinstance(lo, Value) or isinstance(hi, Value):
        x = a["input"]
        if lo is not None:
            x = _binary(c, "maximum", x, lo)
        if hi is not None:
            x = _binary(c, "minimum", x, hi)
        return x
    return c.emit("clamp", [a["input"]], min=lo, max=hi)


@lowering(aten.leaky_relu)
def _leaky_relu(c: AtenLowering, a: dict) -> Value:
    return c.emit("leaky_relu", [a["input"]], negative_slope=float(a["negative_slope"]))


@lowering(aten.elu)
def _elu(c: AtenLowering, a: dict) -> Value:
    x = a["input"]
    if a.get("input_scale", 1) != 1:
        x = _binary(c, "mul", x, a["input_scale"])
    y = c.emit("elu", [x], alpha=float(a.get("alpha", 1.0)))
    return _binary(c, "mul", y, a["scale"]) if a.get("scale", 1) != 1 else y


@lowering(aten.softplus)
def _softplus(c: AtenLowering, a: dict) -> Value:
    return c.emit("softplus", [a["input"]], beta=float(a["beta"]), threshold=float(a["threshold"]))


@lowering(aten.mish)
def _mish(c: AtenLowering, a: dict) -> Value:
    x = a["input"]
    return c.emit("mul", [x, c.emit("tanh", [c.emit("softplus", [x], beta=1.0, threshold=20.0)])])


@lowering(aten.log_sigmoid_forward)
def _log_sigmoid(c: AtenLowering, a: dict) -> list:
    x = c.emit("neg", [c.emit("softplus", [c.emit("neg", [a["input"]])], beta=1.0, threshold=20.0)])
    return [x, None]


# -- linear algebra and convolution ----------------------------------------------------------
@lowering(aten.mm, aten.bmm, aten.matmul)
def _matmul(c: AtenLowering, a: dict) -> Value:
    return c.emit("matmul", [a["input"], a.get("mat2", a.get("other"))])


@lowering(aten.addmm, aten.baddbmm)
def _addmm(c: AtenLowering, a: dict) -> Value:
    if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
        raise UnsupportedOp("addmm with alpha/beta")
    product = c.emit("matmul", [a.get("mat1", a.get("batch1")), a.get("mat2", a.get("batch2"))])
    return c.emit("add", [product, a["input"]])


@lowering(aten.linear)
def _linear(c: AtenLowering, a: dict) -> Value:
    w = a["weight"]
    y = c.emit("matmul", [a["input"], c.emit("permute", [w], dims=[1, 0])])
    return c.emit("add", [y, a["bias"]]) if a.get("bias") is not None else y


@lowering(aten.convolution, aten.conv1d, aten.conv2d, aten.conv3d, aten._convolution)
def _conv(c: AtenLowering, a: dict) -> Value:
    x, w, b = a["input"], a["weight"], a.get("bias")
    n = len(w.shape) - 2
    stride = _expand_list(a.get("stride", 1), n)
    dilation = _expand_list(a.get("dilation", 1), n)
    padding = a.get("padding", 0)
    if isinstance(padding, str):
        raise UnsupportedOp(f"string padding {padding!r}")
    padding = _expand_list(padding, n)
    inputs = [x, w] + ([b] if b is not None else [])
    if a.get("transposed", False):
        return c.emit(
            "conv_transpose",
            inputs,
            stride=stride,
            padding=padding,
            output_padding=_expand_list(a["output_padding"], n),
            dilation=dilation,
            groups=int(a["groups"]),
        )
    return c.emit(
        "conv", inputs, stride=stride, padding=padding, dilation=dilation, groups=int(a.get("groups", 1))
    )


def _expand_list(v: Dim | list[Dim], n: int) -> list[Dim]:
    v = [v] if isinstance(v, (int, str)) else list(v)
    return [symbolic.normalize(x) for x in (v * n if len(v) == 1 else v)]


# -- pooling, normalization, softmax, attention -----------------------------------------------
@lowering(aten.max_pool1d, aten.max_pool2d, aten.max_pool3d)
@lowering(aten.max_pool1d_with_indices, aten.max_pool2d_with_indices, aten.max_pool3d_with_indices, outputs=2)
def _max_pool(c: AtenLowering, a: dict, outputs: int = 1) -> Any:
    """``outputs=2``: the ``_with_indices`` ops, whose indices kerasrt does not compute."""
    n = len(a["kernel_size"]) if len(a["kernel_size"]) > 1 else len(a["input"].shape) - 2
    kernel = _expand_list(a["kernel_size"], n)
    stride = _expand_list(a["stride"], n) if a.get("stride") else kernel
    y = c.emit(
        "max_pool",
        [a["input"]],
        kernel=kernel,
        stride=stride,
        padding=_expand_list(a["padding"], n),
        dilation=_expand_list(a["dilation"], n),
        ceil_mode=bool(a["ceil_mode"]),
    )
    return _first_of(y, outputs)


@lowering(aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d)
def _avg_pool(c: AtenLowering, a: dict) -> Value:
    n = len(a["input"].shape) - 2
    kernel = _expand_list(a["kernel_size"], n)
    stride = _expand_list(a["stride"], n) if a.get("stride") else kernel
    return c.emit(
        "avg_pool",
        [a["input"]],
        kernel=kernel,
        stride=stride,
        padding=_expand_list(a["padding"], n),
        ceil_mode=bool(a["ceil_mode"]),
        count_include_pad=bool(a["count_include_pad"]),
        divisor=a.get("divisor_override"),
    )


@lowering(
    aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d, aten.adaptive_avg_pool1d, aten._adaptive_avg_pool3d
)
def _adaptive_avg(c: AtenLowering, a: dict) -> Value:
    x = a["input"]
    if any(s != 1 for s in a["output_size"]):
        raise UnsupportedOp("adaptive average pooling to a size other than 1")
    dims = list(range(2, len(x.shape)))
    return c.emit("reduce_mean", [x], dims=dims, keepdim=True)


@lowering(aten.batch_norm)
@lowering(
    aten._native_batch_norm_legit_no_training,
    aten._native_batch_norm_legit,
    aten.native_batch_norm,
    outputs=3,
)
@lowering(aten.cudnn_batch_norm, outputs=4)
def _batch_norm(c: AtenLowering, a: dict, outputs: int = 1) -> Any:
    """``outputs > 1``: the native ops, which also return batch statistics (not computed)."""
    if a.get("training", False):
        raise UnsupportedOp("batch norm in training mode")
    inputs = [a["input"], a["running_mean"], a["running_var"]]
    w, b = a.get("weight"), a.get("bias")
    if w is not None or b is not None:
        inputs.append(w if w is not None else c.constant(torch.ones(inputs[1].shape)))
    if b is not None:
        inputs.append(b)
    y = c.emit("batch_norm", inputs, eps=float(a["eps"]))
    return _first_of(y, outputs)


@lowering(aten.layer_norm)
@lowering(aten.native_layer_norm, outputs=3)
def _layer_norm(c: AtenLowering, a: dict, outputs: int = 1) -> Any:
    """``outputs=3``: ``native_layer_norm``, which also returns mean and rstd (not computed)."""
    w, b = a.get("weight"), a.get("bias")
    inputs = [a["input"]]
    if w is not None or b is not None:
        inputs.append(w if w is not None else c.constant(torch.ones(a["normalized_shape"])))
    if b is not None:
        inputs.append(b)
    y = c.emit("layer_norm", inputs, normalized_shape=list(a["normalized_shape"]), eps=float(a["eps"]))
    return _first_of(y, outputs)


@lowering(aten._softmax, aten.softmax, op="softmax")
@lowering(aten._log_softmax, aten.log_softmax, op="log_softmax")
def _softmax(c: AtenLowering, a: dict, op: str) -> Value:
    x = a["input"]
    y = c.emit(op, [x], dim=a["dim"] % len(x.shape))
    target = dtype_name(c.fx_node.meta["val"].dtype)
    return y if y.dtype == target else c.emit("cast", [y], dtype=target)


@lowering(aten.scaled_dot_product_attention)
@lowering(aten._scaled_dot_product_flash_attention_for_cpu, outputs=2)
@lowering(aten._scaled_dot_product_efficient_attention, outputs=4)
@lowering(aten._scaled_dot_product_flash_attention, outputs=9)
def _sdpa(c: AtenLowering, a: dict, outputs: int = 1) -> Any:
    """``outputs > 1``: the fused kernels' ops, which also return softmax statistics and
    random-number state (not computed)."""
    if a.get("dropout_p", 0.0) not in (0, 0.0):
        raise UnsupportedOp("attention dropout")
    if a.get("enable_gqa"):
        raise UnsupportedOp("grouped-query attention flag")
    inputs = [a["query"], a["key"], a["value"]]
    mask = a.get("attn_mask", a.get("attn_bias"))
    if mask is not None:
        inputs.append(mask)
    y = c.emit("attention", inputs, scale=a.get("scale"), is_causal=bool(a.get("is_causal", False)))
    return _first_of(y, outputs)


# -- reductions -------------------------------------------------------------------------------
def _dims(x: Value, dim: Any) -> list[int]:
    if dim is None or dim == []:
        return list(range(len(x.shape)))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % len(x.shape) for d in dims)


def _reduce(c: AtenLowering, a: dict, op: str) -> Value:
    x = a["input"]
    if a.get("dtype") is not None:
        x = c.emit("cast", [x], dtype=dtype_name(a["dtype"]))
    if op in ("reduce_sum", "reduce_mean") and x.dtype == "bool":
        x = c.emit("cast", [x], dtype=dtype_name(c.fx_node.meta["val"].dtype))
    y = c.emit(op, [x], dims=_dims(x, a.get("dim")), keepdim=bool(a.get("keepdim", False)))
    target = dtype_name(c.fx_node.meta["val"].dtype)
    return y if y.dtype == target else c.emit("cast", [y], dtype=target)


@lowering(aten.max, op="max")
@lowering(aten.min, op="min")
def _max_min(c: AtenLowering, a: dict, op: str) -> Any:
    x = a["input"]
    if "other" in a:
        return _binary(c, "maximum" if op == "max" else "minimum", x, a["other"])
    keep = bool(a.get("keepdim", False))
    if a.get("dim") is None:
        return c.emit("reduce_" + op, [x], dims=_dims(x, None), keepdim=False)
    dim = a["dim"] % len(x.shape)
    values = c.emit("reduce_" + op, [x], dims=[dim], keepdim=keep)
    return [values, c.emit("arg" + op, [x], dim=dim, keepdim=keep)]


for _packet, _op in {**_REDUCTIONS, aten.prod: "reduce_prod"}.items():
    lowering(_packet, op=_op)(_reduce)


@lowering(aten.var)
@lowering(aten.std, root=True)
@lowering(aten.var_mean, with_mean=True)
def _var(c: AtenLowering, a: dict, root: bool = False, with_mean: bool = False) -> Any:
    """``root``: the standard deviation; ``with_mean``: [variance, mean]."""
    x = a["input"]
    correction = a.get("correction")
    if correction is None:
        correction = 1 if a.get("unbiased", True) else 0
    dims, keep = _dims(x, a.get("dim")), bool(a.get("keepdim", False))
    var = c.emit("reduce_var", [x], dims=dims, correction=float(correction), keepdim=keep)
    if root:
        return c.emit("sqrt", [var])
    if with_mean:
        return [var, c.emit("reduce_mean", [x], dims=dims, keepdim=keep)]
    return var


@lowering(aten.argmax, op="argmax")
@lowering(aten.argmin, op="argmin")
def _argmax(c: AtenLowering, a: dict, op: str) -> Value:
    x = a["input"]
    if a.get("dim") is None:
        x, dim = c.reshape(x, (-1,) if False else (max(1, _numel(x.shape)),)), 0
    else:
        dim = a["dim"] % len(x.shape)
    return c.emit(op, [x], dim=dim, keepdim=bool(a.get("keepdim", False)))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@lowering(aten.cumsum)
def _cumsum(c: AtenLowering, a: dict) -> Value:
    x = a["input"]
    if a.get("dtype") is not None:
        x = c.emit("cast", [x], dtype=dtype_name(a["dtype"]))
    return c.emit("cumsum", [x], dim=a["dim"] % len(x.shape))


# -- padding, gathering, resizing ---------------------------------------------------------------
@lowering(aten.constant_pad_nd, aten.pad)
def _pad(c: AtenLowering, a: dict) -> Value:
    mode = a.get("mode", "constant")
    value = a.get("value") or 0.0
    pads = [symbolic.normalize(p) for p in a["pad"]]  # Keras's "same" padding: symbolic sizes
    if not any(pads):
        return a["input"]
    return c.emit("pad", [a["input"]], pads=pads, mode=mode, value=float(value))


@lowering(aten.reflection_pad1d, aten.reflection_pad2d, aten.reflection_pad3d, mode="reflect")
@lowering(aten.replication_pad1d, aten.replication_pad2d, aten.replication_pad3d, mode="replicate")
def _pad_mode(c: AtenLowering, a: dict, mode: str) -> Value:
    pads = [symbolic.normalize(p) for p in a["padding"]]
    return c.emit("pad", [a["input"]], pads=pads, mode=mode, value=0.0)


@lowering(aten.embedding)
def _embedding(c: AtenLowering, a: dict) -> Value:
    return c.emit("gather", [a["weight"], a["indices"]], dim=0)


@lowering(aten.index_select)
def _index_select(c: AtenLowering, a: dict) -> Value:
    return c.emit("gather", [a["input"], a["index"]], dim=a["dim"] % len(a["input"].shape))


@lowering(aten.gather, aten.take_along_dim)
def _take_along(c: AtenLowering, a: dict) -> Value:
    return c.emit(
        "take_along", [a["input"], a.get("index", a.get("indices"))], dim=a["dim"] % len(a["input"].shape)
    )


@lowering(aten.index_put, aten.index_put_)
def _index_put(c: AtenLowering, a: dict) -> Value:
    """``x[indices] = values`` with one index tensor per leading dimension (Keras's
    ``ops.slice_update`` with a tensor start: a KV cache's update)."""
    indices = a["indices"]
    if any(i is None or not isinstance(i, Value) or i.dtype == "bool" for i in indices):
        raise UnsupportedOp("index_put with skipped or boolean index tensors")
    return c.emit(
        "index_put",
        [a["input"], c.tensor(a["values"], a["input"]), *indices],
        accumulate=bool(a["accumulate"]),
    )


@lowering(aten.index)
def _index(c: AtenLowering, a: dict) -> Value:
    indices = a["indices"]
    used = [i for i, v in enumerate(indices) if v is not None]
    if len(used) != 1 or indices[used[0]].dtype == "bool":
        raise UnsupportedOp("advanced indexing with several or boolean index tensors")
    return c.emit("gather", [a["input"], indices[used[0]]], dim=used[0])


@lowering(aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d, mode="nearest")
@lowering(aten.upsample_linear1d, mode="linear")
@lowering(aten.upsample_bilinear2d, mode="bilinear")
@lowering(aten.upsample_trilinear3d, mode="trilinear")
@lowering(aten.upsample_bicubic2d, mode="bicubic")
def _resize(c: AtenLowering, a: dict, mode: str) -> Value:
    """Only the plain modes: ``nearest-exact`` and anti-aliased resizing have no lowering."""
    x = a["input"]
    size = list(c.out_shape()[2:])
    align = a.get("align_corners") if mode != "nearest" else None
    return c.emit("resize", [x], size=size, mode=mode, align_corners=align)


@lowering(aten.celu)
def _celu(c: AtenLowering, a: dict) -> Value:
    """celu(x, alpha) = alpha * elu(x / alpha)."""
    alpha = float(a.get("alpha", 1.0))
    y = c.emit("elu", [_binary(c, "mul", a["input"], 1.0 / alpha)], alpha=1.0)
    return _binary(c, "mul", y, alpha)


@lowering(aten.softshrink)
def _softshrink(c: AtenLowering, a: dict) -> Value:
    """softshrink(x, l) = x - clamp(x, -l, l)."""
    lam = float(a.get("lambd", 0.5))
    return c.emit("sub", [a["input"], c.emit("clamp", [a["input"]], min=-lam, max=lam)])


@lowering(_optional("_safe_softmax"))
def _safe_softmax(c: AtenLowering, a: dict) -> Value:
    """softmax that gives 0 (not NaN) on rows that are entirely -inf (fully masked)."""
    x = a["input"]
    y = c.emit("softmax", [x], dim=a["dim"] % len(x.shape))
    return c.emit("where", [c.emit("isnan", [y]), c.scalar(0.0, y), y])


@lowering(aten.glu)
def _glu(c: AtenLowering, a: dict) -> Value:
    """glu(x) = first half * sigmoid(second half) along ``dim``."""
    x = a["input"]
    dim = a.get("dim", -1) % len(x.shape)
    half = x.shape[dim] // 2
    first, second = _split_at(c, x, dim, [half, half])
    return c.emit("mul", [first, c.emit("sigmoid", [second])])


@lowering(_optional("rms_norm"))
@lowering(_optional("_fused_rms_norm"), with_rstd=True)
def _rms_norm(c: AtenLowering, a: dict, with_rstd: bool = False) -> Any:
    """rms_norm(x) = x * rsqrt(mean(x^2 over normalized dims) + eps) * weight.

    ``with_rstd``: ``_fused_rms_norm``, which also returns the rsqrt factor."""
    x = a["input"]
    dims = list(range(len(x.shape) - len(a["normalized_shape"]), len(x.shape)))
    eps = a.get("eps")
    if eps is None:
        eps = float(torch.finfo(_torch(x)).eps)
    mean_sq = c.emit("reduce_mean", [c.emit("mul", [x, x])], dims=dims, keepdim=True)
    rstd = c.emit("rsqrt", [_binary(c, "add", mean_sq, float(eps))])
    y = c.emit("mul", [x, rstd])
    if a.get("weight") is not None:
        y = c.emit("mul", [y, a["weight"]])
    return [y, rstd] if with_rstd else y
