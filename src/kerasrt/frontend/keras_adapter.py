"""The one module that touches Keras internals (Keras changes its private API often).

It loads models, reads their input signatures, walks functional graphs node by node, finds
operations by path, and calls a single operation in inference mode.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kerasrt.errors import ConversionError, ModelLoadError, UnknownLayerError

ModelSource = Any  # a keras.Model or a path to a .keras / .h5 file


def keras_module() -> Any:
    """Import Keras, defaulting its backend to torch when the process has not chosen one."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    return keras


def backend_name() -> str:
    return keras_module().backend.backend()


def load_model(
    source: ModelSource, custom_objects: dict[str, Any] | None = None, safe_mode: bool = True
) -> Any:
    """A keras.Model from a live model or a .keras/.h5 file, with errors that name the problem;
    ``safe_mode=False`` lets Keras load Python lambdas (code) from a .keras file."""
    keras = keras_module()
    if isinstance(source, keras.Model):
        return source
    if isinstance(source, keras.layers.Layer):
        raise ModelLoadError(f"{type(source).__name__} is a layer, not a model; wrap it in a keras.Model")
    if not isinstance(source, (str, os.PathLike)):
        raise ModelLoadError(f"expected a keras.Model or a model file path, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist")
    if path.is_dir():
        raise ModelLoadError(
            f"{path} is a directory; kerasrt reads .keras and .h5 files "
            "(TensorFlow SavedModel directories are not supported)"
        )
    suffix = path.suffix.lower()
    if suffix == ".keras":
        if not zipfile.is_zipfile(path):
            raise ModelLoadError(
                f"{path} is not a valid .keras file (not a zip archive: truncated or corrupt?)"
            )
    elif suffix in (".h5", ".hdf5"):
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89HDF\r\n\x1a\n":
                raise ModelLoadError(f"{path} is not a valid HDF5 file (truncated or corrupt?)")
    else:
        raise ModelLoadError(f"{path}: unknown model format {suffix!r}; expected .keras or .h5")
    try:
        model = keras.saving.load_model(
            path, custom_objects=custom_objects, compile=False, safe_mode=safe_mode
        )
    except Exception as exc:
        message = str(exc)
        if safe_mode and "safe_mode" in message:
            raise ModelLoadError(
                f"{path} holds a Python lambda (a Lambda layer), which Keras loads only outside safe mode; "
                "if you trust the file, load it with safe_mode=False (kerasrt.load(path, safe_mode=False))"
            ) from None
        if "Could not locate class" in message or "Unknown layer" in message:
            raise UnknownLayerError(
                f"{path} uses a custom layer or object Keras does not know: "
                f"{_first_line(message)}. Pass it in custom_objects (CLI: --custom-objects module.py)"
            ) from None
        raise ModelLoadError(f"could not load {path} as a Keras model: {_first_line(message)}") from None
    if not isinstance(model, keras.Model):
        raise ModelLoadError(f"{path} holds a {type(model).__name__}, not a Keras model")
    return model


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0][:400] if message.strip() else "unknown error"


def save_model(model: Any, path: Path) -> None:
    model.save(path)


def is_graph_model(op: Any) -> bool:
    """True for Functional models and built Sequential models (they have a layer graph)."""
    keras = keras_module()
    if isinstance(op, keras.Sequential):
        return getattr(op, "_functional", None) is not None
    return isinstance(op, keras.Model) and hasattr(op, "_nodes_by_depth")


def has_lambda(model: Any) -> bool:
    """Whether ``model`` holds a Lambda layer (Python code, which safe mode refuses to load)."""
    lambda_layer = keras_module().layers.Lambda
    return any(isinstance(layer, lambda_layer) for layer in model._flatten_layers(include_self=False))


def is_layer(op: Any) -> bool:
    return isinstance(op, keras_module().layers.Layer)


def _graph_of(model: Any) -> Any:
    keras = keras_module()
    return model._functional if isinstance(model, keras.Sequential) else model


