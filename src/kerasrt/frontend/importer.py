"""Keras model -> IR graph.

Functional and Sequential models are walked node by node; each layer or keras.ops call is
traced on Keras's torch backend (``make_fx``) and lowered from ATen into IR nodes tagged with
the layer's name. Nested functional models are walked recursively. Subclassed models and
custom layers have no graph and are traced whole. A layer that will not trace or lower
becomes a ``keras_layer`` fallback node with the reason.

An input shape may hold symbols (``"s0"``): then every layer is traced once, symbolically,
on fake tensors whose sizes are symbolic integers of one ``ShapeEnv`` shared by the whole
walk, and the graph's sizes are expressions over those symbols (``kerasrt.ir.symbolic``):
one import serves every input shape. With numbers only, layers are traced on real tensors.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from kerasrt.errors import ConversionError, SymbolicImportError
from kerasrt.frontend import keras_adapter as ka
from kerasrt.frontend.aten import AtenLowering, UnsupportedOp
from kerasrt.ir import symbolic
from kerasrt.ir.graph import Graph, Value, dtype_name, torch_dtype
from kerasrt.ir.specialize import GUARDS, SYMBOLS
from kerasrt.ir.symbolic import Dim

log = logging.getLogger(__name__)


class _TraceMode(TorchFunctionMode):
    """What tracing a layer needs from the torch functions it calls.

    - Refuse code that reads tensor values on the host (``.numpy()``, ``bool(x)``,
      ``.item()``...): a trace would silently bake the example input's values into constants.
    - Keep linear resizes to a given size as their ATen op: in a symbolic trace PyTorch's
      Python decompositions (registered at its Autograd key) would spell
      ``upsample_bilinear2d`` out as index arithmetic on symbolic sizes; the op is called
      below Autograd (inference only, so nothing is lost).
    """

    _RESIZES = {
        "linear": torch.ops.aten.upsample_linear1d.default,
        "bilinear": torch.ops.aten.upsample_bilinear2d.default,
        "trilinear": torch.ops.aten.upsample_trilinear3d.default,
    }

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
        if func is torch.nn.functional.interpolate:
            call = inspect.signature(func).bind(*args, **(kwargs or {}))
            a = {**{k: p.default for k, p in inspect.signature(func).parameters.items()}, **call.arguments}
            resize = self._RESIZES.get(a["mode"])
            if resize is not None and a["size"] is not None and not a["antialias"]:
                x, size = a["input"], a["size"]
                size = list(size) if isinstance(size, (list, tuple)) else [size] * (x.dim() - 2)
                with torch._C._AutoDispatchBelowAutograd():  # below its Autograd decomposition
                    return resize(x, size, bool(a["align_corners"]))
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
    """A model input: name, shape (batch included; a symbol names a size known only at run
    time) and dtype."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str


@dataclass(frozen=True)
class ModelInputs:
    """What the importer needs to know of a model's inputs.

    ``specs``: each input with a symbol for each size known only at run time (the batch
    always, and every dimension the model declares unknown); ``hints``: a size for each
    symbol to trace with (the user's where given); ``example``: the concrete input shapes to
    build the first engine for, when every size is known (else engines are built lazily).
    """

    specs: list[InputSpec]
    hints: dict[str, int]
    example: tuple[tuple[int, ...], ...] | None


def model_inputs(model: Any, input_shapes: Sequence[Sequence[int]] | None, batch_size: int) -> ModelInputs:
    """The inputs of ``model``, from its declaration (or, for a subclassed model, the shapes
    Keras recorded when it was built) and the user's ``input_shapes``.

    A symbol stands for one dimension position: the batch (``s0``) is shared by every input;
    another unknown dimension is shared by the inputs that have it at the same position with
    the same given size (a text model's token ids and padding mask share their sequence
    length). Give two inputs different sizes in ``input_shapes`` to keep them apart.
    """
    declared = ka.input_specs(model)
    names = input_names(model)
    if input_shapes is None and not declared:
        raise ConversionError(
            f"model {model.name!r} declares no input shape and Keras recorded none (a subclassed "
            "model that was never built or called?): call it once on data, or pass input_shapes "
            "(CLI: --input-shape 1,224,224,3)"
        )
    if input_shapes is not None:
        if declared and len(input_shapes) != len(declared):
            raise ConversionError(
                f"model has {len(declared)} inputs but {len(input_shapes)} input shapes were given"
            )
        for i, shape in enumerate(input_shapes):
            if any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in shape):
                raise ConversionError(f"input shape {tuple(shape)} must be positive integers")
            if declared:
                want = declared[i][0]
                ok = len(want) == len(shape) and all(w is None or w == s for w, s in zip(want, shape))
                if not ok:
                    raise ConversionError(f"input shape {tuple(shape)} does not fit the model's input {want}")
        dtypes = [d for _, d in declared] or ["float32"] * len(input_shapes)
        template = [tuple(d[0]) for d in declared] or [(None, *s[1:]) for s in input_shapes]
        given: list[tuple[int | None, ...]] = [tuple(s) for s in input_shapes]
    else:
        dtypes = [d for _, d in declared]
        template = [tuple(d[0]) for d in declared]
        given = [(batch_size, *shape[1:]) for shape, _ in declared]
    if len(names) != len(template):
        names = [f"input_{i}" for i in range(len(template))]
    symbols: dict[tuple[int, int | None], str] = {}
    hints: dict[str, int] = {}
    specs = []
    for name, want, have, dtype in zip(names, template, given, dtypes):
        if not want:
            raise ConversionError(f"input {name!r} is a scalar; kerasrt needs a batch dimension")
        shape: list[Dim] = []
        for d, (w, h) in enumerate(zip(want, have)):
            if d > 0 and w is not None:
                shape.append(int(w))
                continue
            key = (0, None) if d == 0 else (d, h)
            if key not in symbols:
                symbols[key] = f"s{len(symbols)}"
                if h is not None:
                    hints[symbols[key]] = h
            shape.append(symbols[key])
        specs.append(InputSpec(name, tuple(shape), dtype))
    example = None
    if all(d is not None for shape in given for d in shape):
        example = tuple(tuple(int(d) for d in shape) for shape in given)
    return ModelInputs(specs, symbolic.hints(symbols.values(), hints), example)


