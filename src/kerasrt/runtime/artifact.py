"""The saved artifact: a directory with a JSON manifest, safetensors weights, and the original
model as a .keras file only where a layer runs in Keras (a fallback).

The manifest holds the source graphs (symbolic: they serve every input shape, and an engine
for a new shape is compiled from them without Keras) and each built engine's graph, kernel
choices included (the nodes' ``attrs["kernel_choice"]``, merged convolutions as their IR ops),
so a load times nothing. Loading parses JSON and safetensors only: nothing in the artifact is
executed, and the Keras model is loaded (in Keras safe mode unless asked otherwise) only if a
fallback layer needs it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kerasrt import __version__
from kerasrt.backend import aoti
from kerasrt.errors import ArtifactError
from kerasrt.frontend import keras_adapter as ka
from kerasrt.ir.serialize import graph_from_json, graph_to_json
from kerasrt.kernels import cudnn_conv
from kerasrt.runtime.model import OptimizedModel
from kerasrt.runtime.program import CompiledEngines, KerasSource, ShapeKey, TensorSpec, resolve_device
from kerasrt.settings import ConversionSettings
from kerasrt.tuning.tactics import Tuner

FORMAT = "kerasrt-artifact"
FORMAT_VERSION = 3
"""3: source graphs with symbolic sizes, the Keras model only for fallback layers; 2: kernel
choices live in the graphs (1 kept them beside, by signature)."""
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
KERAS_MODEL = "keras_model.keras"
CUDNN_PLANS = "cudnn_plans.json"


def _versions() -> dict[str, str]:
    keras = ka.keras_module()
    return {"kerasrt": __version__, "torch": torch.__version__, "keras": keras.__version__}


def needs_keras(model: OptimizedModel) -> list[str]:
    """The layers of ``model`` that run in Keras (fallback layers): the artifact must then
    hold the Keras model."""
    graphs = [*model.sources, *model.graphs.values()]
    return sorted({n.layer for g in graphs for n in g.nodes if n.op == "keras_layer"})


def save(
    model: OptimizedModel, output_dir: Path, compiled_engines: bool = True, keras_model: bool | None = None
) -> Path:
    """Write ``model`` to ``output_dir`` via a temporary sibling directory and a rename.

    With ``compiled_engines`` (and engines compiled by Inductor), every built engine is also
    compiled ahead of time (AOTInductor) into ``engines/``, keyed by GPU architecture and
    library versions, so ``load`` on a matching machine runs without compiling. The packages
    hold code only; the weights are stored once, in the safetensors file.

    ``keras_model``: store the original model (a second copy of the weights). By default
    (None) it is stored only where a layer runs in Keras or a source graph was imported at
    one concrete shape (``static_reason`` in its meta); ``True`` always stores it (an
    artifact that can import the model again for shapes its source graphs do not serve).
    A stored model with a Python lambda in it loads only with ``load(..., safe_mode=False)``:
    saving says so at once.
    """
    fallbacks = needs_keras(model)
    static = [g.meta["static_reason"] for g in model.sources if "static_reason" in g.meta]
    if keras_model is None:
        keras_model = bool(fallbacks or static or not model.sources)
    elif not keras_model and fallbacks:
        raise ArtifactError(
            f"layers {fallbacks} run in Keras, so the artifact needs the Keras model (keras_model=True)"
        )
    if keras_model and fallbacks and ka.has_lambda(model.keras.get()):
        warnings.warn(
            f"layers {fallbacks} run in Keras and the model holds a Lambda layer (Python code), which Keras "
            "loads only outside safe mode: load this artifact with kerasrt.load(path, safe_mode=False), "
            "and only if you trust it",
            stacklevel=2,
        )
    output_dir = Path(output_dir)
    if output_dir.exists() and not (output_dir / MANIFEST).exists():
        raise ArtifactError(f"{output_dir} exists and is not a kerasrt artifact; refusing to overwrite it")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    tmp.chmod(0o755)
    try:
        weights = _Weights()
        sources = [{"graph": weights.graph(graph)} for graph in model.sources]
        engines = []
        for key, graph in model.graphs.items():
            entry: dict[str, Any] = {"input_shapes": [list(s) for s in key], "graph": weights.graph(graph)}
            program = model._programs.get(key)
            if compiled_engines and program is not None and program.compiled_engines:
                folder = f"engines/{len(engines)}"
                files, tested = program.export_engines(tmp / folder)
                entry["compiled"] = {
                    "environment": aoti.engine_environment(model.device),
                    "files": {str(i): f"{folder}/{name}" for i, name in files.items()},
                    "tested": {str(i): digest for i, digest in tested.items()},
                }
                plans = program.cudnn_plans()
                if plans:  # JSON: cuDNN's own serialization (kernel binaries), no Python objects
                    document = {"cudnn": cudnn_conv.cudnn_version(), "plans": plans}
                    (tmp / folder / CUDNN_PLANS).write_text(json.dumps(document, sort_keys=True))
                    entry["compiled"]["cudnn_plans"] = f"{folder}/{CUDNN_PLANS}"
            engines.append(entry)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "versions": _versions(),
            "name": model.name,
            "settings": model.settings.to_json(),
            "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in model.inputs],
            "outputs": model.output_names,
            "sources": sources,
            "engines": engines,
            "keras_model": KERAS_MODEL if keras_model else None,
        }
        save_file(weights.tensors, str(tmp / WEIGHTS))
        if keras_model:
            _save_keras(model.keras, tmp / KERAS_MODEL)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if output_dir.exists():
            old = output_dir.with_name(output_dir.name + ".old")
            os.replace(output_dir, old)
            os.replace(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


class _Weights:
    """The tensors of the weights file, each stored once: a tensor seen before (the same
    memory, as engine graphs share their source's constants) or an identical one under the
    same name gets the key it was stored under."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._seen: dict[tuple, str] = {}
        self._alive: list[torch.Tensor] = []

    def graph(self, graph: Any) -> dict[str, Any]:
        """``graph`` as JSON, its constants stored here (each names its key); ``_graph`` on
        load is the inverse."""
        data, tensors = graph_to_json(graph)
        for spec in data["constants"]:
            spec["key"] = self.store(spec["name"], tensors[spec["name"]])
        return data

    def store(self, name: str, tensor: torch.Tensor) -> str:
        identity = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.data_ptr() and identity in self._seen:
            return self._seen[identity]
        key, n = name, 0
        while key in self.tensors:
            stored = self.tensors[key]
            if stored.shape == tensor.shape and stored.dtype == tensor.dtype and torch.equal(stored, tensor):
                return key
            n += 1
            key = f"{name}#{n}"
        self.tensors[key] = tensor.contiguous().clone()  # safetensors refuses shared memory
        if tensor.data_ptr():
            self._seen[identity] = key
            self._alive.append(tensor)  # its address must not be reused while saving
        return key


def _save_keras(keras: KerasSource, path: Path) -> None:
    source = keras.path
    if source is not None and Path(source).suffix.lower() == ".keras" and keras._model is None:
        shutil.copyfile(source, path)
    else:
        ka.save_model(keras.get(), path)


def _read_manifest(root: Path) -> dict[str, Any]:
    """The artifact's manifest, checked to be one this kerasrt reads."""
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a kerasrt artifact directory (it does not exist or is a file)")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{root} has no {MANIFEST}: not a kerasrt artifact") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{root / MANIFEST} is corrupt: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{root} is not a kerasrt artifact (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{root} has artifact format version {manifest.get('format_version')}; "
            f"this kerasrt reads version {FORMAT_VERSION}"
        )
    return manifest