def input_specs(model: Any) -> list[tuple[tuple[int | None, ...], str]]:
    """(shape with None for unknown dims, dtype) of each model input, or [] if unknown."""
    try:
        inputs = _graph_of(model).inputs if is_graph_model(model) else model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if inputs:
        return [(tuple(x.shape), str(x.dtype)) for x in inputs]
    return _built_input_specs(model)


def _built_input_specs(model: Any) -> list[tuple[tuple[int | None, ...], str]]:
    """A subclassed model's inputs as Keras recorded them when the model was built (its first
    call, or ``build``): the batch dimension is left unknown."""
    try:
        config = model.get_build_config() or {}
    except Exception:
        return []
    shape = config.get("input_shape")
    if isinstance(shape, dict) or shape is None:
        return []
    shapes = [shape] if not shape or not isinstance(shape[0], (list, tuple)) else list(shape)
    if not all(isinstance(s, (list, tuple)) and s for s in shapes):
        return []
    dtype = str(getattr(model, "input_dtype", None) or "float32")
    return [((None, *tuple(s)[1:]), dtype) for s in shapes]


def output_names(model: Any) -> list[str]:
    try:
        return list(model.output_names)
    except (AttributeError, ValueError):
        return []


def run_graph(
    model: Any, inputs: Sequence[Any], call: Callable[..., Any], release: Callable[[Any], None] | None = None
) -> list[Any]:
    """Walk a functional graph, computing each node with ``call(op, *args, **kwargs)``.

    Returns the flat list of model outputs. The values flowing through can be any objects.
    ``release(value)`` is called on a value computed in this graph once every node that reads
    it has run (never on graph inputs or outputs, nor on values of layers used twice here),
    so the caller can drop what it holds (Keras keeps every value until the walk ends).
    """
    from keras import tree

    graph = _graph_of(model)
    wrapped = call
    if release is not None:
        nodes = [
            n for group in graph._nodes_by_depth.values() for n in group if n.operation and not n.is_input
        ]
        by_operation: dict[int, list[Any]] = {}
        for node in nodes:
            by_operation.setdefault(id(node.operation), []).append(node)
        uses = Counter(id(x) for node in nodes for x in node.input_tensors)
        for x in graph.outputs:
            uses[id(x)] += 1  # never released
        owned: dict[int, Any] = {}

        def wrapped(op: Any, *args: Any, **kwargs: Any) -> Any:
            result = call(op, *args, **kwargs)
            candidates = by_operation.get(id(op), [])
            if len(candidates) == 1:  # the node that just ran (a shared layer: unknown, skip)
                (node,) = candidates
                passed_through = {id(a) for a in tree.flatten((args, kwargs))}  # e.g. an identity
                owned.update(
                    (id(x), y)
                    for x, y in zip(node.outputs, tree.flatten(result))
                    if id(y) not in passed_through
                )
                for x in node.input_tensors:
                    uses[id(x)] -= 1
                    if uses[id(x)] == 0 and id(x) in owned:
                        release(owned.pop(id(x)))
            return result

    outputs = graph._run_through_graph(list(inputs), call_fn=wrapped)
    return tree.flatten(outputs)


