"""Kernel tactics: per node of an engine, the kernel family (``kerasrt.kernels.registry``) or
Inductor's own code that runs it fastest, found by timing every eligible candidate on the
device, as TensorRT times its tactics. The choice is recorded on the node
(``attrs["kernel_choice"]``, a ``Choice``): the engine emits it, the artifact saves it with the
graph, and a load runs it without timing anything.

Candidates are timed on example tensors made from the IR (channels-last activations, the
engine's weights) through the same ``arguments`` the engine emits, as device times of
CUDA-graph replays (engines that use these kernels replay as CUDA graphs, so host overhead
does not decide). Inductor's candidate is an estimate of what it compiles: the bare
convolution plus one memory-bound epilogue pass. Timings are cached per machine
(``choices.TimingCache``). Before timing, every Triton config of every untimed candidate is
compiled in worker processes (``compile_pool``), with the cuDNN plans that compile at run
time. After the per-node choices, ``merges`` rewrites neighbouring convolutions into merged
IR ops where one kernel beats their two.

``Tuner`` is how candidates are found and timed: on a CUDA device the real thing; a test
passes its own (a CPU cannot time a GPU kernel) to drive the same decisions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kerasrt.backend.aoti import engine_environment
from kerasrt.errors import ConversionError
from kerasrt.ir.graph import Node, Value, torch_dtype
from kerasrt.ir.ops import KERNEL
from kerasrt.kernels import conv_spec, cudnn_conv, op_library, registry
from kerasrt.kernels.registry import KernelFamily, View
from kerasrt.tuning import compile_pool
from kerasrt.tuning.choices import INDUCTOR, Choice, TimingCache, node_key

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
KERNEL_OPS = frozenset(op for f in registry.families() for op in f.ops)
"""IR ops some family runs."""
CANDIDATES_VERSION = 6
"""Bumped whenever a family's configs or arguments change (timings of another set are void)."""


def device_ms(
    fn: Callable[[], object], repeat: int = 10, replays: int = 5, stream: torch.cuda.Stream | None = None
) -> float:
    """Device time of one ``fn()`` call: ``repeat`` calls captured in a CUDA graph, replayed,
    timed with CUDA events; the best of ``replays``. ``stream``: where to warm up and capture
    (a new one by default; cuBLAS keeps a workspace per stream, so a caller timing many
    kernels passes one)."""
    stream = stream or torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            fn()
    graph.replay()
    best = float("inf")
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / repeat)
    return best


