"""ONNX model -> IR graph: models from PyTorch (``torch.onnx.export``), tf2onnx or kerasrt's own
export get the same passes and engines as Keras models.

One function per ONNX op (``IMPORTERS``) adds the IR nodes that compute it; the IR op's shape
inference types every value. The import is at concrete input shapes (the model's own where
they are numbers, ``input_shapes`` or ``batch_size`` where they are symbolic): ONNX graphs
compute their reshape targets from ``Shape`` ops, which are folded at those shapes. An op
without an importer is refused with its name (there is no framework to fall back to).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kerasrt.errors import ConversionError, ModelLoadError
from kerasrt.ir.graph import Graph, Value

Importer = Callable[["OnnxImport", Any], list[Value]]
IMPORTERS: dict[str, Importer] = {}


def imports(*op_types: str) -> Callable[[Importer], Importer]:
    def wrap(fn: Importer) -> Importer:
        for op in op_types:
            IMPORTERS[op] = fn
        return fn

    return wrap


class OnnxImport:
    """The state of one import: the IR graph built so far and the IR value of each ONNX name
    (constants, initializers and values folded at the import's shapes are IR constants)."""

    def __init__(self) -> None:
        self.graph = Graph()
        self.values: dict[str, Value] = {}

    def value(self, name: str) -> Value:
        return self.values[name]

    def constant_of(self, name: str) -> torch.Tensor | None:
        """The data of ONNX value ``name`` where it is known at import (else None)."""
        value = self.values.get(name)
        return value.data if value is not None and value.is_constant else None

    def ints(self, name: str) -> list[int]:
        data = self.constant_of(name)
        if data is None:
            raise ConversionError(f"ONNX value {name!r} must be a constant at import (a shape or axes input)")
        return [int(v) for v in data.reshape(-1).tolist()]

    def constant(self, data: torch.Tensor, hint: str = "const") -> Value:
        return self.graph.add_constant(hint, data)

    def add(self, op: str, inputs: Sequence[Value], layer: str, **attrs: Any) -> Value:
        if all(v.is_constant for v in inputs) and op not in ("quantize", "dequantize"):
            from kerasrt.ir.ops import run_reference

            return self.constant(run_reference(op, [v.data for v in inputs], attrs), f"{layer}_folded")
        return self.graph.add_node(op, list(inputs), attrs, layer=layer).outputs[0]


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _tensor(proto: Any) -> torch.Tensor:
    from onnx import numpy_helper

    array = numpy_helper.to_array(proto)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array).copy())


def _layer(node: Any) -> str:
    return node.name or node.output[0]


UNARY = {
    "Relu": "relu",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "Exp": "exp",
    "Log": "log",
    "Sqrt": "sqrt",
    "Neg": "neg",
    "Abs": "abs",
    "Erf": "erf",
    "Reciprocal": "reciprocal",
    "Floor": "floor",
    "Ceil": "ceil",
    "Sin": "sin",
    "Cos": "cos",
    "HardSwish": "hardswish",
    "Not": "logical_not",
}
BINARY = {
    "Add": "add",
    "Sub": "sub",
    "Mul": "mul",
    "Div": "div",
    "Pow": "pow",
    "Max": "maximum",
    "Min": "minimum",
    "Equal": "eq",
    "Less": "lt",
    "Greater": "gt",
    "LessOrEqual": "le",
    "GreaterOrEqual": "ge",
    "And": "logical_and",
    "Or": "logical_or",
}


@imports(*UNARY)
def _unary(im: OnnxImport, node: Any) -> list[Value]:
    return [im.add(UNARY[node.op_type], [im.value(node.input[0])], _layer(node))]


@imports(*BINARY)
def _binary(im: OnnxImport, node: Any) -> list[Value]:
    a, b = im.value(node.input[0]), im.value(node.input[1])
    return [im.add(BINARY[node.op_type], [a, b], _layer(node))]


@imports("Max", "Min", "Sum")
def _variadic(im: OnnxImport, node: Any) -> list[Value]:
    op = {"Max": "maximum", "Min": "minimum", "Sum": "add"}[node.op_type]
    result = im.value(node.input[0])
    for name in node.input[1:]:
        result = im.add(op, [result, im.value(name)], _layer(node))
    return [result]


