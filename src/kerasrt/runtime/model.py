"""Run converted models: engines and fallback layers in order, one program per input shape.

``OptimizedModel`` keeps up to ``maximum_cached_engines`` programs (least recently used
evicted). An input shape with no program is built at run time when allowed (it needs the
original Keras model), or refused with EngineNotBuiltError.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from kerasrt.backend import cudnn_conv, merges, tactics
from kerasrt.backend.torch_backend import TorchEngine, is_supported, precision_scope
from kerasrt.errors import EngineNotBuiltError, InputSignatureError
from kerasrt.frontend import keras_adapter as ka
from kerasrt.ir.graph import Graph, Node, torch_dtype
from kerasrt.partition import Segment, Support, partition
from kerasrt.settings import ConversionSettings

log = logging.getLogger(__name__)
ShapeKey = tuple[tuple[int, ...], ...]
Progress = Callable[[str], None]
"""Hears what a long step is doing (the CLI shows it beside its spinner)."""


def with_batch(shapes: ShapeKey, batch: int) -> ShapeKey:
    """``shapes`` with every leading (batch) dimension set to ``batch``."""
    return tuple((batch, *shape[1:]) for shape in shapes)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: the GPU when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class TensorSpec:
    """A model input as declared by Keras: ``None`` marks a dimension that may vary."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str


class KerasSource:
    """The original Keras model, loaded only when a fallback layer or a rebuild needs it."""

    def __init__(self, model: Any = None, path: Any = None, custom_objects: dict | None = None):
        self._model = model
        self.path = path
        self.custom_objects = custom_objects

    def get(self) -> Any:
        if self._model is None:
            self._model = ka.load_model(self.path, self.custom_objects)
        return self._model


def fallback_runner(
    node: Node, keras: KerasSource, device: torch.device
) -> Callable[..., list[torch.Tensor]]:
    """A function running a ``keras_layer`` node's original Keras layer on torch tensors."""
    attrs = node.attrs
    spec = pytree.treespec_loads(attrs["call"]["spec"])
    leaves_spec = attrs["call"]["leaves"]
    resolved: list[Any] = []  # the Keras operation, looked up on first use

    def run(*tensors: torch.Tensor) -> list[torch.Tensor]:
        if not resolved:
            resolved.append(ka.find_operation(keras.get(), attrs["layer"]))
        native = ka.backend_name() == "torch"
        leaves = [
            (tensors[leaf["input"]] if native else tensors[leaf["input"]].cpu().numpy())
            if "input" in leaf
            else leaf["const"]
            for leaf in leaves_spec
        ]
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        flat = ka.flatten(ka.call_operation(resolved[0], args, kwargs))
        outs = [torch.as_tensor(np.asarray(o)) if not isinstance(o, torch.Tensor) else o for o in flat]
        return [o.to(device) for o in outs]

    return run


@dataclass
class CompiledEngines:
    """Engines compiled ahead of time (a loaded artifact's): AOTInductor packages by engine
    segment index, the convolutions (by output name) they run on cuDNN, the kernel choices
    (by signature) they were built with, and cuDNN's serialized plans of those choices
    (``cudnn_conv.serialized_plans``), deserialized where they run instead of built again."""

    files: dict[int, Path]
    kernel_convs: dict[str, str] = field(default_factory=dict)
    choices: dict[str, tactics.Choice] = field(default_factory=dict)
    cudnn_plans: dict[str, dict[str, Any]] = field(default_factory=dict)