class ExampleOperands:
    """``registry.Operands`` as tensors on ``device``: random activations (channels-last where
    4-D, as engines lay them out), the graph's constants, each made once per value."""

    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = None if device.type == "meta" else torch.Generator(device).manual_seed(seed)
        self._made: dict[Any, torch.Tensor] = {}

    def __call__(self, value: Value) -> torch.Tensor:
        if id(value) not in self._made:
            if value.is_constant:
                tensor = value.data.to(self.device)
            else:
                dtype = torch_dtype(value.dtype)
                if self.generator is None:  # shapes and strides only
                    tensor = torch.empty(value.shape, dtype=dtype, device=self.device)
                elif dtype.is_floating_point:
                    tensor = torch.randn(value.shape, generator=self.generator, device=self.device).to(dtype)
                else:
                    tensor = torch.zeros(value.shape, dtype=dtype, device=self.device)
                if tensor.dim() == 4:
                    tensor = tensor.contiguous(memory_format=torch.channels_last)
            self._made[id(value)] = tensor
        return self._made[id(value)]

    def constant(self, prepare: Callable[..., torch.Tensor], *values: Value) -> torch.Tensor:
        key = (prepare, *(id(v) for v in values))
        if key not in self._made:
            self._made[key] = prepare(*(self(v) for v in values))
        return self._made[key]

    def apply(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


@dataclass
class Pending:
    """A node to time: its key, candidate families, the kernels it may take (the families',
    and Inductor's where it is timed too) and those whose timings are missing."""

    node: Node
    key: str
    families: list[KernelFamily]
    kernels: list[str]
    missing: list[str]


class Tuner:
    """Finds and times the candidate kernels of nodes on ``device``."""

    def __init__(self, device: torch.device, exclude: Sequence[str] = ()):
        """``exclude``: kernel families never to consider (TensorRT's tactic sources, the other
        way round: what a user rules out, or a measurement turns off to compare)."""
        self.device = device
        self.exclude = frozenset(exclude)
        self._stream: torch.cuda.Stream | None = None

    def environment(self) -> dict[str, str]:
        """What timings and choices are valid for: the engine environment (GPU architecture,
        library versions), cuDNN's version and the candidate set."""
        return {
            **engine_environment(self.device),
            "cudnn": cudnn_conv.cudnn_version(),
            "cudnn_graph": str(cudnn_conv.GRAPH_VERSION),
            "candidates": str(CANDIDATES_VERSION),
        }

    def timing_cache(self) -> TimingCache:
        return TimingCache(self.environment())

    def available(self, family: KernelFamily) -> bool:
        """Whether ``family`` runs here and is not excluded."""
        return family.name not in self.exclude and family.available(self.device)

    def candidates(self, node: Node, view: View) -> list[KernelFamily]:
        """The families that can run ``node`` here."""
        return [
            f
            for f in registry.families()
            if node.op in f.ops and self.available(f) and f.eligible(node, view)
        ]

    def operands(self) -> ExampleOperands:
        return ExampleOperands(self.device)

    def time(self, fn: Callable[[], object]) -> float:
        """Device ms of ``fn()``, captured and replayed on this tuner's one timing stream."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return device_ms(fn, stream=self._stream)

    def release(self) -> None:
        """Give back what timing held: the timing stream and cuBLAS's workspaces (allocator
        memory kept per stream, which the cuBLAS kernels timed here made), so a built engine's
        memory is its own."""
        self._stream = None
        if self.device.type == "cuda" and hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
            torch._C._cuda_clearCublasWorkspaces()

    def measure(
        self, family: KernelFamily, args: tuple, prebuilt: dict[int, Any]
    ) -> tuple[int, float] | None:
        """(best config, ms) of ``family`` on ``args`` (example tensors), or None when no
        config runs."""
        if family.tune is not None:
            return family.tune(args, prebuilt, self.time)
        best: tuple[int, float] | None = None
        for index, config in enumerate(family.configs):
            if not family.timed(config, args):
                continue
            try:
                ms = self.time(lambda index=index: family.call(args, index))
            except Exception as exc:  # a config that does not compile or run is no candidate
                log.debug("config %s of %s failed: %s", config, family.name, exc)
                continue
            if best is None or ms < best[1]:
                best = (index, ms)
        return best

    def inductor_ms(self, node: Node, view: View, operands: ExampleOperands) -> float:
        """Inductor's way, estimated: the bare convolution (after a zero pad a kernel would have
        folded, materialized) or cuBLAS's product with its bias, plus, when there is an
        epilogue Inductor runs apart, one elementwise pass with its memory traffic."""
        if node.op == "linear":
            return self._linear_inductor_ms(node, operands)
        x_value, w = node.inputs[0], operands(node.inputs[1])
        pad = x_value.producer if view.inside(x_value.producer) and x_value.producer.op == "pad" else None
        x = operands(pad.inputs[0] if pad is not None else x_value)
        stride, padding, dilation = conv_spec.geometry(node)
        groups = node.attrs.get("groups", 1)
        residual = conv_spec.optional(operands, conv_spec.epilogue_values(node)[1])
        epilogue = len(node.inputs) > 2 or (node.attrs.get("activation") or "none") != "none"
        pads = list(pad.attrs["pads"]) if pad is not None else None

        def run() -> None:
            xi = torch.nn.functional.pad(x, pads) if pads is not None else x
            y = torch.convolution(xi, w, None, stride, padding, dilation, False, [0, 0], groups)
            if epilogue:
                torch.add(y, residual if residual is not None else y[:1], out=torch.empty_like(y))

        return self.time(run)

    def _linear_inductor_ms(self, node: Node, operands: ExampleOperands) -> float:
        x, w = operands(node.inputs[0]), operands(node.inputs[1])
        bias, residual = (conv_spec.optional(operands, v) for v in conv_spec.epilogue_values(node))
        x = x.reshape(-1, x.shape[-1])
        epilogue = residual is not None or (node.attrs.get("activation") or "none") != "none"

        def run() -> None:
            y = torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)
            if epilogue:
                other = residual.reshape(y.shape) if residual is not None else y[:1]
                torch.add(y, other, out=torch.empty_like(y))

        return self.time(run)

    def prepare(self, pending: Sequence[Pending], view: View, operands: ExampleOperands) -> dict[Any, Any]:
        """Compile what the timing of ``pending`` will run, ahead of it: every Triton config of
        the missing families (launched within ``op_library.precompiling()`` to collect what
        they would compile, compiled in worker processes), and the families' own compile
        requests (cuDNN plans that compile at run time). Returns {(node key, family): the
        requests' results by index}."""
        if self.device.type != "cuda" or op_library.triton_kernels() is None:
            return {}
        launches, requests = [], {}
        for p in pending:
            for family in p.families:
                if family.name not in p.missing:
                    continue
                args = family.arguments(p.node, operands, view)
                if family.triton:
                    timed = [i for i, config in enumerate(family.configs) if family.timed(config, args)]
                    launches += [(family, args, index) for index in timed]
                if family.compile_requests is not None:
                    requests[(p.key, family.name)] = family.compile_requests(args, self.device)
        return precompile(launches, self.device, requests)


def precompile(
    launches: Sequence[tuple[KernelFamily, tuple, int]],
    device: torch.device,
    requests: dict[Any, list[compile_pool.Request]],
) -> dict[Any, dict[int, Any]]:
    """Compile the Triton kernels that ``launches`` ((family, args, config)) would run, and do
    ``requests`` alongside, in worker processes where there are enough (``compile_pool``).
    Returns each request group's results by index. Failures are left for the timing to meet
    (a config that does not compile is no candidate)."""
    if not (launches or requests):
        return {}

    def launch_all() -> None:
        with torch.cuda.device(device), op_library.precompiling():
            for family, args, index in launches:
                try:
                    family.call(args, index)
                except Exception as exc:
                    log.debug("launching %s config %d to compile it failed: %s", family.name, index, exc)

    started = time.perf_counter()
    if not compile_pool.supported():  # an older Triton: the launches compile, here
        launch_all()
        return {}
    kernels = compile_pool.collect(launch_all)
    flat = [r for group in requests.values() for r in group]
    results, workers = compile_pool.compile_requests([*flat, *kernels])
    log.info(
        "compiled %d Triton kernel(s) and did %d of %d other request(s) in %.1f s (%d worker process(es))",
        len(kernels),
        sum(r in results for r in flat),
        len(flat),
        time.perf_counter() - started,
        workers,
    )
    return {
        group: {i: results[r] for i, r in enumerate(rs) if results.get(r)} for group, rs in requests.items()
    }


def allowed(mode: str, kernels: Sequence[str], op: str) -> list[str]:
    """The kernels a choice of an ``op`` node may take in ``conv_kernels`` mode ``mode``: every
    candidate in "auto"; in "cudnn", a convolution takes kerasrt's own kernels wherever one
    runs (the mode is about convolutions: other ops always weigh Inductor's way too)."""
    own = [k for k in kernels if k != INDUCTOR]
    return list(kernels) if mode == "auto" or not own or op not in conv_spec.CONV_OPS else own


def choose(
    nodes: Sequence[Node],
    view: View,
    mode: str,
    tuner: Tuner,
    timings: TimingCache,
    progress: Progress | None = None,
) -> int:
    """Record a ``Choice`` on every node among ``nodes`` that some family runs and that has
    none yet (``mode``: "auto" also times Inductor's way; "cudnn" takes kerasrt's kernels
    wherever they run). Returns how many nodes were timed."""
    say = progress or (lambda _message: None)
    pending: list[Pending] = []
    for node in nodes:
        if node.op not in KERNEL_OPS or KERNEL in node.attrs:
            continue
        families = tuner.candidates(node, view)
        _check_mode(mode, node, view, families)
        if not families:
            continue
        kernels = [f.name for f in families]
        if node.op not in conv_spec.CONV_OPS or mode == "auto":
            kernels.append(INDUCTOR)
        key = node_key(node, view)
        missing = [k for k in kernels if k not in timings.get(key)]
        pending.append(Pending(node, key, families, kernels, missing))
    stale = {p.key: p for p in pending if p.missing}
    operands = tuner.operands()
    if stale:
        say(f"compiling kernel candidates for {len(stale)} layer shape(s)")
        prebuilt = tuner.prepare(list(stale.values()), view, operands)
        for number, p in enumerate(stale.values(), 1):
            say(f"timing kernels for layer shape {number} of {len(stale)}")
            time_pending(p, view, tuner, operands, timings, prebuilt)
    for p in pending:
        p.node.attrs[KERNEL] = Choice.fastest(timings.get(p.key), allowed(mode, p.kernels, p.node.op)).attr()
    return len(stale)


def time_pending(
    p: Pending,
    view: View,
    tuner: Tuner,
    operands: ExampleOperands,
    timings: TimingCache,
    prebuilt: dict[Any, dict[int, Any]],
) -> None:
    """Time ``p``'s missing kernels (``prebuilt``: what ``Tuner.prepare`` built for them) and
    add the timings to ``timings``; a family none of whose configs ran is recorded as such."""
    for family in p.families:
        if family.name in p.missing:
            args = family.arguments(p.node, operands, view)
            found = tuner.measure(family, args, prebuilt.get((p.key, family.name), {}))
            if found is None:
                log.info("no config of %s ran %s", family.name, p.node)
            timings.add(p.key, family.name, *(found or (0, None)))
    if INDUCTOR in p.missing:
        timings.add(p.key, INDUCTOR, 0, tuner.inductor_ms(p.node, view, operands))


def strip(nodes: Sequence[Node]) -> None:
    """Forget the choices of ``nodes`` (made for another environment)."""
    for node in nodes:
        node.attrs.pop(KERNEL, None)


def _check_mode(mode: str, node: Node, view: View, families: Sequence[KernelFamily]) -> None:
    """A clear error where ``conv_kernels="cudnn"`` cannot be honoured: a convolution cuDNN
    would fuse, but cuDNN does not run here."""
    if (
        mode == "cudnn"
        and node.op in cudnn_conv.FAMILY.ops
        and cudnn_conv.eligible(node, view)
        and cudnn_conv.FAMILY not in families
    ):
        raise ConversionError(
            "conv_kernels='cudnn' needs a CUDA device and the nvidia-cudnn-frontend package "
            "(pip install 'kerasrt[cuda]')"
        )
