"""The primitive ops of the IR, each declared once: attributes, reference implementation,
and shape/dtype inference.

The reference implementation is a PyTorch function ``impl(*inputs, **attrs)``; shape and
dtype inference runs that same function on meta tensors, so the two cannot disagree.
The torch backend lowers a node by calling ``impl``. Attributes are JSON values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kerasrt.errors import IRError
from kerasrt.ir import symbolic
from kerasrt.ir.symbolic import Dim


@dataclass(frozen=True)
class OpDef:
    """One IR op: its name, attribute names, reference implementation and category."""

    name: str
    impl: Callable[..., torch.Tensor]
    attrs: tuple[str, ...] = ()
    category: str = "elementwise"
    infer: bool = True  # False for ops whose outputs are declared by the importer
    dim_attrs: tuple[str, ...] = ()
    """Attributes holding sizes, which may be symbolic (``kerasrt.ir.symbolic``)."""


OPS: dict[str, OpDef] = {}
KERNEL = "kernel_choice"
"""The attribute recording the kernel an op was chosen to run on (``kerasrt.tuning.tactics``):
{"kernel": family or "inductor", "config": index, "timings": {kernel: [config, ms]}}. The math
does not depend on it, so ``impl`` ignores it."""


def _register(
    name: str,
    attrs: Sequence[str] = (),
    category: str = "elementwise",
    infer: bool = True,
    kernels: bool = False,
    dim_attrs: Sequence[str] = (),
):
    """Declare op ``name``; ``kernels``: kerasrt's kernel families may run it, and its nodes may
    carry the ``KERNEL`` attribute; ``dim_attrs``: the attributes that hold sizes (a size or
    a list of them), which may be symbolic."""

    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in OPS:
            raise IRError(f"op {name!r} declared twice")
        impl = fn
        if kernels:

            def impl(*inputs: torch.Tensor, **attrs: Any) -> Any:
                attrs.pop(KERNEL, None)
                return fn(*inputs, **attrs)

            impl.__name__ = fn.__name__
        declared = (*attrs, KERNEL) if kernels else tuple(attrs)
        OPS[name] = OpDef(name, impl, declared, category, infer, tuple(dim_attrs))
        return fn

    return wrap


def _alias(name: str, fn: Callable[..., torch.Tensor], category: str = "elementwise") -> None:
    _register(name, (), category)(lambda *xs: fn(*xs))


# -- elementwise: unary --------------------------------------------------------------------
for _name, _fn in {
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "exp": torch.exp,
    "log": torch.log,
    "log1p": torch.log1p,
    "expm1": torch.expm1,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "neg": torch.neg,
    "abs": torch.abs,
    "erf": torch.erf,
    "silu": F.silu,
    "reciprocal": torch.reciprocal,
    "sin": torch.sin,
    "cos": torch.cos,
    "floor": torch.floor,
    "ceil": torch.ceil,
    "round": torch.round,
    "sign": torch.sign,
    "logical_not": torch.logical_not,
    "hardsigmoid": F.hardsigmoid,
    "hardswish": F.hardswish,
    "isnan": torch.isnan,
}.items():
    _alias(_name, _fn)

# -- elementwise: binary (numpy broadcasting) -----------------------------------------------
for _name, _fn in {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "eq": torch.eq,
    "ne": torch.ne,
    "lt": torch.lt,
    "le": torch.le,
    "gt": torch.gt,
    "ge": torch.ge,
    "logical_and": torch.logical_and,
    "logical_or": torch.logical_or,
    "floor_divide": torch.floor_divide,
    "remainder": torch.remainder,
    "atan2": torch.atan2,
}.items():
    _alias(_name, _fn)

_alias("where", torch.where)


@_register("gelu", ("approximate",))
def gelu(x: torch.Tensor, *, approximate: str = "none") -> torch.Tensor:
    return F.gelu(x, approximate=approximate)


@_register("clamp", ("min", "max"))
def clamp(x: torch.Tensor, *, min: float | None = None, max: float | None = None) -> torch.Tensor:
    return torch.clamp(x, min=min, max=max)


@_register("leaky_relu", ("negative_slope",))
def leaky_relu(x: torch.Tensor, *, negative_slope: float) -> torch.Tensor:
    return F.leaky_relu(x, negative_slope)


@_register("elu", ("alpha",))
def elu(x: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    return F.elu(x, alpha)


@_register("softplus", ("beta", "threshold"))
def softplus(x: torch.Tensor, *, beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    return F.softplus(x, beta, threshold)


@_register("full_like", ("value", "dtype"), "shape")
def full_like(x: torch.Tensor, *, value: float, dtype: str) -> torch.Tensor:
    """A tensor of ``x``'s shape filled with ``value``: the ``zeros_like`` of a tensor whose
    shape is symbolic (``specialize`` turns it into a constant)."""
    from kerasrt.ir.graph import torch_dtype

    return torch.full_like(x, value, dtype=torch_dtype(dtype))


@_register("arange", ("start", "end", "step", "dtype"), "shape", dim_attrs=("start", "end"))
def arange(*, start: int, end: int, step: int = 1, dtype: str) -> torch.Tensor:
    """start, start + step, ... < end: positions along a dimension of symbolic size
    (``specialize`` turns it into a constant)."""
    from kerasrt.ir.graph import torch_dtype

    return torch.arange(start, end, step, dtype=torch_dtype(dtype))


@_register("cast", ("dtype",))
def cast(x: torch.Tensor, *, dtype: str) -> torch.Tensor:
    from kerasrt.ir.graph import torch_dtype

    return x.to(torch_dtype(dtype))


# -- linear algebra and convolution ------------------------------------------------------------
@_register("matmul", (), "matmul")
def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """numpy matmul semantics (batched, broadcasting)."""
    return torch.matmul(a, b)


@_register("conv", ("stride", "padding", "dilation", "groups"), "conv", kernels=True, dim_attrs=("padding",))
def conv(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None = None,
    *,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int = 1,
) -> torch.Tensor:
    """N-d convolution, channels-first (N, C, *spatial), weight (O, I/groups, *kernel)."""
    zeros = [0] * len(stride)
    return torch.convolution(x, w, b, stride, padding, dilation, False, zeros, groups)


@_register(
    "conv_transpose",
    ("stride", "padding", "output_padding", "dilation", "groups"),
    "conv",
    dim_attrs=("padding", "output_padding"),
)
def conv_transpose(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None = None,
    *,
    stride: list[int],
    padding: list[int],
    output_padding: list[int],
    dilation: list[int],
    groups: int = 1,
) -> torch.Tensor:
    """Transposed N-d convolution, channels-first, weight (I, O/groups, *kernel)."""
    return torch.convolution(x, w, b, stride, padding, dilation, True, output_padding, groups)


# -- pooling ----------------------------------------------------------------------------------
@_register(
    "max_pool", ("kernel", "stride", "padding", "dilation", "ceil_mode"), "pool", dim_attrs=("padding",)
)
def max_pool(
    x: torch.Tensor,
    *,
    kernel: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool = False,
) -> torch.Tensor:
    """Max pooling over the trailing len(kernel) dims (channels-first)."""
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]
    return fn(x, kernel, stride, padding, dilation, ceil_mode)


@_register(
    "avg_pool",
    ("kernel", "stride", "padding", "ceil_mode", "count_include_pad", "divisor"),
    "pool",
    dim_attrs=("padding",),
)
def avg_pool(
    x: torch.Tensor,
    *,
    kernel: list[int],
    stride: list[int],
    padding: list[int],
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor: int | None = None,
) -> torch.Tensor:
    """Average pooling over the trailing len(kernel) dims (channels-first)."""
    if len(kernel) == 1:
        return F.avg_pool1d(x, kernel, stride, padding, ceil_mode, count_include_pad)
    fn = {2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel)]
    return fn(x, kernel, stride, padding, ceil_mode, count_include_pad, divisor)


# -- normalization and softmax -------------------------------------------------------------------
@_register("batch_norm", ("eps",), "norm")
def batch_norm(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    eps: float,
) -> torch.Tensor:
    """Inference batch norm over dim 1 (channels-first) with running statistics."""
    return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)


@_register("layer_norm", ("normalized_shape", "eps"), "norm")
def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    normalized_shape: list[int],
    eps: float,
) -> torch.Tensor:
    """Normalize over the trailing ``normalized_shape`` dims."""
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


@_register("softmax", ("dim",), "softmax")
def softmax(x: torch.Tensor, *, dim: int) -> torch.Tensor:
    return torch.softmax(x, dim)


@_register("log_softmax", ("dim",), "softmax")
def log_softmax(x: torch.Tensor, *, dim: int) -> torch.Tensor:
    return torch.log_softmax(x, dim)


@_register("attention", ("scale", "is_causal"), "attention")
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """softmax(q @ k^T * scale + mask) @ v over (..., seq, head_dim) tensors."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


