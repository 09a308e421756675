"""Keras model -> IR graph.

Functional and Sequential models are walked node by node; each layer or keras.ops call is
traced on Keras's torch backend (``make_fx``) at the concrete input shapes and lowered from
ATen into IR nodes tagged with the layer's name. Nested functional models are walked
recursively. Subclassed models and custom layers have no graph and are traced whole.
A layer that will not trace or lower becomes a ``keras_layer`` fallback node with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from kerasrt.errors import ConversionError
from kerasrt.frontend import keras_adapter as ka
from kerasrt.frontend.aten import AtenLowering, UnsupportedOp
from kerasrt.ir.graph import Graph, Value, dtype_name, torch_dtype

log = logging.getLogger(__name__)


class _NoHostEscape(TorchFunctionMode):
    """Refuse to trace code that reads tensor values on the host (``.numpy()``, ``bool(x)``,
    ``.item()``...): a trace would silently bake the example input's values into constants.
    """

    _BANNED = frozenset(
        {
            torch.Tensor.numpy,
            torch.Tensor.item,
            torch.Tensor.tolist,
            torch.Tensor.__array__,
            torch.Tensor.__bool__,
            torch.Tensor.__int__,
            torch.Tensor.__float__,
            torch.Tensor.__index__,
        }
    )

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in self._BANNED:
            raise UnsupportedOp(
                f"reads tensor values on the host ({getattr(func, '__name__', func)}), so it cannot be traced"
            )
        return func(*args, **(kwargs or {}))


class _Traced:
    """A value flowing through the Keras graph walk: its IR value and an example tensor."""

    __slots__ = ("example", "value")

    def __init__(self, value: Value, example: torch.Tensor):
        self.value = value
        self.example = example

    def drop_example(self) -> None:
        """Free the example tensor once no later layer reads it (import memory stays at the
        live activations, not all of them)."""
        self.example = None


@dataclass(frozen=True)
class InputSpec:
    """A concrete model input: name, shape (batch included) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def resolve_input_specs(
    model: Any, input_shapes: Sequence[Sequence[int]] | None, batch_size: int
) -> list[InputSpec]:
    """Concrete input shapes: the user's, or the model's with the batch dim filled in."""
    declared = ka.input_specs(model)
    names = [getattr(x, "name", f"input_{i}") for i, x in enumerate(_model_inputs(model))]
    if input_shapes is not None:
        if declared and len(input_shapes) != len(declared):
            raise ConversionError(
                f"model has {len(declared)} inputs but {len(input_shapes)} input shapes were given"
            )
        dtypes = [d for _, d in declared] or ["float32"] * len(input_shapes)
        for i, shape in enumerate(input_shapes):
            if declared:
                want = declared[i][0]
                ok = len(want) == len(shape) and all(w is None or w == s for w, s in zip(want, shape))
                if not ok:
                    raise ConversionError(f"input shape {tuple(shape)} does not fit the model's input {want}")
        names = names if len(names) == len(input_shapes) else [f"input_{i}" for i in range(len(input_shapes))]
        return [InputSpec(n, tuple(s), d) for n, s, d in zip(names, input_shapes, dtypes)]
    if not declared:
        raise ConversionError(
            f"model {model.name!r} has no declared input shape (a subclassed model?): "
            "pass input_shapes (CLI: --input-shape 1,224,224,3)"
        )
    specs = []
    for name, (shape, dtype) in zip(names, declared):
        concrete = (batch_size,) + tuple(shape[1:])
        if any(d is None for d in concrete):
            raise ConversionError(
                f"input {name!r} has unknown dimensions {shape}: pass input_shapes (CLI: --input-shape)"
            )
        specs.append(InputSpec(name, concrete, dtype))
    return specs


def _model_inputs(model: Any) -> list[Any]:
    try:
        return list(model.inputs or [])
    except (AttributeError, ValueError):
        return []


