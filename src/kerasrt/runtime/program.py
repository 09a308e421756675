"""The executable form of one graph: its segments (engines, native ops, Keras fallback layers)
built for one device, run in order, replayed as one CUDA graph where every segment allows.

Building a program is where kernels are chosen: the engine segments' nodes that kerasrt's
kernel families run are timed (``kerasrt.tuning.tactics``) and merged where that wins
(``kerasrt.tuning.merges``), and the choices are written into the graph itself, which the
artifact saves. A graph that carries choices for this environment is built as it is.
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

from kerasrt.backend.torch_backend import TorchEngine, is_supported, kernel_family
from kerasrt.compile.partition import Segment, Support, partition
from kerasrt.errors import EngineNotBuiltError
from kerasrt.frontend import keras_adapter as ka
from kerasrt.ir.graph import Graph, Node, torch_dtype
from kerasrt.ir.ops import KERNEL
from kerasrt.ir.specialize import is_symbolic
from kerasrt.kernels import cudnn_conv, registry
from kerasrt.settings import ConversionSettings
from kerasrt.tuning import tactics
from kerasrt.tuning.kernel_pass import choose_kernels

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
"""Hears what a long step is doing (the CLI shows it beside its spinner)."""
ShapeKey = tuple[tuple[int, ...], ...]


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
    """The original Keras model, loaded only when a fallback layer or a new import needs it
    (in Keras safe mode unless ``safe_mode=False``: a Python lambda is code)."""

    def __init__(
        self, model: Any = None, path: Any = None, custom_objects: dict | None = None, safe_mode: bool = True
    ):
        self._model = model
        self.path = path
        self.custom_objects = custom_objects
        self.safe_mode = safe_mode

    @property
    def available(self) -> bool:
        return self._model is not None or self.path is not None

    def get(self) -> Any:
        if self._model is None:
            if self.path is None:
                raise EngineNotBuiltError(
                    "the original Keras model is not available (the artifact holds none)"
                )
            self._model = ka.load_model(self.path, self.custom_objects, safe_mode=self.safe_mode)
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
    segment index, and cuDNN's serialized plans of their cuDNN convolutions
    (``cudnn_conv.serialized_plans``), deserialized instead of built again."""

    files: dict[int, Path]
    cudnn_plans: list[dict[str, Any]] = field(default_factory=list)