@imports("Identity", "Dropout")
def _identity(im: OnnxImport, node: Any) -> list[Value]:
    return [im.value(node.input[0])]


@imports("Constant")
def _constant(im: OnnxImport, node: Any) -> list[Value]:
    attrs = _attrs(node)
    if "value" not in attrs:
        raise ConversionError(f"Constant {node.output[0]!r}: only tensor constants are supported")
    return [im.constant(_tensor(attrs["value"]), node.output[0])]


@imports("Cast")
def _cast(im: OnnxImport, node: Any) -> list[Value]:
    import onnx

    dtype = str(onnx.helper.tensor_dtype_to_np_dtype(_attrs(node)["to"]))
    dtype = {"float64": "float32"}.get(dtype, dtype)
    return [im.add("cast", [im.value(node.input[0])], _layer(node), dtype=dtype)]


@imports("LeakyRelu", "Elu", "HardSigmoid", "Clip", "Softplus", "Gelu")
def _activation(im: OnnxImport, node: Any) -> list[Value]:
    x, attrs, layer = im.value(node.input[0]), _attrs(node), _layer(node)
    if node.op_type == "LeakyRelu":
        return [im.add("leaky_relu", [x], layer, negative_slope=float(attrs.get("alpha", 0.01)))]
    if node.op_type == "Elu":
        return [im.add("elu", [x], layer, alpha=float(attrs.get("alpha", 1.0)))]
    if node.op_type == "HardSigmoid":
        alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
        scaled = im.add(
            "add",
            [im.add("mul", [x, im.constant(torch.tensor(alpha))], layer), im.constant(torch.tensor(beta))],
            layer,
        )
        return [im.add("clamp", [scaled], layer, min=0.0, max=1.0)]
    if node.op_type == "Softplus":
        return [im.add("softplus", [x], layer, beta=1.0, threshold=20.0)]
    if node.op_type == "Gelu":
        return [im.add("gelu", [x], layer, approximate=attrs.get("approximate", "none"))]
    bounds = [im.constant_of(n) if n else None for n in list(node.input[1:3]) + [""] * (3 - len(node.input))]
    low = float(bounds[0]) if bounds[0] is not None else None
    high = float(bounds[1]) if bounds[1] is not None else None
    return [im.add("clamp", [x], layer, min=low, max=high)]


@imports("Conv")
def _conv(im: OnnxImport, node: Any) -> list[Value]:
    attrs = _attrs(node)
    x, w = im.value(node.input[0]), im.value(node.input[1])
    spatial = len(w.shape) - 2
    pads = list(attrs.get("pads", [0] * (2 * spatial)))
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or pads[:spatial] != pads[spatial:]:
        raise ConversionError(f"Conv {node.name!r}: asymmetric or automatic padding is not supported")
    inputs = [x, w] + ([im.value(node.input[2])] if len(node.input) > 2 and node.input[2] else [])
    return [
        im.add(
            "conv",
            inputs,
            _layer(node),
            stride=list(attrs.get("strides", [1] * spatial)),
            padding=pads[:spatial],
            dilation=list(attrs.get("dilations", [1] * spatial)),
            groups=int(attrs.get("group", 1)),
        )
    ]


@imports("Gemm")
def _gemm(im: OnnxImport, node: Any) -> list[Value]:
    attrs, layer = _attrs(node), _layer(node)
    a, b = im.value(node.input[0]), im.value(node.input[1])
    if attrs.get("transA", 0):
        a = im.add("permute", [a], layer, dims=[1, 0])
    if attrs.get("transB", 0):
        b = im.add("permute", [b], layer, dims=[1, 0])
    y = im.add("matmul", [a, b], layer)
    if attrs.get("alpha", 1.0) != 1.0:
        y = im.add("mul", [y, im.constant(torch.tensor(float(attrs["alpha"])))], layer)
    if len(node.input) > 2 and node.input[2]:
        c = im.value(node.input[2])
        if attrs.get("beta", 1.0) != 1.0:
            c = im.add("mul", [c, im.constant(torch.tensor(float(attrs["beta"])))], layer)
        y = im.add("add", [y, c], layer)
    return [y]