def _model_inputs(model: Any) -> list[Any]:
    try:
        return list(model.inputs or [])
    except (AttributeError, ValueError):
        return []


def input_names(model: Any) -> list[str]:
    """The names of the model's declared inputs, in order ([] for a subclassed model)."""
    return [getattr(x, "name", f"input_{i}") for i, x in enumerate(_model_inputs(model))]


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
        self.shapes: symbolic.SymbolicShapes | None = None  # set for a symbolic import

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
    def run(self, specs: Sequence[InputSpec], hints: dict[str, int] | None = None) -> Graph:
        """The graph of the model called on inputs of ``specs``; ``hints``: a size for each
        symbol to trace with (the rest: ``symbolic.hints``)."""
        gen = torch.Generator().manual_seed(0)
        names = {d for spec in specs for d in spec.shape if isinstance(d, str)}
        device = ka.weights_device(self.model)
        if names:
            self.shapes = symbolic.SymbolicShapes(symbolic.hints(names, hints))
            self.graph.meta[SYMBOLS] = {}
        traced = []
        for i, spec in enumerate(specs):
            value = self.graph.add_input(spec.name, spec.shape, spec.dtype)
            if self.shapes is not None:
                for d, dim in enumerate(spec.shape):
                    if isinstance(dim, str):
                        self.graph.meta[SYMBOLS].setdefault(dim, {"input": i, "dim": d})
                with self.shapes.mode():
                    example = torch.empty(
                        self.shapes.sizes(spec.shape), dtype=torch_dtype(spec.dtype), device=device
                    )
            else:
                example = example_tensor(spec.shape, spec.dtype, gen).to(device)
            traced.append(_Traced(value, example))
        with torch.no_grad():
            outputs = self._run_model(self.model, traced, prefix="")
        self.graph.outputs = [t.value for t in outputs]
        self.graph.remove_unused()
        self.graph.meta["kept_in_keras"] = sorted(self.kept)
        if self.shapes is not None:
            # a symbol that the traced code fixed to its hint: the graph serves that size only
            fixed = [f"{name} == {self.shapes.hints[name]}" for name in self.shapes.specialized()]
            self.graph.meta[GUARDS] = fixed + self.shapes.guards()
        return self.graph

    def _dim(self, size: Any) -> Dim:
        return self.shapes.dim(size) if self.shapes is not None else int(size)

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

                mode = "symbolic" if self.shapes is not None else "real"
                with _TraceMode(), ka.tag_sublayers(op):
                    gm = make_fx(run_and_keep, tracing_mode=mode)(*[t.example for t in inputs])
                examples = [t.detach() for t in results[-1]]  # the layer ran once, not twice
                mark = len(self.graph.nodes)
                lowering = AtenLowering(self.graph, path or op.name, self.constant, self._dim)
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
        outputs = self._run_fallback(fn, inputs, path or op.name, reason)
        return self._fallback(op, path, leaves, spec, slots, inputs, outputs, structures[-1], reason)

    def _run_fallback(self, fn: Callable, inputs: list[_Traced], name: str, reason: str) -> tuple:
        """The outputs of a layer that falls back (on fake tensors in a symbolic import, for
        the sizes of its outputs)."""
        if self.shapes is None:
            return fn(*[t.example for t in inputs])
        try:
            with self.shapes.mode():
                return fn(*[t.example for t in inputs])
        except Exception as exc:
            raise SymbolicImportError(
                f"layer {name!r} runs in Keras ({reason}), and Keras cannot run it on inputs of "
                f"unknown size to find the sizes of its outputs ({type(exc).__name__}: {_short(exc)})"
            ) from None

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
            output_types=[(tuple(self._dim(d) for d in o.shape), dtype_name(o.dtype)) for o in outputs],
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
    hints: dict[str, int] | None = None,
) -> Graph:
    """The IR graph of ``model`` for inputs of ``specs`` (torch backend only): symbolic
    where the specs hold symbols, traced at ``hints``."""
    if ka.backend_name() != "torch":
        raise ConversionError("import_model needs Keras's torch backend; use kerasrt.Converter")
    return Importer(model, keep_in_keras, progress).run(specs, hints)