class Program:
    """The executable form of one graph: its segments compiled for one device.

    ``compiled``: engines compiled earlier; those run their packages instead of compiling,
    with the kernel choices they were built with.
    """

    def __init__(
        self,
        graph: Graph,
        settings: ConversionSettings,
        device: torch.device,
        keras: KerasSource,
        compiled: CompiledEngines | None = None,
        progress: Progress | None = None,
    ):
        self.graph = graph
        self.device = device
        self.keras = keras
        kept_ops = set(graph.meta.get("kept_op_types", ()))

        def supported(node: Node) -> Support:
            if node.op in kept_ops:
                return Support(
                    False, f"op type {node.op} kept out of engines by request (keep_in_keras)", native=True
                )
            return is_supported(node)

        self.segments: list[Segment] = partition(graph, supported, settings.minimum_segment_size)
        self.graphable = (
            device.type == "cuda"
            and settings.cuda_graphs
            and all(s.kind != "fallback" for s in self.segments)
        )
        self.input_dtypes = [torch_dtype(v.dtype) for v in graph.inputs]  # staged inputs: low precision
        slot: dict[int, int] = {id(v): i for i, v in enumerate(graph.inputs)}
        for seg in self.segments:
            for out in seg.outputs:
                slot.setdefault(id(out), len(slot))
        self.num_slots = len(slot)
        self.output_slots = [slot[id(v)] if not v.is_constant else -1 for v in graph.outputs]
        self.constant_outputs = {i: v.data.to(device) for i, v in enumerate(graph.outputs) if v.is_constant}
        self.steps: list[tuple[Callable[..., Sequence[torch.Tensor]], list[int], list[int]]] = []
        self.kernel_choices: dict[str, tactics.Choice] = {}  # conv signature -> kernel, of this program
        self.kernel_convs: dict[str, str] = {}  # output name -> kernel, of the convs on kerasrt's kernels
        if compiled is not None:
            self.kernel_choices.update(compiled.choices)
            tactics.adopt(compiled.choices)
            cudnn_conv.offer_saved_plans(compiled.cudnn_plans)
        for seg in self.segments:
            ins = [slot[id(v)] for v in seg.inputs]
            outs = [slot[id(v)] for v in seg.outputs]
            if seg.kind == "fallback":
                self.steps.append((self._fallback_step(seg), ins, outs))
            else:
                compiler = settings.compiler_for(device.type) if seg.kind == "engine" else "eager"
                package = compiled.files.get(seg.index) if compiled and seg.kind == "engine" else None
                if package is not None:  # built with these kernels: take them as they are
                    own = {
                        id(n): compiled.kernel_convs[n.outputs[0].name]
                        for n in seg.nodes
                        if n.outputs[0].name in compiled.kernel_convs
                    }
                else:
                    own = self._choose_kernels(seg, settings, progress) if seg.kind == "engine" else {}
                args = (seg.nodes, seg.inputs, seg.outputs, device, compiler, settings.autotune)
                try:
                    engine = TorchEngine(*args, package=package, kernel_convs=own)
                except Exception as exc:  # a package this torch cannot load is rebuilt, not fatal
                    if package is None:
                        raise
                    warnings.warn(
                        f"cannot load compiled engine {package.name} ({exc}); recompiling it", stacklevel=2
                    )
                    own = self._choose_kernels(seg, settings, progress)
                    engine = TorchEngine(*args, kernel_convs=own)
                self.steps.append((engine, ins, outs))
                if engine.kernel_convs:
                    self.kernel_convs.update(
                        (n.outputs[0].name, own[id(n)]) for n in seg.nodes if id(n) in own
                    )
        self._graph: CudaGraphRunner | None = None

    def _choose_kernels(
        self, seg: Segment, settings: ConversionSettings, progress: Progress | None
    ) -> dict[int, str]:
        """The convolutions of an engine segment to run on kerasrt's kernels (node id ->
        kernel, see ``TorchEngine``), by measured tactics, with the merges of neighbouring
        convolutions that beat them (``merges.choose``). "auto" considers them only for
        programs replayed as CUDA graphs: each call is launched from Python, host work that
        only a graph replay hides."""
        mode = settings.conv_kernels
        if mode == "auto" and not self.graphable:
            mode = "inductor"
        choices = tactics.choose(seg.nodes, self.device, mode, progress)
        self.kernel_choices.update(choices.values())
        own = {node: choice.kernel for node, (_, choice) in choices.items() if choice.kernel != "inductor"}
        merged = merges.choose(seg.nodes, seg.outputs, choices, self.device, progress)
        for sig, choice, merge in merged.values():
            self.kernel_choices[sig] = choice
            own[id(merge.lead)] = merge.kernel
            own.update({id(other): merges.ABSORBED for other in merge.others})
        return own

    @property
    def captured(self) -> bool:
        """Whether calls replay a captured CUDA graph."""
        return self.graphable and self._graph is not None

    @property
    def compiled_engines(self) -> dict[int, TorchEngine]:
        """Engines compiled by Inductor (JIT or packages), by segment index."""
        return {
            seg.index: step[0]
            for seg, step in zip(self.segments, self.steps)
            if isinstance(step[0], TorchEngine) and step[0].compiler in ("inductor", "package")
        }

    def export_engines(self, folder: Path) -> tuple[dict[int, str], dict[int, str]]:
        """Compile every compiled engine ahead of time into ``folder``: the file names by
        segment index, and the digests of those that loaded in a test process here. An engine
        that does not compile ahead of time is left out with a warning: the artifact stays
        whole, and a load compiles that engine just in time (with the saved kernel choices)."""
        folder.mkdir(parents=True, exist_ok=True)
        files, tested = {}, {}
        for index, engine in self.compiled_engines.items():
            log.info("compiling engine %d ahead of time (AOTInductor)", index)
            path = folder / f"engine{index}.pt2"
            try:
                digest = engine.export_package(path)
            except Exception as exc:  # any compiler failure: the engine is kept uncompiled
                path.unlink(missing_ok=True)
                warnings.warn(
                    f"engine {index} could not be compiled ahead of time ({type(exc).__name__}: "
                    f"{str(exc)[:300]}); it is saved uncompiled and a load will compile it",
                    stacklevel=2,
                )
                continue
            files[index] = path.name
            if digest is not None:
                tested[index] = digest
        return files, tested

    def cudnn_plans(self) -> dict[str, dict[str, Any]]:
        """cuDNN's serialized plans of this program's cuDNN convolutions (those it has built and
        cuDNN serializes: every one, on the H100), saved with the compiled engines."""
        return cudnn_conv.serialized_plans(s for s, c in self.kernel_choices.items() if c.kernel == "cudnn")

    def _fallback_step(self, seg: Segment) -> Callable[..., Sequence[torch.Tensor]]:
        (node,) = seg.nodes
        run_layer = fallback_runner(node, self.keras, self.device)
        positions = [node.outputs.index(v) for v in seg.outputs]
        return lambda *tensors: [run_layer(*tensors)[i] for i in positions]

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run on ``inputs`` of the model's dtypes: a staged input (``precision.stage_inputs``)
        is cast as it is copied into the CUDA graph's input buffer, or before the first segment."""
        if self.graphable:
            if self._graph is None:
                try:
                    self._graph = CudaGraphRunner(self.run, inputs, self.input_dtypes)
                except RuntimeError as exc:  # e.g. an op that syncs with the host cannot be captured
                    log.warning("running without a CUDA graph: capture failed (%s)", str(exc).splitlines()[0])
                    self.graphable = False
                    return self.run(self.staged(inputs))
            return self._graph(inputs)
        return self.run(self.staged(inputs))

    def staged(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``inputs`` in the dtypes the graph takes them in."""
        return [t.to(dtype) for t, dtype in zip(inputs, self.input_dtypes)]

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run every segment in order (no CUDA graph)."""
        slots: list[Any] = [None] * self.num_slots
        slots[: len(inputs)] = inputs
        for fn, ins, outs in self.steps:
            results = fn(*[slots[i] for i in ins])
            for i, r in zip(outs, results):
                slots[i] = r
        return [self.constant_outputs[k] if s < 0 else slots[s] for k, s in enumerate(self.output_slots)]


class CudaGraphRunner:
    """Replays a static-shape function as one captured CUDA graph.

    The function runs a few times first (compiling, autotuning and warming the allocator),
    then once under capture. Each call copies the inputs into the captured input buffers
    (casting them to the buffers' dtypes), replays, and returns copies of the output buffers
    (the next replay overwrites them).
    """

    WARMUP_RUNS = 3

    def __init__(
        self,
        fn: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]],
        example: Sequence[torch.Tensor],
        dtypes: Sequence[torch.dtype],
    ):
        """``dtypes``: those of the input buffers (``fn`` takes its inputs in them)."""
        # cast as copied: no temporary of the input is alive while the warm-up runs take memory
        self.static_inputs = [torch.empty_like(t, dtype=d).copy_(t) for t, d in zip(example, dtypes)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.WARMUP_RUNS):
                fn(self.static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_outputs = fn(self.static_inputs)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        for static, tensor in zip(self.static_inputs, inputs):
            if static.data_ptr() != tensor.data_ptr():
                static.copy_(tensor)
        self.graph.replay()
        return [t.clone() for t in self.static_outputs]


GraphBuilder = Callable[[ShapeKey], Graph]


class OptimizedModel:
    """A converted model: call it with numpy arrays (numpy out) or torch tensors (torch out)."""

    def __init__(
        self,
        graphs: dict[ShapeKey, Graph],
        settings: ConversionSettings,
        inputs: Sequence[TensorSpec],
        output_names: Sequence[str],
        keras: KerasSource,
        builder: GraphBuilder | None = None,
        device: str | torch.device = "auto",
        name: str = "model",
        packages: dict[ShapeKey, CompiledEngines] | None = None,
        progress: Progress | None = None,
    ):
        self.device = resolve_device(device)
        self.progress = progress  # told of engine builds (tactics can take minutes)
        self.settings = settings
        self.inputs = list(inputs)
        self.output_names = list(output_names)
        self.keras = keras
        self.builder = builder
        self.name = name
        self.graphs: OrderedDict[ShapeKey, Graph] = OrderedDict(graphs)
        self._programs: OrderedDict[ShapeKey, Program] = OrderedDict()
        self.packages = dict(packages or {})  # ahead-of-time compiled engines, by input shapes

    # -- engines -----------------------------------------------------------------------
    def program(self, key: ShapeKey, build: bool = False) -> Program:
        """The program for input shapes ``key``, built (and cached, LRU) on first use; a
        shape never seen needs ``allow_build_at_runtime`` or ``build=True`` (ahead of time)."""
        program = self._programs.get(key)
        if program is not None:
            self._programs.move_to_end(key)
            self.graphs.move_to_end(key)
            return program
        graph = self.graphs.get(key)
        if graph is None:
            if not (self.settings.allow_build_at_runtime or build) or self.builder is None:
                known = ", ".join(str(list(map(list, k))) for k in self.graphs) or "none"
                raise EngineNotBuiltError(
                    f"no engine for input shapes {[list(s) for s in key]} (built: {known}) and "
                    + (
                        "allow_build_at_runtime is False"
                        if not self.settings.allow_build_at_runtime
                        else "the original Keras model is not available to build one"
                    )
                )
            log.info("building an engine for input shapes %s", key)
            graph = self.builder(key)
            self.graphs[key] = graph
        if self.progress is not None:
            self.progress(f"building the engines for input shapes {', '.join(_fmt(s) for s in key)}")
        program = Program(
            graph, self.settings, self.device, self.keras, self.packages.get(key), self.progress
        )
        self._programs[key] = program
        self.graphs.move_to_end(key)
        while len(self.graphs) > self.settings.maximum_cached_engines:
            old, _ = self.graphs.popitem(last=False)
            self._programs.pop(old, None)
            self.packages.pop(old, None)
            log.info("evicted the engine for input shapes %s", old)
        return program

    @property
    def engine_shapes(self) -> list[ShapeKey]:
        return list(self.graphs)

    def primary_graph(self) -> Graph:
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
        with torch.inference_mode():  # (the captured buffers are inference tensors)
            if program.captured:  # a CUDA graph replay: the math modes no longer matter
                outputs = program(tensors)
            else:
                with precision_scope(self.device, self.settings.precision_mode):
                    outputs = program(tensors)
        if padded != batch:
            outputs = [o[:batch] if o.dim() and o.shape[0] == padded else o for o in outputs]
        if as_torch:
            outputs = [o.to(out_device) for o in outputs]
        else:
            outputs = [o.detach().cpu().numpy() for o in outputs]
        return outputs[0] if len(outputs) == 1 else outputs

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


def _fmt(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"