def example_tensor(
    spec_shape: Sequence[int], dtype: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A random tensor of the given type (small non-negative integers for integer inputs)."""
    tdtype = torch_dtype(dtype)
    if tdtype.is_floating_point:
        return torch.randn(tuple(spec_shape), generator=generator).to(tdtype)
    if tdtype == torch.bool:
        return torch.randint(0, 2, tuple(spec_shape), generator=generator).bool()
    return torch.randint(0, 2, tuple(spec_shape), generator=generator).to(tdtype)


class Importer:
    """Builds one IR graph for one set of concrete input shapes."""

    def __init__(
        self, model: Any, keep_in_keras: Sequence[str] = (), progress: Callable[[str], None] | None = None
    ):
        self.model = model
        self.keep = set(keep_in_keras)
        self.kept: set[str] = set()  # the entries of keep_in_keras that named something here
        self.progress = progress or (lambda _msg: None)
        self.graph = Graph()
        self._constants: dict[tuple, tuple[torch.Tensor, Value]] = {}
        self._var_names = ka.variable_names(model)

    # -- constants ------------------------------------------------------------------------
    def constant(self, tensor: torch.Tensor, hint: str) -> Value:
        """The IR constant for ``tensor``; the same weight read twice (shared layers) is one value."""
        tensor = tensor.detach()
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.data_ptr() and key in self._constants:
            return self._constants[key][1]
        name = self._var_names.get(tensor.data_ptr(), hint) if tensor.numel() > 1 else hint
        value = self.graph.add_constant(name.replace("/", "."), tensor.to("cpu", copy=True))
        if tensor.data_ptr():
            # keep ``tensor`` alive so its address cannot be reused by another tensor
            self._constants[key] = (tensor, value)
        return value

    # -- the walk --------------------------------------------------------------------------
    def run(self, specs: Sequence[InputSpec]) -> Graph:
        gen = torch.Generator().manual_seed(0)
        traced = []
        for spec in specs:
            value = self.graph.add_input(spec.name, spec.shape, spec.dtype)
            example = example_tensor(spec.shape, spec.dtype, gen).to(ka.weights_device(self.model))
            traced.append(_Traced(value, example))
        with torch.no_grad():
            outputs = self._run_model(self.model, traced, prefix="")
        self.graph.outputs = [t.value for t in outputs]
        self.graph.remove_unused()
        self.graph.meta["kept_in_keras"] = sorted(self.kept)
        return self.graph

    def _run_model(self, model: Any, inputs: list[_Traced], prefix: str) -> list[_Traced]:
        if ka.is_graph_model(model):

            def call(op: Any, *args: Any, **kwargs: Any) -> Any:
                path = f"{prefix}{op.name}"
                if ka.is_graph_model(op) and not self._kept(op, path):
                    flat_in = [a for a in ka.flatten((args, kwargs)) if isinstance(a, _Traced)]
                    return self._run_model(op, flat_in, prefix=path + "/")
                return self._operation(op, args, kwargs, path)

            return ka.run_graph(model, inputs, call, release=_Traced.drop_example)
        result = self._operation(
            model, tuple(inputs) if len(inputs) > 1 else (inputs[0],), {}, prefix.rstrip("/")
        )
        return ka.flatten(result)

    def _kept(self, op: Any, path: str) -> bool:
        hits = {path, op.name, ka.layer_class_name(op)} & self.keep
        self.kept |= hits
        return bool(hits)

    def _operation(self, op: Any, args: tuple, kwargs: dict, path: str) -> Any:
        """Trace and lower one operation; fall back to Keras when that is impossible."""
        self.progress(path or op.name)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, _Traced)]
        inputs = [leaves[i] for i in slots]
        structures: list[Any] = []

        def fn(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            filled = list(leaves)
            for i, t in zip(slots, tensors):
                filled[i] = t
            call_args, call_kwargs = pytree.tree_unflatten(filled, spec)
            out = ka.call_operation(op, call_args, call_kwargs)
            flat = ka.flatten(out)
            structures.append(ka.pack_like(out, list(range(len(flat)))))
            return tuple(flat)

        if self._kept(op, path):
            reason = "kept in Keras by request (keep_in_keras)"
        else:
            try:
                functional = torch.func.functionalize(fn, remove="mutations")
                results: list[tuple[torch.Tensor, ...]] = []

                def run_and_keep(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
                    results.append(functional(*tensors))  # real tensors: tracing runs the layer
                    return results[-1]

                with _NoHostEscape(), ka.tag_sublayers(op):
                    gm = make_fx(run_and_keep)(*[t.example for t in inputs])
                examples = [t.detach() for t in results[-1]]  # the layer ran once, not twice
                mark = len(self.graph.nodes)
                lowering = AtenLowering(self.graph, path or op.name, self.constant)
                try:
                    values = lowering.lower(gm, [t.value for t in inputs])
                except Exception:
                    self._truncate(mark)
                    raise
                return ka.pack_like(structures[-1], [_Traced(v, e) for v, e in zip(values, examples)])
            except UnsupportedOp as exc:
                reason = f"no lowering: {exc}"
            except Exception as exc:  # tracing runs user code: any failure means fallback
                reason = f"could not be traced: {type(exc).__name__}: {_short(exc)}"
        log.info("%s falls back to Keras: %s", path or op.name, reason)
        outputs = fn(*[t.example for t in inputs])
        return self._fallback(op, path, leaves, spec, slots, inputs, outputs, structures[-1], reason)

    def _fallback(
        self,
        op: Any,
        path: str,
        leaves: list[Any],
        spec: pytree.TreeSpec,
        slots: list[int],
        inputs: list[_Traced],
        outputs: Sequence[torch.Tensor],
        structure: Any,
        reason: str,
    ) -> Any:
        """A keras_layer node that calls ``op`` with the same arguments at run time."""
        const_leaves = []
        for i, leaf in enumerate(leaves):
            if i in slots:
                const_leaves.append({"input": slots.index(i)})
            elif leaf is None or isinstance(leaf, (bool, int, float, str)):
                const_leaves.append({"const": leaf})
            else:
                raise ConversionError(
                    f"layer {path or op.name!r} cannot be converted: it {reason}, and its call "
                    f"argument of type {type(leaf).__name__} cannot be stored for the fallback"
                )
        call = {"spec": pytree.treespec_dumps(spec), "leaves": const_leaves}
        node = self.graph.add_node(
            "keras_layer",
            [t.value for t in inputs],
            {"layer": path, "reason": reason, "call": call},
            layer=path or op.name,
            output_types=[(tuple(o.shape), dtype_name(o.dtype)) for o in outputs],
            name=(path or op.name).replace("/", "."),
        )
        traced = [_Traced(v, o.detach()) for v, o in zip(node.outputs, outputs)]
        return ka.pack_like(structure, traced)

    def _truncate(self, mark: int) -> None:
        for node in self.graph.nodes[mark:]:
            for value in node.inputs:
                if node in value.users:
                    value.users.remove(node)
        del self.graph.nodes[mark:]


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def import_model(
    model: Any,
    specs: Sequence[InputSpec],
    keep_in_keras: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
) -> Graph:
    """The IR graph of ``model`` at the given concrete input shapes (torch backend only)."""
    if ka.backend_name() != "torch":
        raise ConversionError("import_model needs Keras's torch backend; use kerasrt.Converter")
    return Importer(model, keep_in_keras, progress).run(specs)