def call_operation(op: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """Call one layer or keras.ops operation in inference mode."""
    if is_layer(op) and "training" not in kwargs and getattr(op, "_call_has_training_arg", False):
        kwargs = {**kwargs, "training": False}
    return op(*args, **kwargs)


def flatten(structure: Any) -> list[Any]:
    from keras import tree

    return tree.flatten(structure)


def pack_like(structure: Any, flat: Sequence[Any]) -> Any:
    from keras import tree

    return tree.pack_sequence_as(structure, list(flat))


def sublayers(op: Any) -> list[Any]:
    """The operations directly inside a model (functional operations or tracked layers)."""
    if is_graph_model(op):
        return [o for o in _graph_of(op).operations if type(o).__name__ != "InputLayer"]
    return list(getattr(op, "layers", []))


def find_operation(model: Any, path: str) -> Any:
    """The operation at ``path`` ("outer/inner/layer", below ``model``); ``model`` for ''."""
    op = model
    for part in [p for p in path.split("/") if p]:
        matches = [o for o in sublayers(op) if o.name == part]
        if not matches:
            raise ConversionError(f"layer {path!r} not found in model {model.name!r}")
        op = matches[0]
    return op


def variable_names(model: Any) -> dict[int, str]:
    """Map each weight's storage pointer to its Keras path, to name IR constants."""
    names: dict[int, str] = {}
    for variable in model.weights:
        value = getattr(variable, "value", None)
        if hasattr(value, "data_ptr"):
            names.setdefault(value.data_ptr(), variable.path)
    return names


def custom_classes(model: Any) -> list[tuple[str, str, str]]:
    """(module, qualified name, registered name) of every non-Keras class in ``model``.

    Lets a child process import the same classes to load the model file.
    """
    found: dict[type, None] = {}
    for layer in [model, *model._flatten_layers(include_self=False)]:
        cls = type(layer)
        if not cls.__module__.startswith("keras"):
            found[cls] = None
    keras = keras_module()
    return [
        (cls.__module__, cls.__qualname__, keras.saving.get_registered_name(cls))
        for cls in found
        if "<locals>" not in cls.__qualname__
    ]


def import_classes(specs: Sequence[Sequence[str]]) -> dict[str, Any]:
    """custom_objects for the classes named by ``custom_classes`` (importing their modules)."""
    import importlib

    objects: dict[str, Any] = {}
    for module_name, qualname, registered in specs:
        try:
            obj: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            continue  # loading will then name the missing class
        objects[registered] = obj
        objects[qualname.split(".")[-1]] = obj
    return objects


def weights_device(model: Any) -> Any:
    """The torch device holding the model's weights (Keras's default device if it has none)."""
    for variable in model.weights:
        device = getattr(getattr(variable, "value", None), "device", None)
        if device is not None:
            return device
    from keras.src.backend.torch.core import get_device

    return get_device()


def layer_class_name(op: Any) -> str:
    return type(op).__name__


SUBLAYER_META = "keras_layer"


@contextlib.contextmanager
def tag_sublayers(op: Any) -> Iterator[None]:
    """While tracing ``op``, label traced nodes with the sublayer ("block/dense") that made them.

    Each sublayer's ``call`` is wrapped (on the instance, undone afterwards) to set
    ``node.meta["custom"][SUBLAYER_META]`` through torch.fx's preserved node metadata.
    """
    import torch.fx.traceback as fx_traceback

    wrapped: list[Any] = []

    def wrap(layer: Any, path: str) -> None:
        original = layer.call

        def call(*args: Any, **kwargs: Any) -> Any:
            meta = fx_traceback.current_meta
            previous = meta.get("custom")
            meta["custom"] = {SUBLAYER_META: path}
            try:
                return original(*args, **kwargs)
            finally:
                if previous is None:
                    meta.pop("custom", None)
                else:
                    meta["custom"] = previous

        layer.call = call
        wrapped.append(layer)
        for child in layer._flatten_layers(include_self=False, recursive=False):
            wrap(child, f"{path}/{child.name}")

    for child in getattr(op, "_flatten_layers", lambda **_: [])(include_self=False, recursive=False):
        wrap(child, child.name)
    try:
        with fx_traceback.preserve_node_meta():
            yield
    finally:
        for layer in wrapped:
            vars(layer).pop("call", None)


def call_inputs(model: Any, flat: Sequence[Any]) -> Any:
    """``flat`` (one array per model input, in ``model.inputs`` order) in the structure the
    model's ``call`` takes: the single input itself, a list, or the dict a model declared
    with named inputs (keras_hub backbones) requires."""
    structure = getattr(model, "_inputs_struct", None)
    if isinstance(structure, dict):
        return pack_like(structure, flat)
    return flat[0] if len(flat) == 1 else list(flat)