class Program:
    """The executable form of one graph: its segments compiled for one device.

    ``compiled``: engines compiled earlier (a loaded artifact's); those run their packages
    instead of compiling. ``tuner``: how kernel candidates are found and timed (default: on
    this device).
    """

    def __init__(
        self,
        graph: Graph,
        settings: ConversionSettings,
        device: torch.device,
        keras: KerasSource,
        compiled: CompiledEngines | None = None,
        progress: Progress | None = None,
        tuner: tactics.Tuner | None = None,
    ):
        self.graph = graph
        self.device = device
        self.keras = keras
        self.settings = settings
        self.segments = self._partition()
        self.dynamic = is_symbolic(graph)  # one program for every shape (use_dynamic_shape)
        self.graphable = (
            device.type == "cuda"
            and settings.cuda_graphs
            and all(s.kind != "fallback" for s in self.segments)
        )
        if compiled is None:  # a package was compiled with the choices its graph carries
            # "auto" considers kerasrt's kernels only for programs replayed as CUDA graphs: each
            # call of them is launched from Python, host work only a graph replay hides; elsewhere
            # choices the graph carries run as they are (on a CPU, the ops' reference math)
            mode = settings.conv_kernels if self.graphable or settings.conv_kernels != "auto" else "inductor"
            if self.dynamic:  # kerasrt's kernels are chosen per exact shape
                mode = "inductor"
            engines = [s for s in self.segments if s.kind == "engine"]
            tuner = tuner or tactics.Tuner(device, settings.exclude_kernels)
            if choose_kernels(graph, engines, mode, tuner, progress):
                self.segments = self._partition()
        else:
            cudnn_conv.install_saved_plans(compiled.cudnn_plans, device)
        self.input_dtypes = [torch_dtype(v.dtype) for v in graph.inputs]  # staged inputs: low precision
        slot: dict[int, int] = {id(v): i for i, v in enumerate(graph.inputs)}
        for seg in self.segments:
            for out in seg.outputs:
                slot.setdefault(id(out), len(slot))
        self.num_slots = len(slot)
        self.output_slots = [slot[id(v)] if not v.is_constant else -1 for v in graph.outputs]
        self.constant_outputs = {i: v.data.to(device) for i, v in enumerate(graph.outputs) if v.is_constant}
        self.steps: list[tuple[Callable[..., Sequence[torch.Tensor]], list[int], list[int]]] = []
        for seg in self.segments:
            ins = [slot[id(v)] for v in seg.inputs]
            outs = [slot[id(v)] for v in seg.outputs]
            if seg.kind == "fallback":
                self.steps.append((self._fallback_step(seg), ins, outs))
                continue
            compiler = settings.compiler_for(device.type) if seg.kind == "engine" else "eager"
            package = compiled.files.get(seg.index) if compiled and seg.kind == "engine" else None
            args = (seg.nodes, seg.inputs, seg.outputs, device, compiler, settings.autotune)
            try:
                engine = TorchEngine(*args, package=package)
            except Exception as exc:  # a package this torch cannot load is rebuilt, not fatal
                if package is None:
                    raise
                warnings.warn(
                    f"cannot load compiled engine {package.name} ({exc}); recompiling it", stacklevel=2
                )
                engine = TorchEngine(*args)
            self.steps.append((engine, ins, outs))
        self._graphs: OrderedDict[tuple, CudaGraphRunner] = OrderedDict()  # by input shapes

    def _partition(self) -> list[Segment]:
        kept_ops = set(self.graph.meta.get("kept_op_types", ()))

        def supported(node: Node) -> Support:
            if node.op in kept_ops:
                return Support(
                    False, f"op type {node.op} kept out of engines by request (keep_in_keras)", native=True
                )
            return is_supported(node)

        return partition(self.graph, supported, self.settings.minimum_segment_size)

    @property
    def kernel_nodes(self) -> list[Node]:
        """The engines' nodes that run on kerasrt's kernel families."""
        return [
            n for s in self.segments if s.kind == "engine" for n in s.nodes if kernel_family(n) is not None
        ]

    @property
    def captured(self) -> bool:
        """Whether calls replay a captured CUDA graph."""
        return self.graphable and bool(self._graphs)

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
        whole, and a load compiles that engine just in time (with the graph's kernel choices)."""
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

    def cudnn_plans(self) -> list[dict[str, Any]]:
        """cuDNN's serialized plans of this program's cuDNN convolutions (those built here that
        cuDNN serializes), saved with the compiled engines."""
        meta = tactics.ExampleOperands(torch.device("meta"))
        calls = []
        for seg in self.segments:
            view = registry.View(seg.nodes, seg.outputs)
            for node in seg.nodes:
                if kernel_family(node) is cudnn_conv.FAMILY:
                    args = cudnn_conv.FAMILY.arguments(node, meta, view)
                    calls.append((cudnn_conv.call_key_of(args), node.attrs[KERNEL]["config"]))
        return cudnn_conv.serialized_plans(calls)

    def _fallback_step(self, seg: Segment) -> Callable[..., Sequence[torch.Tensor]]:
        (node,) = seg.nodes
        run_layer = fallback_runner(node, self.keras, self.device)
        positions = [node.outputs.index(v) for v in seg.outputs]
        return lambda *tensors: [run_layer(*tensors)[i] for i in positions]

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run on ``inputs`` of the model's dtypes: a staged input (``precision.stage_inputs``)
        is cast as it is copied into the CUDA graph's input buffer, or before the first segment."""
        if self.graphable:
            key = tuple(tuple(t.shape) for t in inputs)
            runner = self._graphs.get(key)
            if runner is None:
                try:
                    runner = CudaGraphRunner(self.run, inputs, self.input_dtypes)
                except RuntimeError as exc:  # e.g. an op that syncs with the host cannot be captured
                    log.warning("running without a CUDA graph: capture failed (%s)", str(exc).splitlines()[0])
                    self.graphable = False
                    return self.run(self.staged(inputs))
                self._graphs[key] = runner  # a dynamic program captures one graph per shape
                while len(self._graphs) > (self.settings.maximum_cached_engines if self.dynamic else 1):
                    self._graphs.popitem(last=False)
            self._graphs.move_to_end(key)
            return runner(inputs)
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