@imports("MatMul")
def _matmul(im: OnnxImport, node: Any) -> list[Value]:
    return [im.add("matmul", [im.value(node.input[0]), im.value(node.input[1])], _layer(node))]


@imports("BatchNormalization")
def _batch_norm(im: OnnxImport, node: Any) -> list[Value]:
    x, scale, bias, mean, var = (im.value(n) for n in node.input[:5])
    return [
        im.add(
            "batch_norm",
            [x, mean, var, scale, bias],
            _layer(node),
            eps=float(_attrs(node).get("epsilon", 1e-5)),
        )
    ]


@imports("LayerNormalization")
def _layer_norm(im: OnnxImport, node: Any) -> list[Value]:
    attrs = _attrs(node)
    x = im.value(node.input[0])
    axis = int(attrs.get("axis", -1)) % len(x.shape)
    inputs = [x] + [im.value(n) for n in node.input[1:3] if n]
    return [
        im.add(
            "layer_norm",
            inputs,
            _layer(node),
            normalized_shape=list(x.shape[axis:]),
            eps=float(attrs.get("epsilon", 1e-5)),
        )
    ]


@imports("MaxPool", "AveragePool")
def _pool(im: OnnxImport, node: Any) -> list[Value]:
    attrs = _attrs(node)
    kernel = list(attrs["kernel_shape"])
    spatial = len(kernel)
    pads = list(attrs.get("pads", [0] * (2 * spatial)))
    if pads[:spatial] != pads[spatial:]:
        raise ConversionError(f"{node.op_type} {node.name!r}: asymmetric padding is not supported")
    common = {"kernel": kernel, "stride": list(attrs.get("strides", [1] * spatial)), "padding": pads[:spatial],
              "ceil_mode": bool(attrs.get("ceil_mode", 0))}  # fmt: skip
    x = im.value(node.input[0])
    if node.op_type == "MaxPool":
        return [
            im.add(
                "max_pool", [x], _layer(node), dilation=list(attrs.get("dilations", [1] * spatial)), **common
            )
        ]
    return [
        im.add(
            "avg_pool", [x], _layer(node), count_include_pad=bool(attrs.get("count_include_pad", 0)), **common
        )
    ]