def saved_engines(path: str | os.PathLike) -> tuple[str, list[ShapeKey]]:
    """(precision mode, input shapes of each saved engine) of the artifact at ``path``, from
    its manifest alone: whether it serves a shape, without loading its weights."""
    manifest = _read_manifest(Path(path))
    precision = ConversionSettings.from_json(manifest["settings"]).precision_mode
    return precision, [tuple(tuple(s) for s in e["input_shapes"]) for e in manifest["engines"]]


def load(
    path: str | os.PathLike,
    device: str = "auto",
    custom_objects: dict[str, Any] | None = None,
    compiled_engines: bool = True,
    tuner: Tuner | None = None,
    safe_mode: bool = True,
) -> OptimizedModel:
    """Load an artifact saved by ``Converter.save``. Parses JSON and safetensors only (Keras
    is not imported unless a layer runs in it); the compiled engine packages (native code)
    are used when ``compiled_engines`` and built for this machine, else the engines are
    compiled again from the graph, with its kernel choices where they were made for this
    environment (else timed again by ``tuner``). A shape with no saved engine is compiled
    from the source graphs. ``safe_mode=False``: let Keras load a stored model's Python
    lambdas (only for artifacts you trust)."""
    root = Path(path)
    manifest = _read_manifest(root)
    try:
        # copies: safetensors hands out unaligned views, and CPU kernels then sum in another
        # order, so a loaded model would not give bit-identical outputs
        weights = {k: v.clone() for k, v in load_file(str(root / WEIGHTS)).items()}
    except FileNotFoundError:
        raise ArtifactError(f"{root} has no {WEIGHTS}") from None
    except Exception as exc:
        raise ArtifactError(f"{root / WEIGHTS} is corrupt: {exc}") from None
    settings = ConversionSettings.from_json(manifest["settings"])
    target = resolve_device(device)
    here: dict[str, str] | None = None  # what compiled engines must have been built for
    graphs = {}
    packages: dict[Any, CompiledEngines] = {}
    sources = [_graph(root, entry["graph"], weights) for entry in manifest.get("sources", [])]
    for engine in manifest["engines"]:
        key = tuple(tuple(s) for s in engine["input_shapes"])
        graphs[key] = _graph(root, engine["graph"], weights)
        compiled = engine.get("compiled") if compiled_engines else None
        if compiled:
            here = here or aoti.engine_environment(target)
            if compiled.get("environment") == here:
                for digest in compiled.get("tested", {}).values():
                    aoti.vouch(str(digest), target)
                packages[key] = CompiledEngines(
                    {int(i): _inside(root, rel) for i, rel in compiled["files"].items()},
                    _cudnn_plans(root, compiled),
                )
            else:
                warnings.warn(
                    f"{root}: the compiled engines for input shapes {engine['input_shapes']} were built for "
                    f"{compiled.get('environment')}, this machine is {here}; they will be recompiled",
                    stacklevel=2,
                )
    inputs = [TensorSpec(s["name"], tuple(s["shape"]), s["dtype"]) for s in manifest["inputs"]]
    keras_path = root / manifest["keras_model"] if manifest.get("keras_model") else None
    if keras_path is not None and not keras_path.is_file():
        raise ArtifactError(f"{root} lists {manifest['keras_model']} but the file is missing")
    keras = KerasSource(path=keras_path, custom_objects=custom_objects, safe_mode=safe_mode)
    return OptimizedModel(
        graphs,
        settings,
        inputs,
        manifest.get("outputs", []),
        keras,
        sources=sources,
        device=target,
        name=manifest.get("name", root.name),
        packages=packages,
        tuner=tuner,
    )


