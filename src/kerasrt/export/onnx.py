"""kerasrt's optimized graph as ONNX: what people who feed TensorRT (``trtexec``), ONNX Runtime or
OpenVINO take. BatchNormalization is folded, activations and residual adds fused into the
convolutions' epilogues (emitted as Conv, Add and the activation, which those tools fuse
again), FP16 graphs keep their float16 tensors and casts, and INT8/FP8 graphs their Q/DQ pairs
as QuantizeLinear/DequantizeLinear (TensorRT's explicit quantization reads exactly that).

One function per IR op (``LOWERINGS``) emits its ONNX nodes; an op without one (a Keras
fallback layer, a KV-cache write) is refused with its name. The export is of one engine graph,
at concrete input shapes (reshapes and slices carry sizes). ``check_with_onnxruntime`` runs
the file and compares it with kerasrt's own output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kerasrt.errors import KerasRTError
from kerasrt.ir.graph import Graph, Node, Value, torch_dtype

OPSET = 19
"""QuantizeLinear/DequantizeLinear with FP8 and per-axis scales, LayerNormalization (17),
reductions taking their axes as an input (18)."""


class ExportError(KerasRTError):
    """The graph holds something ONNX cannot (a Keras fallback layer, an op with no lowering)."""


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'kerasrt[onnx]'") from None
    return onnx


def elem_type(dtype: str) -> int:
    """The ONNX element type of an IR dtype."""
    onnx = _onnx()
    table = {
        "float32": onnx.TensorProto.FLOAT,
        "float16": onnx.TensorProto.FLOAT16,
        "bfloat16": onnx.TensorProto.BFLOAT16,
        "float64": onnx.TensorProto.DOUBLE,
        "int64": onnx.TensorProto.INT64,
        "int32": onnx.TensorProto.INT32,
        "int16": onnx.TensorProto.INT16,
        "int8": onnx.TensorProto.INT8,
        "uint8": onnx.TensorProto.UINT8,
        "bool": onnx.TensorProto.BOOL,
        "float8_e4m3fn": onnx.TensorProto.FLOAT8E4M3FN,
    }
    return table[dtype]


class Emitter:
    """Collects the ONNX nodes and initializers of one graph; values keep their IR names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}__{self._count}"

    def tensor(self, name: str, data: torch.Tensor) -> Any:
        """An ONNX tensor of ``data`` (raw bytes: float16, bfloat16 and FP8 included)."""
        onnx = _onnx()
        data = data.detach().cpu().contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
        dtype = str(data.dtype).replace("torch.", "")
        return onnx.helper.make_tensor(name, elem_type(dtype), list(data.shape), raw, raw=True)

    def constant(self, data: torch.Tensor | np.ndarray | float | int | Sequence, hint: str = "c") -> str:
        name = self.fresh(hint)
        self.initializers.append(self.tensor(name, torch.as_tensor(data)))
        return name

    def ints(self, values: Sequence[int], hint: str = "shape") -> str:
        return self.constant(torch.tensor(list(values), dtype=torch.int64), hint)

    def op(self, op_type: str, inputs: Sequence[str], output: str | None = None, **attrs: Any) -> str:
        out = output or self.fresh(op_type.lower())
        self.nodes.append(_onnx().helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def cast(self, name: str, dtype: str) -> str:
        return self.op("Cast", [name], to=elem_type(dtype))


Lowering = Callable[[Emitter, Node, list[str], str], None]
"""(emitter, node, its input names, its output name): emits nodes that compute the output."""
LOWERINGS: dict[str, Lowering] = {}


def lowers(*ops: str) -> Callable[[Lowering], Lowering]:
    def wrap(fn: Lowering) -> Lowering:
        for op in ops:
            LOWERINGS[op] = fn
        return fn

    return wrap


UNARY = {
    "relu": "Relu",
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
    "exp": "Exp",
    "log": "Log",
    "sqrt": "Sqrt",
    "neg": "Neg",
    "abs": "Abs",
    "erf": "Erf",
    "reciprocal": "Reciprocal",
    "sin": "Sin",
    "cos": "Cos",
    "floor": "Floor",
    "ceil": "Ceil",
    "round": "Round",
    "sign": "Sign",
    "logical_not": "Not",
    "isnan": "IsNaN",
    "hardswish": "HardSwish",
}
BINARY = {
    "add": "Add",
    "sub": "Sub",
    "mul": "Mul",
    "div": "Div",
    "pow": "Pow",
    "maximum": "Max",
    "minimum": "Min",
    "logical_and": "And",
    "logical_or": "Or",
}
COMPARE = {"eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual"}


def _unary(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    e.op(UNARY[node.op], ins, out)


for _op in UNARY:
    LOWERINGS[_op] = _unary


def _same_type(e: Emitter, node: Node, ins: list[str], dtype: str) -> list[str]:
    """Inputs cast to ``dtype`` where they differ (PyTorch promotes types, ONNX does not)."""
    return [name if v.dtype == dtype else e.cast(name, dtype) for v, name in zip(node.inputs, ins)]


@lowers(*BINARY)
def _binary(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    if node.op == "pow":  # Pow takes any exponent type
        e.op("Pow", [_same_type(e, node, ins[:1], node.outputs[0].dtype)[0], ins[1]], out)
        return
    dtype = node.outputs[0].dtype
    e.op(BINARY[node.op], _same_type(e, node, ins, dtype), out)


@lowers(*COMPARE, "ne")
def _compare(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    a, b = node.inputs[0].dtype, node.inputs[1].dtype
    common = str(torch.promote_types(torch_dtype(a), torch_dtype(b))).replace("torch.", "")
    args = _same_type(e, node, ins, common)
    if node.op == "ne":
        e.op("Not", [e.op("Equal", args)], out)
    else:
        e.op(COMPARE[node.op], args, out)


@lowers("where")
def _where(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    dtype = node.outputs[0].dtype
    cond = ins[0] if node.inputs[0].dtype == "bool" else e.cast(ins[0], "bool")
    branches = [n if v.dtype == dtype else e.cast(n, dtype) for v, n in zip(node.inputs[1:], ins[1:])]
    e.op("Where", [cond, *branches], out)


def _scalar(e: Emitter, value: float, dtype: str) -> str:
    return e.constant(torch.tensor(value, dtype=torch_dtype(dtype)), "k")


@lowers("silu", "gelu", "hardsigmoid", "clamp", "leaky_relu", "elu", "softplus", "log1p", "expm1", "rsqrt")
def _activation(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    activate(e, node.op, node.attrs, ins[0], node.outputs[0].dtype, out)


def activate(e: Emitter, op: str, attrs: dict[str, Any], x: str, dtype: str, out: str | None = None) -> str:
    """An activation (an IR op name with its attributes) on ``x``."""
    attrs = attrs or {}
    if op in UNARY:
        return e.op(UNARY[op], [x], out)
    if op == "silu":
        return e.op("Mul", [x, e.op("Sigmoid", [x])], out)
    if op == "gelu":
        half = e.op("Mul", [x, _scalar(e, 0.5, dtype)])
        if attrs.get("approximate", "none") == "tanh":
            cube = e.op("Mul", [e.op("Mul", [x, x]), x])
            inner = e.op("Add", [x, e.op("Mul", [cube, _scalar(e, 0.044715, dtype)])])
            t = e.op("Tanh", [e.op("Mul", [inner, _scalar(e, math.sqrt(2 / math.pi), dtype)])])
        else:
            t = e.op("Erf", [e.op("Mul", [x, _scalar(e, 1 / math.sqrt(2), dtype)])])
        return e.op("Mul", [half, e.op("Add", [t, _scalar(e, 1.0, dtype)])], out)
    if op == "hardsigmoid":
        return e.op("HardSigmoid", [x], out, alpha=1 / 6, beta=0.5)
    if op == "clamp":
        low, high = attrs.get("min"), attrs.get("max")
        bounds = [
            _scalar(e, low, dtype) if low is not None else "",
            _scalar(e, high, dtype) if high is not None else "",
        ]
        return e.op("Clip", [x, *bounds], out)
    if op == "leaky_relu":
        return e.op("LeakyRelu", [x], out, alpha=float(attrs["negative_slope"]))
    if op == "elu":
        return e.op("Elu", [x], out, alpha=float(attrs.get("alpha", 1.0)))
    if op == "softplus":
        beta = float(attrs.get("beta", 1.0))
        if beta == 1.0:
            return e.op("Softplus", [x], out)
        scaled = e.op("Softplus", [e.op("Mul", [x, _scalar(e, beta, dtype)])])
        return e.op("Div", [scaled, _scalar(e, beta, dtype)], out)
    if op == "log1p":
        return e.op("Log", [e.op("Add", [x, _scalar(e, 1.0, dtype)])], out)
    if op == "expm1":
        return e.op("Sub", [e.op("Exp", [x]), _scalar(e, 1.0, dtype)], out)
    if op == "rsqrt":
        return e.op("Reciprocal", [e.op("Sqrt", [x])], out)
    raise ExportError(f"no ONNX lowering for the activation {op!r}")


@lowers("cast")
def _cast(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    e.op("Cast", ins, out, to=elem_type(node.attrs["dtype"]))


@lowers("matmul")
def _matmul(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    e.op("MatMul", ins, out)


def _epilogue(e: Emitter, node: Node, y: str, ins: list[str], out: str) -> None:
    """+ residual, then the activation, of a fused node (the bias is already in ``y``)."""
    has_bias = node.attrs.get("has_bias", True)
    if node.attrs.get("has_residual"):
        y = e.op("Add", [y, ins[2 + int(has_bias)]])
    activation = node.attrs.get("activation")
    if activation is None:
        e.op("Identity", [y], out)
    else:
        activate(e, activation, node.attrs.get("activation_attrs") or {}, y, node.outputs[0].dtype, out)


def _conv_attrs(node: Node) -> dict[str, Any]:
    padding = list(node.attrs["padding"])
    return {
        "strides": list(node.attrs["stride"]),
        "pads": padding + padding,
        "dilations": list(node.attrs["dilation"]),
        "group": int(node.attrs.get("groups", 1)),
    }


@lowers("conv")
def _conv(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    e.op("Conv", ins, out, **_conv_attrs(node))


@lowers("conv_fused")
def _conv_fused(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    has_bias = node.attrs.get("has_bias", True)
    y = e.op("Conv", ins[: 3 if has_bias else 2], **_conv_attrs(node))
    _epilogue(e, node, y, ins, out)


@lowers("conv_transpose")
def _conv_transpose(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    padding = list(node.attrs["padding"])
    e.op(
        "ConvTranspose", ins, out, strides=list(node.attrs["stride"]), pads=padding + padding,
        output_padding=list(node.attrs["output_padding"]), dilations=list(node.attrs["dilation"]),
        group=int(node.attrs.get("groups", 1)),
    )  # fmt: skip


@lowers("linear")
def _linear(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    y = e.op("MatMul", ins[:2])
    if node.attrs.get("has_bias", True):
        y = e.op("Add", [y, ins[2]])
    _epilogue(e, node, y, ins, out)


@lowers("max_pool")
def _max_pool(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    padding = list(node.attrs["padding"])
    e.op(
        "MaxPool", ins, out, kernel_shape=list(node.attrs["kernel"]), strides=list(node.attrs["stride"]),
        pads=padding + padding, dilations=list(node.attrs["dilation"]), ceil_mode=int(node.attrs.get("ceil_mode", False)),
    )  # fmt: skip


@lowers("avg_pool")
def _avg_pool(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    if node.attrs.get("divisor") is not None:
        raise ExportError("average pooling with a divisor override has no ONNX equivalent")
    padding = list(node.attrs["padding"])
    e.op(
        "AveragePool", ins, out, kernel_shape=list(node.attrs["kernel"]), strides=list(node.attrs["stride"]),
        pads=padding + padding, ceil_mode=int(node.attrs.get("ceil_mode", False)),
        count_include_pad=int(node.attrs.get("count_include_pad", True)),
    )  # fmt: skip


@lowers("batch_norm")
def _batch_norm(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    x, mean, var = ins[:3]
    channels = node.inputs[1].shape[0]
    dtype = node.inputs[1].dtype
    scale = ins[3] if len(ins) > 3 else e.constant(torch.ones(channels, dtype=torch_dtype(dtype)))
    bias = ins[4] if len(ins) > 4 else e.constant(torch.zeros(channels, dtype=torch_dtype(dtype)))
    e.op("BatchNormalization", [x, scale, bias, mean, var], out, epsilon=float(node.attrs["eps"]))


@lowers("layer_norm")
def _layer_norm(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    shape = list(node.attrs["normalized_shape"])
    dtype = node.inputs[0].dtype
    scale = ins[1] if len(ins) > 1 else e.constant(torch.ones(shape, dtype=torch_dtype(dtype)))
    args = [ins[0], scale] + ([ins[2]] if len(ins) > 2 else [])
    e.op("LayerNormalization", args, out, axis=-len(shape), epsilon=float(node.attrs["eps"]))


@lowers("softmax", "log_softmax")
def _softmax(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    e.op("Softmax" if node.op == "softmax" else "LogSoftmax", ins, out, axis=int(node.attrs["dim"]))


@lowers("attention")
def _attention(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    q, k, v = ins[:3]
    dtype = node.inputs[0].dtype
    rank = len(node.inputs[1].shape)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    scale = node.attrs.get("scale") or 1 / math.sqrt(node.inputs[0].shape[-1])
    scores = e.op("Mul", [e.op("MatMul", [q, e.op("Transpose", [k], perm=perm)]), _scalar(e, scale, dtype)])
    if len(ins) > 3:
        mask = node.inputs[3]
        if mask.dtype == "bool":  # True: attend; False: -inf
            scores = e.op("Where", [ins[3], scores, _scalar(e, float("-inf"), dtype)])
        else:
            scores = e.op("Add", [scores, ins[3] if mask.dtype == dtype else e.cast(ins[3], dtype)])
    if node.attrs.get("is_causal"):
        lq, lk = node.inputs[0].shape[-2], node.inputs[1].shape[-2]
        allowed = torch.ones(lq, lk, dtype=torch.bool).tril()
        scores = e.op("Where", [e.constant(allowed, "causal"), scores, _scalar(e, float("-inf"), dtype)])
    e.op("MatMul", [e.op("Softmax", [scores], axis=-1), v], out)


REDUCE = {
    "reduce_mean": "ReduceMean",
    "reduce_sum": "ReduceSum",
    "reduce_max": "ReduceMax",
    "reduce_min": "ReduceMin",
    "reduce_prod": "ReduceProd",
}


@lowers(*REDUCE, "reduce_any", "reduce_all")
def _reduce(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    axes = e.ints(node.attrs["dims"], "axes")
    keep = int(node.attrs.get("keepdim", False))
    if node.op in REDUCE:
        e.op(REDUCE[node.op], [ins[0], axes], out, keepdims=keep)
        return
    as_int = e.cast(ins[0], "int32")
    reduced = e.op("ReduceMax" if node.op == "reduce_any" else "ReduceMin", [as_int, axes], keepdims=keep)
    e.op("Cast", [reduced], out, to=elem_type("bool"))


@lowers("reduce_var")
def _reduce_var(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    dims = list(node.attrs["dims"])
    dtype = node.outputs[0].dtype
    axes = e.ints(dims, "axes")
    mean = e.op("ReduceMean", [ins[0], axes], keepdims=1)
    diff = e.op("Sub", [ins[0], mean])
    sq = e.op("ReduceMean", [e.op("Mul", [diff, diff]), axes], keepdims=int(node.attrs.get("keepdim", False)))
    count = math.prod(node.inputs[0].shape[d] for d in dims)
    correction = float(node.attrs.get("correction", 0.0))
    e.op("Mul", [sq, _scalar(e, count / max(count - correction, 1e-12), dtype)], out)


@lowers("argmax", "argmin")
def _arg(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    kind = "ArgMax" if node.op == "argmax" else "ArgMin"
    e.op(kind, ins, out, axis=int(node.attrs["dim"]), keepdims=int(node.attrs.get("keepdim", False)))


@lowers("cumsum")
def _cumsum(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    e.op("CumSum", [ins[0], e.constant(torch.tensor(int(node.attrs["dim"])), "axis")], out)


def _concrete(node: Node, sizes: Sequence[Any]) -> list[int]:
    if not all(isinstance(s, int) for s in sizes):
        raise ExportError(
            f"{node.op} of layer {node.layer!r} has symbolic sizes {list(sizes)}: export a concrete shape"
        )
    return [int(s) for s in sizes]


@lowers("reshape")
def _reshape(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    e.op("Reshape", [ins[0], e.ints(_concrete(node, node.outputs[0].shape))], out)


@lowers("permute")
def _permute(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    e.op("Transpose", ins, out, perm=list(node.attrs["dims"]))


@lowers("expand")
def _expand(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    e.op("Expand", [ins[0], e.ints(_concrete(node, node.outputs[0].shape))], out)


@lowers("slice")
def _slice(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    a = node.attrs
    start, end = _concrete(node, [a["start"], a["end"]])
    end = min(end, 2**62)
    e.op(
        "Slice", [ins[0], e.ints([start]), e.ints([end]), e.ints([a["dim"]]), e.ints([a.get("step", 1)])], out
    )


@lowers("concat")
def _concat(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    dtype = node.outputs[0].dtype
    e.op("Concat", _same_type(e, node, ins, dtype), out, axis=int(node.attrs["dim"]))


@lowers("pad")
def _pad(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    pads = _concrete(node, node.attrs["pads"])
    rank = len(node.inputs[0].shape)
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pads) // 2):  # pairs from the last dimension backwards
        begins[rank - 1 - i], ends[rank - 1 - i] = pads[2 * i], pads[2 * i + 1]
    mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}[
        node.attrs.get("mode", "constant")
    ]
    value = (
        _scalar(e, float(node.attrs.get("value", 0.0)), node.inputs[0].dtype) if mode == "constant" else ""
    )
    e.op("Pad", [ins[0], e.ints(begins + ends), value], out, mode=mode)


@lowers("gather")
def _gather(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    e.op("Gather", ins, out, axis=int(node.attrs["dim"]))


@lowers("take_along")
def _take_along(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    e.op("GatherElements", ins, out, axis=int(node.attrs["dim"]))


@lowers("full_like")
def _full_like(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    value = torch.tensor([node.attrs["value"]], dtype=torch_dtype(node.attrs["dtype"]))
    e.op("ConstantOfShape", [e.op("Shape", ins)], out, value=e.tensor(e.fresh("fill"), value))


@lowers("arange")
def _arange(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    a = node.attrs
    start, end = _concrete(node, [a["start"], a["end"]])
    values = torch.arange(start, end, a.get("step", 1), dtype=torch_dtype(a["dtype"]))
    e.op("Identity", [e.constant(values, "range")], out)


@lowers("resize")
def _resize(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    mode = node.attrs["mode"]
    sizes = [int(d) for d in node.outputs[0].shape]
    if mode == "nearest":
        extra = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    elif mode in ("bilinear", "linear", "trilinear"):
        align = bool(node.attrs.get("align_corners"))
        extra = {
            "mode": "linear",
            "coordinate_transformation_mode": "align_corners" if align else "half_pixel",
        }
    else:
        raise ExportError(f"resize mode {mode!r} has no ONNX lowering")
    e.op("Resize", [ins[0], "", "", e.ints(sizes, "sizes")], out, **extra)


def _zero_point(e: Emitter, dtype: str, scale: Value) -> str:
    """Zeros of the quantized ``dtype`` shaped like ``scale`` (ONNX wants one per channel
    where the scale is per channel): kerasrt's quantization is symmetric."""
    return e.constant(torch.zeros(scale.shape, dtype=torch_dtype(dtype)), "zero_point")


def _axis(node: Node) -> dict[str, int]:
    return {"axis": int(node.attrs["axis"])} if node.attrs.get("axis") is not None else {}


@lowers("quantize")
def _quantize(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    # kerasrt divides in float32
    x = ins[0] if node.inputs[0].dtype == "float32" else e.cast(ins[0], "float32")
    zero = _zero_point(e, node.attrs["dtype"], node.inputs[1])
    e.op("QuantizeLinear", [x, ins[1], zero], out, **_axis(node))


@lowers("dequantize")
def _dequantize(e: Emitter, node: Node, ins: list[str], out: str) -> None:
    zero = _zero_point(e, node.inputs[0].dtype, node.inputs[1])
    dtype = node.attrs.get("dtype", "float32")
    y = e.op("DequantizeLinear", [ins[0], ins[1], zero], out if dtype == "float32" else None, **_axis(node))
    if dtype != "float32":
        e.op("Cast", [y], out, to=elem_type(dtype))


def to_onnx(graph: Graph, name: str = "kerasrt") -> Any:
    """The ONNX model of ``graph`` (an engine graph at concrete shapes)."""
    onnx = _onnx()
    e = Emitter()
    for value in graph.constants.values():
        e.initializers.append(e.tensor(value.name, value.data))
    refused = sorted({n.op for n in graph.nodes if n.op not in LOWERINGS})
    if refused:
        layers = sorted({n.layer or n.op for n in graph.nodes if n.op in refused})[:5]
        raise ExportError(
            f"the graph holds ops ONNX export cannot write: {refused} (layers {layers}); "
            "a layer that runs in Keras (keras_layer) or a cache write has no ONNX form"
        )
    for node in graph.nodes:
        if len(node.outputs) != 1:
            raise ExportError(f"{node.op} of layer {node.layer!r} has {len(node.outputs)} outputs")
        LOWERINGS[node.op](e, node, [v.name for v in node.inputs], node.outputs[0].name)
    outputs = []
    for i, value in enumerate(graph.outputs):
        if value in graph.inputs or value.is_constant:  # ONNX outputs must be made by a node
            alias = f"output_{i}"
            e.op("Identity", [value.name], alias)
            outputs.append(_info(alias, value))
        else:
            outputs.append(_info(value.name, value))
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            e.nodes, name, [_info(v.name, v) for v in graph.inputs], outputs, e.initializers
        ),
        opset_imports=[onnx.helper.make_opsetid("", OPSET)],
        producer_name="kerasrt",
    )
    model.ir_version = min(model.ir_version, 10)  # what current onnxruntime releases read
    onnx.checker.check_model(model)
    return model


def _info(name: str, value: Value) -> Any:
    shape = [d if isinstance(d, int) else str(d) for d in value.shape]
    return _onnx().helper.make_tensor_value_info(name, elem_type(value.dtype), shape)


def export_onnx(model: Any, path: str | Path, shapes: Sequence[Sequence[int]] | None = None) -> Path:
    """Write ``model`` (an OptimizedModel) as ONNX at input ``shapes`` (default: its most recent
    engine's, else its first input shapes), optimized and lowered to its precision as its
    engines are (before kernel choices, which ONNX has no use for). Written atomically."""
    from kerasrt.compile.pipeline import compile_graph

    if shapes is None:
        if not model.engine_shapes:
            raise ExportError("the model has no engine yet: give the input shapes to export at")
        shapes = model.engine_shapes[-1]
    shapes = tuple(tuple(int(d) for d in s) for s in shapes)
    source = next((s for s in model.sources if _serves(s, shapes)), None)
    if source is None:
        raise ExportError(f"no source graph of the model serves input shapes {[list(s) for s in shapes]}")
    graph = compile_graph(source, shapes, model.settings)
    proto = to_onnx(graph, model.name)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _onnx().save(proto, str(tmp))
    tmp.replace(path)
    return path


def _serves(source: Graph, shapes: Sequence[Sequence[int]]) -> bool:
    from kerasrt.compile.pipeline import serves

    return serves(source, shapes) is None


ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def check_with_onnxruntime(path: str | Path, model: Any, seed: int = 0) -> float:
    """Run the ONNX file in onnxruntime (CPU) on random inputs at its shapes and return the
    largest error against kerasrt's own output, relative to the output's scale."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("checking the export needs onnxruntime: pip install 'kerasrt[onnx]'") from None
    from kerasrt.frontend.importer import example_tensor

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    feeds, tensors = {}, []
    for spec, info in zip(model.inputs, session.get_inputs()):
        shape = [int(d) for d in info.shape]
        tensor = example_tensor(shape, spec.dtype, generator)
        tensors.append(tensor)
        wanted = ORT_TYPES.get(info.type)  # a staged input (FP16 engines) takes its low precision
        feeds[info.name] = tensor.numpy().astype(wanted) if wanted else tensor.numpy()
    got = session.run(None, feeds)
    expected = model(*tensors)
    expected = expected if isinstance(expected, list) else [expected]
    worst = 0.0
    for g, x in zip(got, expected):
        x = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
        scale = float(np.abs(x).max()) or 1.0
        worst = max(worst, float(np.abs(np.asarray(g, np.float32) - x).max()) / scale)
    return worst
