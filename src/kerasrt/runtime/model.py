"""A converted model: call it like the Keras model it came from.

``OptimizedModel`` keeps up to ``maximum_cached_engines`` programs, one per input shape (least
recently used evicted). An input shape with no program is built at run time when allowed
(``allow_build_at_runtime``), or refused with EngineNotBuiltError. It is compiled from a
source graph that serves the shape (``compile.pipeline.serves``), without Keras; only where
no source graph does (a trace assumed something these sizes break, or the model imported
at one concrete shape) is the Keras model imported again, traced at these sizes.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kerasrt.backend.torch_backend import precision_scope
from kerasrt.errors import EngineNotBuiltError, InputSignatureError
from kerasrt.ir.graph import Graph, torch_dtype
from kerasrt.runtime.program import (
    CompiledEngines,
    KerasSource,
    Program,
    Progress,
    ShapeKey,
    TensorSpec,
    resolve_device,
    with_batch,
)
from kerasrt.settings import ConversionSettings
from kerasrt.tuning.tactics import Tuner

log = logging.getLogger(__name__)


class OptimizedModel:
    """A converted model: call it with numpy arrays (numpy out) or torch tensors (torch out)."""

    def __init__(
        self,
        graphs: dict[ShapeKey, Graph],
        settings: ConversionSettings,
        inputs: Sequence[TensorSpec],
        output_names: Sequence[str],
        keras: KerasSource,
        sources: Sequence[Graph] = (),
        device: str | torch.device = "auto",
        name: str = "model",
        packages: dict[ShapeKey, CompiledEngines] | None = None,
        progress: Progress | None = None,
        tuner: Tuner | None = None,
    ):
        """``graphs``: engine graphs already compiled, by input shapes; ``sources``: the source
        graphs new shapes are compiled from (``compile.pipeline``); ``tuner``: how kernel
        candidates are timed when a program is built (default: on the model's device)."""
        self.device = resolve_device(device)
        self.progress = progress  # told of engine builds (tactics can take minutes)
        self.settings = settings
        self.inputs = list(inputs)
        self.output_names = list(output_names)
        self.keras = keras
        self.sources = list(sources)
        self.name = name
        self.graphs: OrderedDict[ShapeKey, Graph] = OrderedDict(graphs)
        self._programs: OrderedDict[ShapeKey, Program] = OrderedDict()
        self.packages = dict(packages or {})  # ahead-of-time compiled engines, by input shapes
        self.tuner = tuner
        self._dynamic: dict[int, Program] = {}  # use_dynamic_shape: a program per source graph
        self._calls: Counter[ShapeKey] = Counter()  # calls per shape on a dynamic program
        self.shape_choices: dict[ShapeKey, dict[str, Any]] = {}
        """Hot shapes (``hot_shape_calls``): the static and dynamic engines' times, and the pick."""

    # -- engines -----------------------------------------------------------------------
    def program(self, key: ShapeKey, build: bool = False) -> Program:
        """The program for input shapes ``key``, built (and cached, LRU) on first use; a
        shape never seen needs ``allow_build_at_runtime`` or ``build=True`` (ahead of time)."""
        program = self._programs.get(key)
        if program is not None:
            self._programs.move_to_end(key)
            if key in self.graphs:  # (a dynamic program has no graph per shape)
                self.graphs.move_to_end(key)
            return program
        self._check_sizes(key)
        build = build or self.settings.in_profile(key)  # a profile's shapes are always served
        if self.settings.use_dynamic_shape:
            program = self._dynamic_program(key, build)
            if program is None and self.keras.available and (self.settings.allow_build_at_runtime or build):
                self._import_again(key)  # a source that serves key, then its dynamic program
                program = self._dynamic_program(key, build)
            if program is not None:
                self._programs[key] = program
                self._evict_beyond(self._programs)
                return program
        graph = self.graphs.get(key)
        if graph is None:
            if not (self.settings.allow_build_at_runtime or build):
                known = ", ".join(str(list(map(list, k))) for k in self.graphs) or "none"
                raise EngineNotBuiltError(
                    f"no engine for input shapes {[list(s) for s in key]} (built: {known}) and "
                    "allow_build_at_runtime is False" + _outside(self.settings)
                )
            log.info("building an engine for input shapes %s", key)
            graph = self._compile(key)
            self.graphs[key] = graph
        if self.progress is not None:
            self.progress(f"building the engines for input shapes {', '.join(_fmt(s) for s in key)}")
        program = Program(
            graph, self.settings, self.device, self.keras, self.packages.get(key), self.progress, self.tuner
        )
        self._programs[key] = program
        self.graphs.move_to_end(key)
        self._evict_beyond(self.graphs)
        return program

    def _evict_beyond(self, table: OrderedDict) -> None:
        """Drop the least recently used engines of ``table`` (``graphs`` for static engines,
        ``_programs`` under ``use_dynamic_shape``) beyond ``maximum_cached_engines``, with
        their graph, program and package."""
        while len(table) > self.settings.maximum_cached_engines:
            old, _ = table.popitem(last=False)
            self.graphs.pop(old, None)
            self._programs.pop(old, None)
            self.packages.pop(old, None)
            log.info("evicted the engine for input shapes %s", old)

    def _check_sizes(self, key: ShapeKey) -> None:
        """Refuse inputs whose sizes disagree where the model shares a symbol between them (a
        shared sequence length), before any engine is built or the model imported again."""
        from kerasrt.ir.specialize import bind, is_symbolic

        source = next((s for s in self.sources if is_symbolic(s)), None)
        if source is not None:
            bind(source, key)

    def _dynamic_program(self, key: ShapeKey, build: bool) -> Program | None:
        """The program compiled once with symbolic sizes (``use_dynamic_shape``) from the first
        source graph that serves ``key``; None where none does (a static engine is built).
        It serves every shape, except, under a shape profile without build at runtime, those
        outside the profile (as TF-TRT's dynamic mode refuses them)."""
        from kerasrt.compile.pipeline import compile_symbolic, serves
        from kerasrt.ir.specialize import is_symbolic

        if self.settings.shape_profile is not None and not (self.settings.allow_build_at_runtime or build):
            raise EngineNotBuiltError(
                f"input shapes {[list(s) for s in key]} are outside the shape profile and "
                "allow_build_at_runtime is False" + _outside(self.settings)
            )
        for index, source in enumerate(self.sources):
            if not is_symbolic(source) or serves(source, key) is not None:
                continue
            program = self._dynamic.get(index)
            if program is None:
                if not (self.settings.allow_build_at_runtime or build):
                    raise EngineNotBuiltError(
                        f"no engine for input shapes {[list(s) for s in key]} and allow_build_at_runtime is False"
                        + _outside(self.settings)
                    )
                if self.progress is not None:
                    self.progress("building the engines for every input shape (symbolic sizes)")
                graph = compile_symbolic(source, self.settings, self.progress)
                program = Program(
                    graph, self.settings, self.device, self.keras, None, self.progress, self.tuner
                )
                self._dynamic[index] = program
            return program
        return None

    def _compile(self, key: ShapeKey) -> Graph:
        """The engine graph for input shapes ``key``, from the first source graph that serves
        them; else from the Keras model, imported again at these sizes (a new source)."""
        from kerasrt.compile.pipeline import compile_graph, serves

        reasons = []
        for source in self.sources:
            reason = serves(source, key)
            if reason is None:
                return compile_graph(source, key, self.settings, self.progress)
            reasons.append(reason)
        if not self.keras.available:
            why = "; ".join(reasons) or "the artifact holds no source graph"
            raise EngineNotBuiltError(
                f"cannot build an engine for input shapes {[list(s) for s in key]}: {why}; the "
                "original Keras model, needed to import the model again at these sizes, is not available"
            )
        return compile_graph(self._import_again(key), key, self.settings, self.progress)

    def _import_again(self, key: ShapeKey) -> Graph:
        """A new source graph, from the Keras model traced at sizes ``key``."""
        from kerasrt.compile.pipeline import import_graph
        from kerasrt.frontend.importer import model_inputs

        if self.progress is not None:
            self.progress("importing the model again at input shapes " + ", ".join(_fmt(s) for s in key))
        inputs = model_inputs(self.keras.get(), key, key[0][0] if key and key[0] else 1)
        source = import_graph(self.keras, inputs, self.settings, self.progress)
        self.sources.append(source)
        return source

    @property
    def engine_shapes(self) -> list[ShapeKey]:
        """The input shapes with an engine: a static engine's, or the shapes a dynamic program
        (``use_dynamic_shape``) ran at most recently."""
        if self.settings.use_dynamic_shape:
            return list(dict.fromkeys([*self.graphs, *self._programs]))
        return list(self.graphs)

    def primary_graph(self) -> Graph:
        if self.settings.use_dynamic_shape and self._programs:
            return next(reversed(self._programs.values())).graph
        return next(reversed(self.graphs.values()))

    # -- inference -----------------------------------------------------------------------
    def _prepare(self, args: tuple) -> tuple[list[torch.Tensor], bool, torch.device | None]:
        if len(args) == 1 and isinstance(args[0], dict):
            missing = [s.name for s in self.inputs if s.name not in args[0]]
            if missing:
                raise InputSignatureError(
                    f"missing inputs {missing}; expected {[s.name for s in self.inputs]}"
                )
            args = tuple(args[0][s.name] for s in self.inputs)
        elif len(args) == 1 and isinstance(args[0], (list, tuple)) and len(self.inputs) > 1:
            args = tuple(args[0])
        if len(args) != len(self.inputs):
            raise InputSignatureError(
                f"model {self.name!r} takes {len(self.inputs)} input(s), got {len(args)}"
            )
        as_torch = all(isinstance(a, torch.Tensor) for a in args)
        out_device = args[0].device if as_torch and args else None
        tensors = []
        for spec, arg in zip(self.inputs, args):
            tensors.append(self._check_input(spec, arg))
        return tensors, as_torch, out_device

    def _check_input(self, spec: TensorSpec, arg: Any) -> torch.Tensor:
        if isinstance(arg, torch.Tensor):
            tensor = arg
        else:
            try:
                array = np.asarray(arg)
            except Exception as exc:
                raise InputSignatureError(f"input {spec.name!r} is not an array: {exc}") from None
            if array.dtype == object:
                raise InputSignatureError(f"input {spec.name!r} is not a numeric array")
            tensor = torch.from_numpy(np.ascontiguousarray(array))
        want = torch_dtype(spec.dtype)
        if tensor.dim() != len(spec.shape):
            raise InputSignatureError(
                f"input {spec.name!r} must have rank {len(spec.shape)} (shape {_fmt(spec.shape)}), "
                f"got shape {tuple(tensor.shape)}"
            )
        for got, expected in zip(tensor.shape, spec.shape):
            if expected is not None and got != expected:
                raise InputSignatureError(
                    f"input {spec.name!r} must have shape {_fmt(spec.shape)}, got {tuple(tensor.shape)}"
                )
        if tensor.dtype != want:
            if tensor.dtype.is_floating_point != want.is_floating_point or (tensor.dtype == torch.bool) != (
                want == torch.bool
            ):
                raise InputSignatureError(
                    f"input {spec.name!r} must be {spec.dtype}, got {str(tensor.dtype).replace('torch.', '')}"
                )
            tensor = tensor.to(want)
        return tensor.to(self.device)

    def as_inputs(self, *args: Any) -> list[torch.Tensor]:
        """The input tensors a call with ``args`` runs on: checked against the model's inputs
        (count, rank, sizes, dtype; InputSignatureError names what is wrong), on its device."""
        return self._prepare(args)[0]

    def profile_batch(self, batch: int) -> int:
        """The engine batch size that serves ``batch`` under ``settings.batch_profile``."""
        low, opt, high = self.settings.batch_profile
        if not low <= batch <= high:
            raise InputSignatureError(f"batch size {batch} is outside the batch profile [{low}, {high}]")
        return opt if batch <= opt else high

    def _engine_key(self, tensors: Sequence[torch.Tensor]) -> tuple[ShapeKey, int, int]:
        """(the engine's input shapes, the inputs' batch, the engine's batch): under a batch
        profile the engine batch is the profile's opt or max, else the inputs' own."""
        key = tuple(tuple(t.shape) for t in tensors)
        batch = tensors[0].shape[0] if tensors and tensors[0].dim() else 0
        if self.settings.batch_profile is None or not batch:
            return key, batch, batch
        padded = self.profile_batch(batch)
        return with_batch(key, padded), batch, padded

    def prebuild(self, *args: Any) -> None:
        """Build (ahead of time) the engine that inputs like ``args`` will run on."""
        tensors, _, _ = self._prepare(args)
        self.program(self._engine_key(tensors)[0], build=True)

    def __call__(self, *args: Any) -> Any:
        tensors, as_torch, out_device = self._prepare(args)
        key, batch, padded = self._engine_key(tensors)
        if padded != batch:  # repeat the last row: real data, so no NaN/overflow surprises
            tensors = [torch.cat([t, t[-1:].expand(padded - batch, *t.shape[1:])]) for t in tensors]
        program = self.program(key)
        if program.dynamic and self.settings.hot_shape_calls:
            self._calls[key] += 1
            if self._calls[key] == self.settings.hot_shape_calls:
                program = self._settle(key, program, tensors)
        outputs = self._run(program, tensors)
        if padded != batch:
            outputs = [o[:batch] if o.dim() and o.shape[0] == padded else o for o in outputs]
        if as_torch:
            outputs = [o.to(out_device) for o in outputs]
        else:
            outputs = [o.detach().cpu().numpy() for o in outputs]
        return outputs[0] if len(outputs) == 1 else outputs

    def _run(self, program: Program, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():  # (the captured buffers are inference tensors)
            if program.captured:  # a CUDA graph replay: the math modes no longer matter
                return program(tensors)
            with precision_scope(self.device, self.settings.precision_mode):
                return program(tensors)

    def _settle(self, key: ShapeKey, dynamic: Program, tensors: Sequence[torch.Tensor]) -> Program:
        """A hot shape: build its static engine, time it against the dynamic one on these
        inputs, and keep the faster for this shape (``shape_choices`` records both)."""
        from kerasrt.compile.pipeline import compile_graph, serves

        source = next(s for s in self.sources if serves(s, key) is None)
        if self.progress is not None:
            self.progress(
                f"timing a static engine for the hot input shapes {', '.join(_fmt(s) for s in key)}"
            )
        graph = compile_graph(source, key, self.settings, self.progress)
        static = Program(graph, self.settings, self.device, self.keras, None, self.progress, self.tuner)
        times = {name: self._time(p, tensors) for name, p in (("dynamic", dynamic), ("static", static))}
        chosen = "static" if times["static"] < times["dynamic"] else "dynamic"
        self.shape_choices[key] = {
            "dynamic_ms": times["dynamic"],
            "static_ms": times["static"],
            "chosen": chosen,
        }
        log.info("input shapes %s: %s engine (%s)", key, chosen, times)
        if chosen == "dynamic":
            return dynamic
        self._programs[key] = static
        self.graphs[key] = graph
        return static

    def _time(self, program: Program, tensors: Sequence[torch.Tensor], runs: int = 5) -> float:
        """Median milliseconds of ``program`` on ``tensors`` after two warm-up calls."""
        import time

        samples = []
        for i in range(runs + 2):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            begin = time.perf_counter()
            self._run(program, tensors)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if i >= 2:
                samples.append((time.perf_counter() - begin) * 1e3)
        return float(np.median(samples))

    def predict(self, x: Any, batch_size: int | None = None) -> Any:
        """Keras-style predict: numpy in and out, in batches of ``batch_size``.

        The last partial batch is padded to ``batch_size`` (and the padding dropped), so one
        static-shape engine serves the whole data set.
        """
        if batch_size is None:
            return self(x)
        xs = [np.asarray(a) for a in (x if isinstance(x, (list, tuple)) else [x])]
        n = len(xs[0])
        parts = []
        for i in range(0, n, batch_size):
            chunk = [a[i : i + batch_size] for a in xs]
            short = batch_size - len(chunk[0])
            if short:
                chunk = [np.concatenate([c, np.repeat(c[-1:], short, axis=0)]) for c in chunk]
            result = self(*chunk)
            result = result if isinstance(result, list) else [result]
            parts.append([r[: batch_size - short] for r in result])
        merged = [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]
        return merged[0] if len(merged) == 1 else merged


def _outside(settings: ConversionSettings) -> str:
    if settings.shape_profile is None:
        return ""
    low, _, high = settings.shape_profile
    return f" (the shape profile serves {[list(s) for s in low]} to {[list(s) for s in high]})"


def _fmt(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"