def _graph(root: Path, data: dict[str, Any], weights: dict[str, torch.Tensor]) -> Any:
    tensors = {}
    for spec in data["constants"]:
        if spec.get("key") not in weights:
            raise ArtifactError(f"weight {spec.get('key')!r} is missing from {root / WEIGHTS}")
        tensors[spec["name"]] = weights[spec["key"]]
    return graph_from_json(data, tensors)


def _inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing paths that leave the artifact directory."""
    path = (root / relative).resolve()
    if root.resolve() not in path.parents or not path.is_file():
        raise ArtifactError(f"{root}: compiled engine file {relative!r} is missing or outside the artifact")
    return path


def _cudnn_plans(root: Path, compiled: dict[str, Any]) -> list[dict[str, Any]]:
    """The cuDNN plans saved with compiled engines, if saved by this machine's cuDNN version
    (with another, the engines build their plans at the first call)."""
    relative = compiled.get("cudnn_plans")
    if not relative:
        return []
    path = _inside(root, relative)
    try:
        document = json.loads(path.read_text())
        version, plans = document["cudnn"], document["plans"]
        if not all(isinstance(p, dict) and {"key", "plan", "uids", "blob"} <= p.keys() for p in plans):
            raise ValueError("a plan lacks its key, index, uids or blob")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{path} is corrupt: {exc}") from None
    return plans if version == cudnn_conv.cudnn_version() else []
