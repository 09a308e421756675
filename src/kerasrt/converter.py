"""The Python API, modelled on TF-TRT's TrtGraphConverterV2: convert, build, summary, save."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kerasrt.compile.pipeline import import_graph, select_outputs
from kerasrt.errors import ConversionError
from kerasrt.frontend import keras_adapter as ka
from kerasrt.frontend.importer import input_names, model_inputs
from kerasrt.runtime.model import OptimizedModel
from kerasrt.runtime.program import KerasSource, Progress, TensorSpec, with_batch
from kerasrt.settings import ConversionSettings
from kerasrt.tuning.tactics import Tuner


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
        input_shapes: Sequence[Sequence[int]] | Mapping[str, Sequence[int]] | None = None,
        batch_size: int = 1,
        keep_in_keras: Iterable[str] = (),
        optimization_level: int = 2,
        outputs: Sequence[str | int] | None = None,
        batch_profile: Sequence[int] | None = None,
        shape_profile: Sequence[Sequence[Sequence[int]]] | None = None,
        fp32_ops: Sequence[str] | None = None,
        compiler: str = "auto",
        cuda_graphs: bool = True,
        autotune: bool = False,
        conv_kernels: str = "auto",
        exclude_kernels: Iterable[str] = (),
        calibrator: str | None = None,
        max_accuracy_drop: float | None = None,
        use_dynamic_shape: bool = False,
        hot_shape_calls: int = 0,
        custom_objects: dict[str, Any] | None = None,
        device: str = "auto",
        progress: Progress | None = None,
        settings: ConversionSettings | None = None,
        tuner: Tuner | None = None,
    ):
        """``tuner``: how kernel candidates are found and timed (default: on the device); the
        settings' arguments follow TF-TRT's ``TrtGraphConverterV2``. ``input_shapes``: one
        shape per model input, in order, or a dict of them by input name (keras_hub's
        ``token_ids``, ``padding_mask``...)."""
        self.onnx_path: Path | None = None
        if isinstance(model, (str, os.PathLike)) and str(model).lower().endswith(".onnx"):
            self.onnx_path = Path(model)  # imported at convert(); nothing runs in Keras
            self.keras = KerasSource()
        elif isinstance(model, (str, os.PathLike)):
            self.keras = KerasSource(path=Path(model), custom_objects=custom_objects)
        else:
            self.keras = KerasSource(model=ka.load_model(model))
        if isinstance(input_shapes, Mapping):
            input_shapes = shapes_by_position(self.keras.get(), input_shapes)
        self.settings = settings or ConversionSettings(
            precision_mode=precision_mode,
            minimum_segment_size=minimum_segment_size,
            maximum_cached_engines=maximum_cached_engines,
            allow_build_at_runtime=allow_build_at_runtime,
            batch_size=batch_size,
            input_shapes=input_shapes,
            keep_in_keras=tuple(keep_in_keras),
            optimization_level=optimization_level,
            outputs=tuple(str(o) for o in outputs) if outputs is not None else None,
            batch_profile=tuple(batch_profile) if batch_profile is not None else None,
            shape_profile=shape_profile,
            fp32_ops=tuple(fp32_ops) if fp32_ops is not None else None,
            compiler=compiler,
            cuda_graphs=cuda_graphs,
            autotune=autotune,
            conv_kernels=conv_kernels,
            exclude_kernels=tuple(exclude_kernels),
            calibrator=calibrator,
            max_accuracy_drop=max_accuracy_drop,
            use_dynamic_shape=use_dynamic_shape,
            hot_shape_calls=hot_shape_calls,
        )
        self.device = device
        self.progress = progress
        self.tuner = tuner
        self._optimized: OptimizedModel | None = None

    def convert(
        self,
        calibration_input_fn: Callable[[], Iterable[Any]] | None = None,
        eval_fn: Callable[[OptimizedModel], float] | None = None,
    ) -> OptimizedModel:
        """Import the model (once, with symbolic sizes) and build the engine for its input
        shapes where they are all known; else engines are built lazily, at the first call or
        by ``build(input_fn)``, as TF-TRT's dynamic mode does.

        INT8/FP8 (``precision_mode``): ``calibration_input_fn`` yields batches of the model's
        inputs (as TF-TRT's), on which every quantized layer's input range is calibrated; with
        ``max_accuracy_drop``, ``eval_fn(model) -> float`` (higher is better, e.g. top-1 accuracy
        on validation data) judges the accuracy search, else agreement with FP32 on the
        calibration data does (``kerasrt.quantization``)."""
        mode = self.settings.precision_mode
        if calibration_input_fn is not None and not self.settings.quantized:
            raise ConversionError(f"calibration_input_fn is for precision_mode INT8 or FP8, not {mode}")
        if self.settings.quantized and calibration_input_fn is None:
            raise ConversionError(
                f"precision_mode {mode} needs calibration data: convert(calibration_input_fn=fn), "
                "fn yielding batches of the model's inputs (a few hundred samples of real data)"
            )
        if eval_fn is not None and self.settings.max_accuracy_drop is None:
            raise ConversionError("eval_fn judges the accuracy search: give max_accuracy_drop too")
        profile = self.settings.batch_profile
        if self.onnx_path is not None:
            source, specs, names, example, name = self._import_onnx()
        else:
            source, specs, names, example, name = self._import_keras()
        self._optimized = OptimizedModel(
            {},
            self.settings,
            specs,
            names,
            self.keras,
            sources=[source],
            device=self.device,
            name=name,
            progress=self.progress,
            tuner=self.tuner,
        )
        if calibration_input_fn is not None:
            from kerasrt.quantization.calibrate import calibrate_model

            calibrate_model(self._optimized, source, calibration_input_fn, eval_fn)
        if example is not None:
            self._optimized.program(example, build=True)
            if profile is not None:  # and the profile's max engine
                self._optimized.program(with_batch(example, profile[2]), build=True)
        elif self.progress is not None:
            self.progress("input sizes unknown: engines are built at the first call (or by build(input_fn))")
        return self._optimized

    @property
    def input_names(self) -> list[str]:
        """The model's input names, in order (before conversion too)."""
        if self.onnx_path is not None:
            import onnx

            graph = onnx.load(str(self.onnx_path), load_external_data=False).graph
            weights = {i.name for i in graph.initializer}
            return [i.name for i in graph.input if i.name not in weights]
        return input_names(self.keras.get())

    def _import_keras(self) -> tuple[Any, list[TensorSpec], list[str], Any, str]:
        """(source graph, input specs, output names, first engine's shapes or None, name)."""
        model = self.keras.get()
        profile = self.settings.batch_profile
        shapes = self.settings.input_shapes
        if profile is not None and shapes is not None:  # the first engine is the profile's opt
            shapes = with_batch(shapes, profile[1])
        if self.settings.shape_profile is not None:
            low, shapes, high = self.settings.shape_profile  # traced and first built at opt
            for bound in (low, high):
                model_inputs(model, bound, 1)  # each fits the model's inputs (else a clear error)
        inputs = model_inputs(model, shapes, profile[1] if profile else self.settings.batch_size)
        source = import_graph(self.keras, inputs, self.settings, self.progress)
        names = ka.output_names(model)
        if self.settings.outputs is not None:
            names = [names[i] for i in select_outputs(names, self.settings.outputs)]
        specs = [
            TensorSpec(s.name, tuple(d if isinstance(d, int) else None for d in s.shape), s.dtype)
            for s in inputs.specs
        ]
        return source, specs, names, inputs.example, model.name

    def _import_onnx(self) -> tuple[Any, list[TensorSpec], list[str], Any, str]:
        """The ONNX model imported at its input shapes (``input_shapes``/``batch_size`` fill
        symbolic ones): a static source graph, whose engines serve those shapes."""
        from kerasrt.frontend.onnx_import import import_onnx
        from kerasrt.ir.graph import verify

        if self.settings.batch_profile is not None or self.settings.shape_profile is not None:
            raise ConversionError(
                "an ONNX model is imported at one shape: batch and shape profiles need a Keras model"
            )
        source, names = import_onnx(self.onnx_path, self.settings.input_shapes, self.settings.batch_size)
        verify(source)
        if self.settings.outputs is not None:
            keep = select_outputs(names, self.settings.outputs)
            source.outputs = [source.outputs[i] for i in keep]
            names = [names[i] for i in keep]
            source.remove_unused()
        specs = [TensorSpec(v.name, tuple(int(d) for d in v.shape), v.dtype) for v in source.inputs]
        return (
            source,
            specs,
            names,
            tuple(tuple(int(d) for d in v.shape) for v in source.inputs),
            self.onnx_path.stem,
        )

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
        self, output_dir: str | os.PathLike, compiled_engines: bool = True, keras_model: bool | None = None
    ) -> Path:
        """Write the artifact directory (atomically: nothing half-written on failure); with
        Inductor engines, also their ahead-of-time compiled packages (see ``artifact.save``)."""
        from kerasrt.runtime.artifact import save

        if compiled_engines and self.progress is not None and self.optimized._programs:
            self.progress("compiling engines ahead of time")
        return save(self.optimized, Path(output_dir), compiled_engines, keras_model)


def shapes_by_position(model: Any, shapes: Mapping[str, Sequence[int]]) -> list[Sequence[int]]:
    """``shapes`` given by input name, in the order of the model's inputs; a clear error for a
    name the model lacks or an input left out."""
    names = input_names(model)
    unknown = sorted(set(shapes) - set(names))
    missing = [n for n in names if n not in shapes]
    if not names or unknown or missing:
        problem = f"no input named {unknown}" if unknown else f"no shape for {missing}"
        raise ConversionError(
            f"input_shapes by name: the model has {problem}; its inputs are {names or 'not named'}"
            + ("" if names else " (give input_shapes as a list, one shape per input)")
        )
    return [shapes[n] for n in names]
