"""The Python API, modelled on TF-TRT's TrtGraphConverterV2: convert, build, summary, save."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from kerasrt import errors
from kerasrt.errors import ConversionError
from kerasrt.frontend import keras_adapter as ka
from kerasrt.frontend.importer import InputSpec, import_model, resolve_input_specs
from kerasrt.ir.graph import Graph
from kerasrt.ir.graph import verify as verify_graph
from kerasrt.ir.ops import OPS
from kerasrt.passes import optimize
from kerasrt.passes.precision import LOW_PRECISION, lower_precision
from kerasrt.runtime.model import OptimizedModel
from kerasrt.runtime.program import KerasSource, Progress, ShapeKey, TensorSpec, with_batch
from kerasrt.settings import ConversionSettings
from kerasrt.tuning.tactics import Tuner


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


def build_graph(
    keras: KerasSource,
    specs: Sequence[InputSpec],
    settings: ConversionSettings,
    progress: Progress | None = None,
) -> Graph:
    """Import the model at ``specs`` (in this process on the torch backend, else in a child),
    then optimize it at ``settings.optimization_level``."""
    keep = settings.keep_in_keras
    if ka.backend_name() == "torch":
        graph = import_model(keras.get(), specs, keep, progress)
    else:
        graph = _import_in_subprocess(keras, specs, keep)
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
    if settings.precision_mode in LOW_PRECISION:
        lowered = lower_precision(graph, settings.precision_mode, settings.fp32_ops)
        graph.meta["precision"]["changes"] = dict(sorted(lowered.items()))
    verify_graph(graph)
    return graph


def _import_in_subprocess(keras: KerasSource, specs: Sequence[InputSpec], keep: Sequence[str]) -> Graph:
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


class Converter:
    """Convert a Keras model (live, .keras or .h5) into an OptimizedModel.

    Example::

        conv = kerasrt.Converter("model.keras", precision_mode="FP32")
        conv.convert(); conv.summary(); conv.save("model_krt")
    """

    def __init__(
        self,
        model: Any,
        precision_mode: str = "FP32",
        minimum_segment_size: int = 3,
        maximum_cached_engines: int = 1,
        allow_build_at_runtime: bool = True,
        *,
        input_shapes: Sequence[Sequence[int]] | None = None,
        batch_size: int = 1,
        keep_in_keras: Iterable[str] = (),
        optimization_level: int = 2,
        outputs: Sequence[str | int] | None = None,
        batch_profile: Sequence[int] | None = None,
        fp32_ops: Sequence[str] | None = None,
        compiler: str = "auto",
        cuda_graphs: bool = True,
        autotune: bool = False,
        conv_kernels: str = "auto",
        custom_objects: dict[str, Any] | None = None,
        device: str = "auto",
        progress: Progress | None = None,
        settings: ConversionSettings | None = None,
        tuner: Tuner | None = None,
    ):
        """``tuner``: how kernel candidates are found and timed (default: on the device); the
        settings' arguments follow TF-TRT's ``TrtGraphConverterV2``."""
        self.settings = settings or ConversionSettings(
            precision_mode=precision_mode,
            minimum_segment_size=minimum_segment_size,
            maximum_cached_engines=maximum_cached_engines,
            allow_build_at_runtime=allow_build_at_runtime,
            batch_size=batch_size,
            input_shapes=tuple(tuple(s) for s in input_shapes) if input_shapes is not None else None,
            keep_in_keras=tuple(keep_in_keras),
            optimization_level=optimization_level,
            outputs=tuple(str(o) for o in outputs) if outputs is not None else None,
            batch_profile=tuple(batch_profile) if batch_profile is not None else None,
            fp32_ops=tuple(fp32_ops) if fp32_ops is not None else None,
            compiler=compiler,
            cuda_graphs=cuda_graphs,
            autotune=autotune,
            conv_kernels=conv_kernels,
        )
        self.device = device
        self.progress = progress
        self.tuner = tuner
        if isinstance(model, (str, os.PathLike)):
            self.keras = KerasSource(path=Path(model), custom_objects=custom_objects)
        else:
            self.keras = KerasSource(model=ka.load_model(model))
        self._optimized: OptimizedModel | None = None

    def convert(self, calibration_input_fn: Callable[[], Iterable[Any]] | None = None) -> OptimizedModel:
        """Import, partition and build the model for its input shapes; returns the result."""
        if calibration_input_fn is not None:
            raise ConversionError("calibration_input_fn is for INT8, which this version does not build")
        model = self.keras.get()
        profile = self.settings.batch_profile
        shapes = self.settings.input_shapes
        if profile is not None and shapes is not None:  # the first engine is the profile's opt
            shapes = with_batch(shapes, profile[1])
        specs = resolve_input_specs(model, shapes, profile[1] if profile else self.settings.batch_size)
        graph = build_graph(self.keras, specs, self.settings, self.progress)
        declared = ka.input_specs(model)
        inputs = [
            TensorSpec(s.name, tuple(declared[i][0]) if declared else (None,) + tuple(s.shape[1:]), s.dtype)
            for i, s in enumerate(specs)
        ]
        key: ShapeKey = tuple(s.shape for s in specs)
        names = {s.name: s for s in specs}

        def builder(shapes: ShapeKey) -> Graph:
            new = [InputSpec(n, tuple(shape), names[n].dtype) for n, shape in zip(names, shapes)]
            return build_graph(self.keras, new, self.settings)

        self._optimized = OptimizedModel(
            {key: graph},
            self.settings,
            inputs,
            [ka.output_names(model)[i] for i in select_outputs(ka.output_names(model), self.settings.outputs)]
            if self.settings.outputs is not None
            else ka.output_names(model),
            self.keras,
            builder=builder,
            device=self.device,
            name=model.name,
            progress=self.progress,
            tuner=self.tuner,
        )
        self._optimized.program(key)
        if profile is not None:  # and the profile's max engine
            self._optimized.program(with_batch(key, profile[2]), build=True)
        return self._optimized

    @property
    def optimized(self) -> OptimizedModel:
        if self._optimized is None:
            raise ConversionError("call convert() first")
        return self._optimized

    def build(self, input_fn: Callable[[], Iterable[Any]]) -> None:
        """Build engines ahead of time for every input signature ``input_fn`` yields."""
        for inputs in input_fn():
            args = inputs if isinstance(inputs, (list, tuple)) else (inputs,)
            self.optimized.prebuild(*args)

    def summary(self, print_fn: Callable[[str], None] | None = print) -> str:
        """The conversion report (what runs in engines, what fell back and why)."""
        from kerasrt.report import format_report, make_report

        text = format_report(make_report(self.optimized))
        if print_fn is not None:
            print_fn(text)
        return text

    def save(
        self, output_dir: str | os.PathLike, compiled_engines: bool = True, keras_model: bool = True
    ) -> Path:
        """Write the artifact directory (atomically: nothing half-written on failure); with
        Inductor engines, also their ahead-of-time compiled packages (see ``artifact.save``)."""
        from kerasrt.runtime.artifact import save

        if compiled_engines and self.progress is not None and self.optimized._programs:
            self.progress("compiling engines ahead of time")
        return save(self.optimized, Path(output_dir), compiled_engines, keras_model)