# -- reductions -------------------------------------------------------------------------------
def _reduction(name: str, fn: Callable[..., torch.Tensor]) -> None:
    @_register(name, ("dims", "keepdim"), "reduce")
    def reduce(x: torch.Tensor, *, dims: list[int], keepdim: bool = False) -> torch.Tensor:
        return fn(x, dims, keepdim)


_reduction("reduce_mean", lambda x, d, k: torch.mean(x, d, keepdim=k))
_reduction("reduce_sum", lambda x, d, k: torch.sum(x, d, keepdim=k))
_reduction("reduce_max", lambda x, d, k: torch.amax(x, d, keepdim=k))
_reduction("reduce_min", lambda x, d, k: torch.amin(x, d, keepdim=k))
_reduction("reduce_any", lambda x, d, k: torch.any(x, d, keepdim=k))
_reduction("reduce_all", lambda x, d, k: torch.all(x, d, keepdim=k))
_reduction("reduce_prod", lambda x, d, k: _prod(x, d, k))


def _prod(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    for d in sorted((d % x.ndim for d in dims), reverse=True):
        x = torch.prod(x, d, keepdim=keepdim)
    return x


@_register("reduce_var", ("dims", "correction", "keepdim"), "reduce")
def reduce_var(
    x: torch.Tensor, *, dims: list[int], correction: float = 0.0, keepdim: bool = False
) -> torch.Tensor:
    return torch.var(x, dims, correction=correction, keepdim=keepdim)


@_register("argmax", ("dim", "keepdim"), "reduce")
def argmax(x: torch.Tensor, *, dim: int, keepdim: bool = False) -> torch.Tensor:
    return torch.argmax(x, dim, keepdim)


@_register("argmin", ("dim", "keepdim"), "reduce")
def argmin(x: torch.Tensor, *, dim: int, keepdim: bool = False) -> torch.Tensor:
    return torch.argmin(x, dim, keepdim)


@_register("cumsum", ("dim",), "reduce")
def cumsum(x: torch.Tensor, *, dim: int) -> torch.Tensor:
    return torch.cumsum(x, dim)


# -- data movement ----------------------------------------------------------------------------
@_register("reshape", ("shape",), "shape", dim_attrs=("shape",))
def reshape(x: torch.Tensor, *, shape: list[int]) -> torch.Tensor:
    return torch.reshape(x, shape)


@_register("permute", ("dims",), "layout")
def permute(x: torch.Tensor, *, dims: list[int]) -> torch.Tensor:
    return torch.permute(x, dims)


@_register("expand", ("shape",), "shape", dim_attrs=("shape",))
def expand(x: torch.Tensor, *, shape: list[int]) -> torch.Tensor:
    return x.expand(shape)


@_register("slice", ("dim", "start", "end", "step"), "shape", dim_attrs=("start", "end"))
def slice_(x: torch.Tensor, *, dim: int, start: int, end: int, step: int = 1) -> torch.Tensor:
    return torch.ops.aten.slice.Tensor(x, dim, start, end, step)


@_register("concat", ("dim",), "concat")
def concat(*xs: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.cat(xs, dim)


@_register("pad", ("pads", "mode", "value"), "pad", dim_attrs=("pads",))
def pad(x: torch.Tensor, *, pads: list[int], mode: str = "constant", value: float = 0.0) -> torch.Tensor:
    """torch.nn.functional.pad semantics: ``pads`` pairs start from the last dim."""
    if mode == "constant":
        return F.pad(x, pads, mode, value)
    return F.pad(x, pads, mode)


@_register("gather", ("dim",), "gather")
def gather(x: torch.Tensor, index: torch.Tensor, *, dim: int) -> torch.Tensor:
    """Select whole slices of ``x`` along ``dim`` at ``index`` (any shape): numpy ``take``."""
    flat = torch.index_select(x, dim, index.reshape(-1))
    return flat.reshape(x.shape[:dim] + index.shape + x.shape[dim + 1 :])


@_register("index_put", ("accumulate",), "gather")
def index_put(
    x: torch.Tensor, values: torch.Tensor, *indices: torch.Tensor, accumulate: bool
) -> torch.Tensor:
    """``x`` with ``x[indices] = values`` (or ``+=`` when ``accumulate``): one integer index
    tensor per leading dimension, broadcast together."""
    return torch.index_put(x, indices, values, accumulate)


@_register("take_along", ("dim",), "gather")
def take_along(x: torch.Tensor, index: torch.Tensor, *, dim: int) -> torch.Tensor:
    return torch.gather(x, dim, index)


QUANTIZED_RANGE = {"int8": 127.0, "float8_e4m3fn": 448.0}
"""The largest magnitude of each quantized dtype that a scale maps an amax onto (symmetric
quantization: INT8's -128 is never produced from a calibrated range, as in TensorRT)."""


def _along(scale: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``scale`` shaped to broadcast against ``x``: a scalar, or one value per index of ``axis``."""
    if axis is None:
        return scale
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


@_register("quantize", ("axis", "dtype"), "quantize")
def quantize(
    x: torch.Tensor, scale: torch.Tensor, *, axis: int | None = None, dtype: str = "int8"
) -> torch.Tensor:
    """TensorRT's QuantizeLinear, symmetric: ``x / scale`` rounded to nearest (ties to even)
    and saturated to ``dtype`` (int8: [-128, 127]; float8_e4m3fn: +-448, rounded by the cast).
    ``scale`` is float32, one value or one per index of ``axis`` (per-channel weights)."""
    y = x.to(torch.float32) / _along(scale, x, axis)
    if dtype == "int8":
        return torch.clamp(torch.round(y), -128.0, 127.0).to(torch.int8)
    if dtype == "float8_e4m3fn":
        return torch.clamp(y, -448.0, 448.0).to(torch.float8_e4m3fn)
    raise IRError(f"quantize: no quantized dtype {dtype!r} (int8, float8_e4m3fn)")


@_register("dequantize", ("axis", "dtype"), "quantize")
def dequantize(
    q: torch.Tensor, scale: torch.Tensor, *, axis: int | None = None, dtype: str = "float32"
) -> torch.Tensor:
    """TensorRT's DequantizeLinear: ``q * scale`` (in float32), as ``dtype``."""
    from kerasrt.ir.graph import torch_dtype

    return (q.to(torch.float32) * _along(scale, q, axis)).to(torch_dtype(dtype))


@_register("resize", ("size", "mode", "align_corners"), "resize", dim_attrs=("size",))
def resize(x: torch.Tensor, *, size: list[int], mode: str, align_corners: bool | None = None) -> torch.Tensor:
    """Resize the trailing spatial dims (channels-first) to ``size``."""
    return F.interpolate(x, size=size, mode=mode, align_corners=align_corners)


@_register("keras_layer", ("layer", "reason", "call"), "fallback", infer=False)
def keras_layer(*xs: torch.Tensor, layer: str, reason: str, call: dict) -> torch.Tensor:
    """A fallback node: the original Keras layer runs it (see kerasrt.runtime)."""
    raise IRError(f"fallback layer {layer!r} has no reference implementation; the runtime runs it")


_INFERRED: dict[tuple, list[tuple[tuple[Dim, ...], str]]] = {}
"""infer_types results by (op, input types, attrs): graphs repeat their blocks, and every
verify() re-infers every node, so running each op on meta tensors once is most of the saving."""


def _frozen(value: Any) -> Any:
    """A hashable, type-exact key for a JSON-like attribute value (1, 1.0 and True differ)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value).__name__, value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _frozen(v)) for k, v in value.items())))
    raise TypeError(f"unhashable attribute value {type(value).__name__}")


def infer_types(op: str, inputs: Sequence[Any], attrs: dict[str, Any]) -> list[tuple[tuple[Dim, ...], str]]:
    """Output (shape, dtype) pairs of ``op``, found by running its impl on meta tensors (on
    fake tensors with symbolic sizes where a shape or a size attribute holds a symbol)."""
    try:
        key = (op, tuple((tuple(v.shape), v.dtype) for v in inputs), _frozen(attrs))
    except TypeError:
        return _infer_types(op, inputs, attrs)
    if key not in _INFERRED:
        if len(_INFERRED) > 100_000:
            _INFERRED.clear()
        _INFERRED[key] = _infer_types(op, inputs, attrs)
    return list(_INFERRED[key])


def _infer_types(op: str, inputs: Sequence[Any], attrs: dict[str, Any]) -> list[tuple[tuple[Dim, ...], str]]:
    from kerasrt.ir.graph import dtype_name, torch_dtype

    opdef = OPS.get(op)
    if opdef is None:
        raise IRError(f"unknown op {op!r}")
    if not opdef.infer:
        raise IRError(f"op {op!r} needs its output types declared")
    sizes = [attrs[a] for a in opdef.dim_attrs if a in attrs]
    names = set().union(*(symbolic.symbols_of(d) for v in inputs for d in v.shape))
    names |= set().union(*(symbolic.symbols_of(d) for d in _flat_sizes(sizes)))
    types = ", ".join(v.type_str() for v in inputs)
    if not names:
        metas = [torch.empty(v.shape, dtype=torch_dtype(v.dtype), device="meta") for v in inputs]
        try:
            out = opdef.impl(*metas, **attrs)
        except Exception as exc:  # the op rejects these inputs: say which
            raise IRError(f"op {op}({types}) with {attrs} is invalid: {exc}") from exc
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [(tuple(o.shape), dtype_name(o.dtype)) for o in outs]
    shapes = symbolic.SymbolicShapes(symbolic.hints(names))
    with shapes.mode():
        fakes = [shapes.empty(v.shape, torch_dtype(v.dtype)) for v in inputs]
        bound = {k: _symints(shapes, v) if k in opdef.dim_attrs else v for k, v in attrs.items()}
        try:
            out = opdef.impl(*fakes, **bound)
        except Exception as exc:
            raise IRError(
                f"op {op}({types}) with {attrs} is invalid, or needs concrete sizes: {_first_line(exc)}"
            ) from exc
    if shapes.specialized():
        raise IRError(f"op {op}({types}) with {attrs} needs concrete sizes for {shapes.specialized()}")
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [(shapes.shape(o.shape), dtype_name(o.dtype)) for o in outs]


def _flat_sizes(values: Sequence[Any]) -> list[Dim]:
    flat: list[Dim] = []
    for v in values:
        flat.extend(v if isinstance(v, (list, tuple)) else [v])
    return [d for d in flat if isinstance(d, (int, str))]


def _symints(shapes: symbolic.SymbolicShapes, value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_symints(shapes, v) for v in value]
    return shapes.symint(value) if isinstance(value, str) else value


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def run_reference(op: str, inputs: Sequence[torch.Tensor], attrs: dict[str, Any]) -> torch.Tensor:
    """Evaluate one op with its reference implementation."""
    return OPS[op].impl(*inputs, **attrs)


# -- fused ops (made by the optimizer, see kerasrt.passes.fusion) --------------------------------
EPILOGUE_ACTIVATIONS = (
    "relu",
    "sigmoid",
    "tanh",
    "silu",
    "gelu",
    "hardswish",
    "hardsigmoid",
    "clamp",
    "leaky_relu",
    "elu",
    "softplus",
)
"""Activations the fused ops apply in their epilogue (an IR op name plus its attributes)."""


def _epilogue(
    y: torch.Tensor,
    rest: tuple[torch.Tensor, ...],
    has_bias: bool,
    has_residual: bool,
    activation: str | None,
    activation_attrs: dict | None,
) -> torch.Tensor:
    """The shared tail of fused ops: + residual (the input after the bias), then activation."""
    residual = rest[int(has_bias)] if has_residual else None
    if residual is not None:
        y = y + residual
    if activation is not None:
        y = OPS[activation].impl(y, **(activation_attrs or {}))
    return y


@_register(
    "conv_fused",
    ("stride", "padding", "dilation", "groups", "has_bias", "has_residual", "activation", "activation_attrs"),
    "conv",
    kernels=True,
    dim_attrs=("padding",),
)
def conv_fused(
    x: torch.Tensor,
    w: torch.Tensor,
    *rest: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int = 1,
    has_bias: bool = True,
    has_residual: bool = False,
    activation: str | None = None,
    activation_attrs: dict | None = None,
) -> torch.Tensor:
    """act(conv(x, w) + b + residual): conv with its bias, residual add and activation."""
    y = conv(
        x, w, rest[0] if has_bias else None, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    return _epilogue(y, rest, has_bias, has_residual, activation, activation_attrs)


@_register("linear", ("has_bias", "has_residual", "activation", "activation_attrs"), "matmul", kernels=True)
def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    *rest: torch.Tensor,
    has_bias: bool = True,
    has_residual: bool = False,
    activation: str | None = None,
    activation_attrs: dict | None = None,
) -> torch.Tensor:
    """act(x @ w + b + residual) with w of shape (in, out)."""
    b = rest[0] if has_bias else None
    y = (
        torch.matmul(x, w)
        if b is None
        else torch.addmm(b, x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[-1])
    )
    return _epilogue(y, rest, has_bias, has_residual, activation, activation_attrs)


# -- merged convolutions (made by the tactics where one kernel beats the parts) --------------
def _act(y: torch.Tensor, activation: str | None, activation_attrs: dict | None) -> torch.Tensor:
    return y if activation is None else OPS[activation].impl(y, **(activation_attrs or {}))


@_register("dual_conv", ("stride", "has_bias", "activation", "activation_attrs"), "conv", kernels=True)
def dual_conv(
    h: torch.Tensor,
    w: torch.Tensor,
    x: torch.Tensor,
    ws: torch.Tensor,
    *rest: torch.Tensor,
    stride: list[int],
    has_bias: bool = True,
    activation: str | None = None,
    activation_attrs: dict | None = None,
) -> torch.Tensor:
    """act(conv1x1(h, w) + conv1x1(x, ws, stride) + b): a 1x1 convolution with the 1x1
    projection it adds as its residual (a ResNet stage's first block), one product over both
    inputs."""
    y = torch.convolution(h, w, rest[0] if has_bias else None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    y = y + torch.convolution(x, ws, None, list(stride), [0, 0], [1, 1], False, [0, 0], 1)
    return _act(y, activation, activation_attrs)


PAIR_OPERANDS = ("x", "w1", "shortcut", "ws", "b1", "residual", "w2", "b2")
"""The inputs a ``conv_pair`` node may have, in this order; ``operands`` names those it has."""


@_register(
    "conv_pair",
    ("operands", "stride", "activation", "activation_attrs", "activation2", "activation2_attrs"),
    "conv",
    kernels=True,
)
def conv_pair(
    *inputs: torch.Tensor,
    operands: list[str],
    stride: list[int],
    activation: str | None = None,
    activation_attrs: dict | None = None,
    activation2: str | None = None,
    activation2_attrs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z): y = act(conv1x1(x, w1) [+ conv1x1(shortcut, ws, stride)] [+ residual] [+ b1])
    and z = act2(conv1x1(y, w2) [+ b2]): a 1x1 convolution chained into the 1x1 convolution
    that reduces its output (a bottleneck's expansion and the next block's reduction)."""
    a = dict(zip(operands, inputs))

    def conv1x1(t: torch.Tensor, weight: torch.Tensor, bias: Any, step: list[int]) -> torch.Tensor:
        return torch.convolution(t, weight, bias, step, [0, 0], [1, 1], False, [0, 0], 1)

    y = conv1x1(a["x"], a["w1"], a.get("b1"), [1, 1])
    if "shortcut" in a:
        y = y + conv1x1(a["shortcut"], a["ws"], None, list(stride))
    if "residual" in a:
        y = y + a["residual"]
    y = _act(y, activation, activation_attrs)
    return y, _act(conv1x1(y, a["w2"], a.get("b2"), [1, 1]), activation2, activation2_attrs)
