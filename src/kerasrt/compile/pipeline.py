"""The compile pipeline, device-independent: a Keras model imported once into a symbolic
source graph (in this process on Keras's torch backend, else in a child process), and that
graph compiled for concrete input shapes: specialized, optimized at the settings' level and
lowered to their precision. Partitioning into engine segments (``partition``) follows when a
program is built for a device.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from kerasrt import errors
from kerasrt.errors import ConversionError, InputSignatureError, SymbolicImportError
from kerasrt.frontend import keras_adapter as ka
from kerasrt.frontend.importer import InputSpec, ModelInputs, import_model
from kerasrt.ir.graph import Graph
from kerasrt.ir.graph import verify as verify_graph
from kerasrt.ir.ops import OPS
from kerasrt.ir.specialize import bind, broken_guard, specialize
from kerasrt.passes import optimize
from kerasrt.passes.precision import LOW_PRECISION, lower_precision
from kerasrt.passes.quantize import CALIBRATION, QUANTIZATION, quantize_graph
from kerasrt.runtime.program import KerasSource, Progress
from kerasrt.settings import ConversionSettings

log = logging.getLogger(__name__)


def select_outputs(names: Sequence[str], wanted: Sequence[str]) -> list[int]:
    """Indices of the requested model outputs (by name, or by position as a number)."""
    indices = []
    for item in wanted:
        if item in names:
            indices.append(list(names).index(item))
        elif str(item).isdigit() and int(item) < max(len(names), 1):
            indices.append(int(item))
        else:
            raise ConversionError(f"model has no output {item!r}; its outputs are {list(names)}")
    return indices


def import_graph(
    keras: KerasSource,
    inputs: ModelInputs,
    settings: ConversionSettings,
    progress: Progress | None = None,
) -> Graph:
    """The model's source graph: imported once, symbolically (``inputs.specs`` name the sizes
    known only at run time), verified, with the requested outputs. Engines for concrete
    shapes are compiled from it by ``compile_graph``, without Keras.

    A model whose layers need concrete sizes to trace (``SymbolicImportError``) is imported
    at ``inputs.example`` instead, when that is known: a static graph, which serves that one
    shape (other shapes import the model again)."""
    try:
        graph = _import(keras, inputs.specs, settings, progress, inputs.hints)
    except SymbolicImportError as exc:
        if inputs.example is None:
            raise
        log.warning("importing at the concrete shapes %s: %s", list(inputs.example), exc)
        specs = [InputSpec(s.name, shape, s.dtype) for s, shape in zip(inputs.specs, inputs.example)]
        graph = _import(keras, specs, settings, progress)
        graph.meta["static_reason"] = str(exc)
    return graph


def _import(
    keras: KerasSource,
    specs: Sequence[InputSpec],
    settings: ConversionSettings,
    progress: Progress | None = None,
    hints: dict[str, int] | None = None,
) -> Graph:
    keep = settings.keep_in_keras
    if ka.backend_name() == "torch":
        graph = import_model(keras.get(), specs, keep, progress, hints)
    else:
        graph = _import_in_subprocess(keras, specs, keep, hints)
    verify_graph(graph)
    # an entry that names no layer may name an IR op type, kept out of engines by the runtime
    unmatched = set(keep) - set(graph.meta.pop("kept_in_keras", ()))
    graph.meta["kept_op_types"] = sorted(unmatched & set(OPS))
    unknown = unmatched - set(OPS)
    if unknown:
        raise ConversionError(
            f"keep_in_keras names no layer, layer path, layer class or op type of the model: {sorted(unknown)}"
        )
    if settings.outputs is not None:
        names = ka.output_names(keras.get())
        graph.outputs = [graph.outputs[i] for i in select_outputs(names, settings.outputs)]
        graph.remove_unused()
    return graph


def serves(source: Graph, shapes: Sequence[Sequence[int]]) -> str | None:
    """Why ``source`` cannot compute the model at input ``shapes`` (None where it can): the
    shapes do not fit its inputs, or break an assumption its trace made (a guard)."""
    try:
        bindings = bind(source, shapes)
    except InputSignatureError as exc:
        return str(exc)
    guard = broken_guard(source, bindings)
    return None if guard is None else f"the model's trace assumed {guard}"


def compile_graph(
    source: Graph,
    shapes: Sequence[Sequence[int]],
    settings: ConversionSettings,
    progress: Progress | None = None,
) -> Graph:
    """The engine graph for input ``shapes``: ``source`` made concrete (``specialize``),
    optimized at ``settings.optimization_level`` and lowered to their precision."""
    reason = serves(source, shapes)
    if reason is not None:
        raise ConversionError(
            f"the source graph does not serve input shapes {[list(s) for s in shapes]}: {reason}"
        )
    return _optimize(specialize(source, bind(source, shapes)), settings, progress)


def _optimize(graph: Graph, settings: ConversionSettings, progress: Progress | None) -> Graph:
    if progress is not None:
        progress("optimizing")
    # KERASRT_CHECK_PASSES=1 (set by the test suite) verifies the graph after every pass
    result = optimize(graph, settings.optimization_level, check=os.environ.get("KERASRT_CHECK_PASSES") == "1")
    graph.meta["optimization"] = {
        "level": settings.optimization_level,
        "nodes_before": result.nodes_before,
        "nodes_after": result.nodes_after,
        "rules": dict(sorted(result.counts.items())),
    }
    base = "FP16" if settings.quantized else settings.precision_mode  # what quantization leaves
    if base in LOW_PRECISION:
        lowered = lower_precision(graph, base, settings.fp32_ops)
        graph.meta["precision"]["changes"] = dict(sorted(lowered.items()))
    if settings.quantized:
        calibration = graph.meta.get(CALIBRATION)
        if calibration is None or calibration["mode"] != settings.precision_mode:
            raise ConversionError(
                f"precision_mode {settings.precision_mode} needs the model calibrated for it "
                "(Converter.convert(calibration_input_fn=...))"
            )
        quantized = quantize_graph(graph, calibration)
        graph.meta[QUANTIZATION]["changes"] = dict(sorted(quantized.items()))
    verify_graph(graph)
    return graph


def compile_symbolic(source: Graph, settings: ConversionSettings, progress: Progress | None = None) -> Graph:
    """The engine graph for every shape ``source`` serves: a copy of it optimized and lowered
    to the settings' precision with its sizes still symbolic (``use_dynamic_shape``)."""
    from kerasrt.ir.serialize import graph_from_json, graph_to_json

    data, tensors = graph_to_json(source)
    graph = graph_from_json(json.loads(json.dumps(data)), tensors)  # a copy; tensors shared
    return _optimize(graph, settings, progress)