@imports("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(im: OnnxImport, node: Any) -> list[Value]:
    x = im.value(node.input[0])
    op = "reduce_mean" if node.op_type == "GlobalAveragePool" else "reduce_max"
    return [im.add(op, [x], _layer(node), dims=list(range(2, len(x.shape))), keepdim=True)]


@imports("Softmax", "LogSoftmax")
def _softmax(im: OnnxImport, node: Any) -> list[Value]:
    op = "softmax" if node.op_type == "Softmax" else "log_softmax"
    return [im.add(op, [im.value(node.input[0])], _layer(node), dim=int(_attrs(node).get("axis", -1)))]


@imports("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd")
def _reduce(im: OnnxImport, node: Any) -> list[Value]:
    attrs = _attrs(node)
    x = im.value(node.input[0])
    axes = (
        im.ints(node.input[1])
        if len(node.input) > 1 and node.input[1]
        else list(attrs.get("axes", range(len(x.shape))))
    )
    op = {"ReduceMean": "reduce_mean", "ReduceSum": "reduce_sum", "ReduceMax": "reduce_max",
          "ReduceMin": "reduce_min", "ReduceProd": "reduce_prod"}[node.op_type]  # fmt: skip
    return [
        im.add(
            op,
            [x],
            _layer(node),
            dims=[a % len(x.shape) for a in axes],
            keepdim=bool(attrs.get("keepdims", 1)),
        )
    ]


@imports("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand")
def _reshape(im: OnnxImport, node: Any) -> list[Value]:
    x, attrs, layer = im.value(node.input[0]), _attrs(node), _layer(node)
    shape = list(x.shape)
    if node.op_type == "Reshape":
        target = im.ints(node.input[1])
        target = [shape[i] if d == 0 and not attrs.get("allowzero", 0) else d for i, d in enumerate(target)]
        return [im.add("reshape", [x], layer, shape=target)]
    if node.op_type == "Flatten":
        axis = int(attrs.get("axis", 1)) % max(len(shape), 1)
        return [im.add("reshape", [x], layer, shape=[int(np.prod(shape[:axis])), -1])]
    if node.op_type == "Expand":
        target = im.ints(node.input[1])
        out = list(torch.broadcast_shapes(tuple(shape), tuple(target)))
        return [im.add("expand", [x], layer, shape=out)]
    axes = im.ints(node.input[1]) if len(node.input) > 1 else list(attrs.get("axes", []))
    if node.op_type == "Squeeze":
        axes = [a % len(shape) for a in axes] or [i for i, d in enumerate(shape) if d == 1]
        return [im.add("reshape", [x], layer, shape=[d for i, d in enumerate(shape) if i not in axes])]
    rank = len(shape) + len(axes)
    for axis in sorted(a % rank for a in axes):
        shape.insert(axis, 1)
    return [im.add("reshape", [x], layer, shape=shape)]


@imports("Transpose")
def _transpose(im: OnnxImport, node: Any) -> list[Value]:
    x = im.value(node.input[0])
    perm = list(_attrs(node).get("perm", reversed(range(len(x.shape)))))
    return [im.add("permute", [x], _layer(node), dims=perm)]


@imports("Concat")
def _concat(im: OnnxImport, node: Any) -> list[Value]:
    return [im.add("concat", [im.value(n) for n in node.input], _layer(node), dim=int(_attrs(node)["axis"]))]


@imports("Shape")
def _shape(im: OnnxImport, node: Any) -> list[Value]:
    return [im.constant(torch.tensor(list(im.value(node.input[0]).shape), dtype=torch.int64), node.output[0])]


@imports("Gather")
def _gather(im: OnnxImport, node: Any) -> list[Value]:
    x, index = im.value(node.input[0]), im.value(node.input[1])
    axis = int(_attrs(node).get("axis", 0)) % len(x.shape)
    if index.is_constant:
        index = im.constant(
            torch.where(index.data < 0, index.data + x.shape[axis], index.data).to(torch.int64)
        )
    return [im.add("gather", [x, index], _layer(node), dim=axis)]


@imports("Slice")
def _slice(im: OnnxImport, node: Any) -> list[Value]:
    x, layer = im.value(node.input[0]), _layer(node)
    starts, ends = im.ints(node.input[1]), im.ints(node.input[2])
    axes = im.ints(node.input[3]) if len(node.input) > 3 and node.input[3] else list(range(len(starts)))
    steps = im.ints(node.input[4]) if len(node.input) > 4 and node.input[4] else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = x.shape[axis % len(x.shape)]
        if step < 0:
            raise ConversionError(f"Slice {node.name!r}: negative steps are not supported")
        start = max(0, min(size, start + size if start < 0 else start))
        end = max(0, min(size, end + size if end < 0 else end))
        x = im.add("slice", [x], layer, dim=axis % len(x.shape), start=start, end=end, step=step)
    return [x]


@imports("Pad")
def _pad(im: OnnxImport, node: Any) -> list[Value]:
    x = im.value(node.input[0])
    pads = im.ints(node.input[1])
    rank = len(x.shape)
    torch_pads: list[int] = []
    for dim in reversed(range(rank)):
        torch_pads += [pads[dim], pads[rank + dim]]
    mode = _attrs(node).get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    value = im.constant_of(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return [
        im.add(
            "pad",
            [x],
            _layer(node),
            pads=torch_pads,
            mode={"edge": "replicate"}.get(mode, mode),
            value=float(value) if value is not None else 0.0,
        )
    ]


@imports("Resize")
def _resize(im: OnnxImport, node: Any) -> list[Value]:
    attrs = _attrs(node)
    x = im.value(node.input[0])
    text = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    mode, transform = text.get("mode", "nearest"), text.get("coordinate_transformation_mode", "half_pixel")
    if len(node.input) > 3 and node.input[3]:
        sizes = im.ints(node.input[3])
    else:
        scales = im.constant_of(node.input[2]).tolist()
        sizes = [math.floor(d * s) for d, s in zip(x.shape, scales)]
    if list(sizes[:2]) != list(x.shape[:2]):
        raise ConversionError(f"Resize {node.name!r}: only spatial dimensions can be resized")
    if (
        mode == "nearest"
        and transform == "asymmetric"
        and text.get("nearest_mode", "round_prefer_floor") == "floor"
    ):
        return [im.add("resize", [x], _layer(node), size=sizes[2:], mode="nearest", align_corners=None)]
    if mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        kind = {3: "linear", 4: "bilinear", 5: "trilinear"}[len(x.shape)]
        return [
            im.add(
                "resize",
                [x],
                _layer(node),
                size=sizes[2:],
                mode=kind,
                align_corners=transform == "align_corners",
            )
        ]
    raise ConversionError(
        f"Resize {node.name!r}: mode {mode!r} with {transform!r} coordinates is not supported"
    )


@imports("Where")
def _where(im: OnnxImport, node: Any) -> list[Value]:
    return [im.add("where", [im.value(n) for n in node.input], _layer(node))]


@imports("QuantizeLinear", "DequantizeLinear")
def _qdq(im: OnnxImport, node: Any) -> list[Value]:
    x, scale = im.value(node.input[0]), im.value(node.input[1])
    zero = im.constant_of(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero is not None and bool((zero.float() != 0).any()):
        raise ConversionError(f"{node.op_type} {node.name!r}: asymmetric quantization (a nonzero zero point)")
    axis = int(_attrs(node).get("axis", 1)) % len(x.shape) if scale.shape else None
    scale = (
        im.constant(scale.data.to(torch.float32)) if scale.dtype != "float32" and scale.is_constant else scale
    )
    if node.op_type == "QuantizeLinear":
        dtype = str(zero.dtype).replace("torch.", "") if zero is not None else "int8"
        if dtype not in ("int8", "float8_e4m3fn"):
            raise ConversionError(
                f"QuantizeLinear {node.name!r}: {dtype} (kerasrt quantizes to int8 or float8_e4m3fn)"
            )
        if x.dtype != "float32":
            x = im.add("cast", [x], _layer(node), dtype="float32")
        return [im.add("quantize", [x, scale], _layer(node), axis=axis, dtype=dtype)]
    return [im.add("dequantize", [x, scale], _layer(node), axis=axis, dtype="float32")]


def import_onnx(
    path: str | Path, input_shapes: Sequence[Sequence[int]] | None = None, batch_size: int = 1
) -> tuple[Graph, list[str]]:
    """(the IR graph of the ONNX model at ``path``, its output names). Symbolic input sizes are
    taken from ``input_shapes`` (one per input), else the first one from ``batch_size``."""
    try:
        import onnx
    except ImportError:
        raise ModelLoadError("importing ONNX needs the onnx package: pip install 'kerasrt[onnx]'") from None
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a valid ONNX model: {str(exc).splitlines()[0]}") from None
    graph = model.graph
    im = OnnxImport()
    for init in graph.initializer:
        im.values[init.name] = im.constant(_tensor(init), init.name)
    inputs = [i for i in graph.input if i.name not in im.values]
    if input_shapes is not None and len(input_shapes) != len(inputs):
        raise ConversionError(
            f"the ONNX model has {len(inputs)} inputs; input_shapes gives {len(input_shapes)}"
        )
    for index, info in enumerate(inputs):
        declared = [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
        if input_shapes is not None:
            shape = [int(d) for d in input_shapes[index]]
        else:
            shape = [batch_size if d is None and i == 0 else d for i, d in enumerate(declared)]
            if None in shape:
                raise ConversionError(
                    f"ONNX input {info.name!r} has unknown sizes {declared}: give input_shapes"
                )
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type))
        im.values[info.name] = im.graph.add_input(info.name, shape, dtype)
    missing = sorted({n.op_type for n in graph.node if n.op_type not in IMPORTERS})
    if missing:
        raise ConversionError(f"ONNX ops kerasrt cannot import: {missing}")
    for node in graph.node:
        results = IMPORTERS[node.op_type](im, node)
        for name, value in zip(node.output, results):
            im.values[name] = value
    im.graph.outputs = [im.value(o.name) for o in graph.output]
    im.graph.remove_unused()
    return im.graph, [o.name for o in graph.output]
