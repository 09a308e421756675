"""Calibration: run the model in FP32 on calibration batches, observe the input of every site
the placement rules may quantize (``kerasrt.passes.quantize``), choose each one's range with
the settings' calibrator, and store the result in the source graph (``CALIBRATION`` in its
meta), where every engine built from it, at any shape, and the saved artifact find it.

The observed graph is the optimized one (BatchNormalization folded into the convolutions,
activations fused), so a range is that of the tensor the quantized kernel reads. The
programs run op by op (no compile, no kernel tuning): calibration runs each batch once.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from kerasrt.backend.torch_backend import precision_scope
from kerasrt.errors import ConversionError, InputSignatureError
from kerasrt.ir.graph import Graph
from kerasrt.passes.quantize import CALIBRATION, QUANTIZED_DTYPES, sites
from kerasrt.quantization.calibrators import RangeObserver, calibrate_amax
from kerasrt.runtime.model import OptimizedModel
from kerasrt.runtime.program import Program
from kerasrt.settings import ConversionSettings

Batch = list[torch.Tensor]


class CalibrationError(ConversionError):
    """The calibration data cannot calibrate the model (empty, wrongly shaped, NaN/Inf), or
    the model has nothing to quantize."""


def evaluation_settings(settings: ConversionSettings, precision: str | None = None) -> ConversionSettings:
    """``settings`` for programs that only compute values (calibration, the accuracy search):
    op by op, no CUDA graph, no kernel tuning; at ``precision`` where given."""
    changes: dict[str, Any] = {"compiler": "eager", "cuda_graphs": False, "conv_kernels": "inductor"}
    changes["maximum_cached_engines"] = max(settings.maximum_cached_engines, 4)
    changes["allow_build_at_runtime"] = True
    if precision is not None:
        changes.update(precision_mode=precision, calibrator=None, max_accuracy_drop=None)
    return dataclasses.replace(settings, **changes)


def collect_batches(
    model: OptimizedModel, input_fn: Callable[[], Iterable[Any]] | Iterable[Any]
) -> list[Batch]:
    """The batches ``input_fn`` yields (each the model's inputs: an array, a list of arrays or
    a dict by input name), checked and on the model's device; a clear error for none, a
    wrongly shaped one, or one holding NaN or Inf."""
    items = input_fn() if callable(input_fn) else input_fn
    batches: list[Batch] = []
    try:
        iterator = iter(items)
    except TypeError:
        raise CalibrationError(
            "calibration_input_fn must be a function that yields batches of the model's inputs "
            f"(or an iterable of them), got {type(items).__name__}"
        ) from None
    for index, item in enumerate(iterator):
        args = tuple(item) if isinstance(item, (list, tuple)) else (item,)
        try:
            tensors = model.as_inputs(*args)
        except InputSignatureError as exc:
            raise CalibrationError(f"calibration batch {index}: {exc}") from None
        for spec, tensor in zip(model.inputs, tensors):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CalibrationError(f"calibration batch {index}: input {spec.name!r} holds NaN or Inf")
        batches.append(tensors)
    if not batches:
        raise CalibrationError("calibration_input_fn yielded no batches: calibration needs data")
    return batches


@dataclasses.dataclass
class Calibration:
    """The result: the source graph's calibration entry, and the FP32 outputs of every
    batch (the reference of the accuracy search)."""

    entry: dict[str, Any]
    references: list[list[torch.Tensor]]


def calibrate(
    model: OptimizedModel,
    source: Graph,
    batches: Sequence[Batch],
    progress: Callable[[str], None] | None = None,
) -> Calibration:
    """Observe ``batches`` through ``source`` in FP32 and choose every site's range."""
    settings = model.settings
    dtype = QUANTIZED_DTYPES[settings.precision_mode]
    observing = evaluation_settings(settings, "FP32")
    programs: dict[tuple, tuple[Program, list[str], int]] = {}
    observers: dict[str, RangeObserver] = {}
    references: list[list[torch.Tensor]] = []
    samples = 0
    for index, batch in enumerate(batches):
        key = tuple(tuple(t.shape) for t in batch)
        if key not in programs:
            programs[key] = _observing_program(model, source, key, observing)
        program, keys, count = programs[key]
        with torch.inference_mode(), precision_scope(model.device, "FP32"):
            outputs = program(batch)
        references.append([o.detach() for o in outputs[:count]])
        for site_key, value in zip(keys, outputs[count:]):
            observers.setdefault(site_key, RangeObserver()).update(value)
        samples += batch[0].shape[0] if batch and batch[0].dim() else 1
        if progress is not None:
            progress(f"calibrating: batch {index + 1}/{len(batches)}")
    amax = {k: calibrate_amax(o, settings.calibrator, dtype) for k, o in observers.items()}
    entry = {
        "mode": settings.precision_mode,
        "dtype": dtype,
        "calibrator": settings.calibrator,
        "amax": amax,
        "observed_max": {k: o.amax for k, o in observers.items()},
        "keep": {},
        "data": {"batches": len(batches), "samples": samples},
    }
    return Calibration(entry, references)