def build_graph(
    keras: KerasSource,
    specs: Sequence[InputSpec],
    settings: ConversionSettings,
    progress: Progress | None = None,
) -> Graph:
    """Import the model at concrete ``specs`` and compile it for them (a static graph; tools
    that look at one shape use this)."""
    source = _import(keras, specs, settings, progress)
    return compile_graph(source, [s.shape for s in specs], settings, progress)


def _import_in_subprocess(
    keras: KerasSource, specs: Sequence[InputSpec], keep: Sequence[str], hints: dict[str, int] | None
) -> Graph:
    from safetensors.torch import load_file

    from kerasrt.ir.serialize import graph_from_json

    with tempfile.TemporaryDirectory(prefix="kerasrt-import-") as tmp:
        model_path = keras.path
        if model_path is None or Path(model_path).suffix.lower() != ".keras":
            model_path = os.path.join(tmp, "model.keras")
            ka.save_model(keras.get(), Path(model_path))
        classes = ka.custom_classes(keras.get())
        request = {
            "model": str(model_path),
            "classes": classes,
            "sys_path": [p for p in sys.path if p],
            "specs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in specs],
            "keep": list(keep),
            "hints": hints or {},
            "out": tmp,
        }
        request_path = os.path.join(tmp, "request.json")
        with open(request_path, "w") as fh:
            json.dump(request, fh)
        env = {**os.environ, "KERAS_BACKEND": "torch"}
        proc = subprocess.run(
            [sys.executable, "-m", "kerasrt.frontend.worker", request_path],
            env=env,
            capture_output=True,
            text=True,
        )
        error_path = os.path.join(tmp, "error.json")
        if os.path.exists(error_path):
            with open(error_path) as fh:
                err = json.load(fh)
            raise getattr(errors, err["type"], ConversionError)(err["message"])
        if proc.returncode != 0:
            raise ConversionError(f"importing on the torch backend failed:\n{proc.stderr[-2000:]}")
        with open(os.path.join(tmp, "graph.json")) as fh:
            data = json.load(fh)
        return graph_from_json(data, load_file(os.path.join(tmp, "weights.safetensors")))