def _observing_program(
    model: OptimizedModel, source: Graph, key: tuple, settings: ConversionSettings
) -> tuple[Program, list[str], int]:
    """An FP32 program for input shapes ``key`` that also outputs the data input of every
    site that can quantize: (program, their site keys, the model's output count)."""
    from kerasrt.compile.pipeline import compile_graph

    graph = compile_graph(source, key, settings)
    found = sites(graph)
    watched = [s for s in found if s.excluded is None]
    if not watched:
        reasons = sorted({s.excluded for s in found if s.excluded})
        raise CalibrationError(
            f"precision_mode {model.settings.precision_mode}: the model has nothing to quantize (no "
            "convolution or dense layer with a constant weight"
            + (f"; {'; '.join(reasons)}" if reasons else "")
            + "): convert it in FP16"
        )
    count = len(graph.outputs)
    graph.outputs = [*graph.outputs, *(s.node.inputs[0] for s in watched)]
    return Program(graph, settings, model.device, model.keras), [s.key for s in watched], count


def with_calibration(source: Graph, entry: dict[str, Any]) -> Graph:
    """A view of ``source`` (nodes and weights shared, nothing copied) whose calibration entry
    is ``entry``: what the accuracy search compiles its variants from."""
    view = copy.copy(source)
    view.meta = {**source.meta, CALIBRATION: entry}
    return view


def calibrate_model(
    model: OptimizedModel,
    source: Graph,
    input_fn: Callable[[], Iterable[Any]] | Iterable[Any],
    eval_fn: Callable[[OptimizedModel], float] | None = None,
) -> dict[str, Any]:
    """Calibrate ``model`` (converted at an INT8/FP8 precision) on the batches ``input_fn``
    yields, run the accuracy search where ``max_accuracy_drop`` asks for it, and store the
    result in ``source``'s meta. Returns the calibration entry."""
    from kerasrt.quantization.accuracy import agreement, search

    progress = model.progress
    batches = collect_batches(model, input_fn)
    result = calibrate(model, source, batches, progress)
    entry = result.entry
    budget = model.settings.max_accuracy_drop
    if budget is not None:
        judging = evaluation_settings(model.settings)

        def metric(keep: dict[str, str]) -> float:
            variant = OptimizedModel(
                {},
                judging,
                model.inputs,
                model.output_names,
                model.keras,
                sources=[with_calibration(source, {**entry, "keep": keep})],
                device=model.device,
                name=model.name,
            )
            if eval_fn is not None:
                return float(eval_fn(variant))
            outputs = []
            for batch in batches:
                out = variant(*batch)
                outputs.append(list(out) if isinstance(out, (list, tuple)) else [out])
            return agreement(outputs, result.references)

        keep, record = search(metric, list(entry["amax"]), budget, progress)
        entry["keep"] = keep
        entry["search"] = {
            **record,
            "metric": "eval_fn" if eval_fn is not None else "top-1 agreement with FP32",
        }
    source.meta[CALIBRATION] = entry
    return entry
