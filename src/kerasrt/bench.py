"""Benchmarking, trtexec style: latency percentiles, throughput, transfer times, peak memory,
for kerasrt and the systems a Keras user has today, measured the same way in one process.

Device work is timed with CUDA events on a GPU (wall clock on a CPU), after warm-up, inputs
already on the device; host-to-device and device-to-host copies are timed separately.
Keras on JAX runs in a child process (``python -m kerasrt.bench_jax``): JAX and Keras's
backend are chosen per process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from kerasrt.runtime.program import ShapeKey

SCHEMA_VERSION = 1
SYSTEMS = ("kerasrt", "keras-eager", "keras-torch-compile", "keras-jax-jit")
"""What ``--compare`` measures: kerasrt; Keras eager, torch backend; Keras under torch.compile
(``jit_compile=True`` on the torch backend); Keras on JAX under ``jax.jit`` (XLA)."""

KERAS_POLICY = {
    "FP32": "float32",
    "TF32": "float32",
    "FP16": "mixed_float16",
    "BF16": "mixed_bfloat16",
    "INT8": "mixed_float16",
    "FP8": "mixed_float16",
}
"""The Keras dtype policy a compared Keras system runs at for each kerasrt precision (Keras
has no INT8/FP8 inference of its own: quantized kerasrt is compared with FP16 peers)."""

JAX_POLICY = {**KERAS_POLICY, "FP16": "mixed_bfloat16", "INT8": "mixed_bfloat16", "FP8": "mixed_bfloat16"}
"""On JAX, 16-bit runs use bfloat16: XLA's fast path on NVIDIA GPUs and what Keras users on
JAX deploy (the issue's baseline is Keras on JAX in bfloat16)."""


@dataclass(frozen=True)
class Timing:
    """Median and spread of per-call times in milliseconds (the demo's simple timing)."""

    name: str
    median_ms: float
    min_ms: float
    max_ms: float
    iters: int


@dataclass
class Result:
    """One system at one batch size."""

    system: str
    batch: int
    precision: str
    latency_ms: dict[str, float]  # mean, p50, p90, p95, p99, min, max
    throughput: float  # samples per second at the median latency
    iters: int
    build_s: float | None = None
    h2d_ms: float | None = None  # copying the inputs from the host, when they start there
    d2h_ms: float | None = None  # copying the outputs back to the host
    peak_memory_mb: float | None = None
    max_rel_err: float | None = None  # against Keras FP32, relative to the largest |output|
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_latencies(
    fn: Callable[[], Any], device: torch.device, warmup: int = 10, iters: int = 50
) -> list[float]:
    """Milliseconds per call of ``fn``: CUDA events around each call on a GPU (device time of
    the whole call, launches included), wall clock on a CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
        ]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(iters):
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return samples


def kernel_profile(fn: Callable[[], Any], device: torch.device, calls: int = 5, top: int = 12) -> list[dict]:
    """Where a call's device time goes: the ``top`` kernels by their own device time over
    ``calls`` calls (torch.profiler), each as {name, ms per call, share of the profiled
    time}; on a CPU, the top operators by their own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    fn()
    _sync(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [
        {
            "name": e.key[:120],
            "ms_per_call": round(getattr(e, attr) / calls / 1e3, 4),
            "share": round(getattr(e, attr) / total, 3),
        }
        for e in events[:top]
    ]


def latency_stats(samples: Sequence[float]) -> dict[str, float]:
    """mean, p50, p90, p95, p99, min and max of ``samples`` (ms), rounded to the microsecond."""
    array = np.asarray(samples, dtype=np.float64)
    stats = {"mean": float(array.mean())}
    for p in (50, 90, 95, 99):
        stats[f"p{p}"] = float(np.percentile(array, p))
    stats["min"], stats["max"] = float(array.min()), float(array.max())
    return {k: round(v, 4) for k, v in stats.items()}


def time_call(name: str, fn: Callable[[], Any], warmup: int = 3, iters: int = 20) -> Timing:
    """Median wall time of ``fn`` (device work waited for on CUDA)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(iters):
        begin = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - begin) * 1e3)
    return Timing(name, statistics.median(samples), min(samples), max(samples), iters)


def compare_keras(
    keras_model: Any, model: Any, inputs: Sequence[Any], warmup: int = 3, iters: int = 20
) -> list[Timing]:
    """Keras eager (current backend, inference mode) vs kerasrt on the same inputs (the demo)."""
    args = inputs[0] if len(inputs) == 1 else list(inputs)
    keras_t = time_call("keras", lambda: keras_model(args, training=False), warmup, iters)
    device = getattr(model, "device", torch.device("cpu"))
    tensors = [torch.as_tensor(x).to(device) for x in inputs]
    krt_t = time_call("kerasrt", lambda: model(*tensors), warmup, iters)
    return [keras_t, krt_t]


def transfer_times(
    inputs: Sequence[np.ndarray], outputs: Sequence[torch.Tensor], device: torch.device, iters: int = 20
) -> tuple[float | None, float | None]:
    """Median host-to-device time of the inputs (pinned memory) and device-to-host time of the
    outputs, in ms; None on a CPU."""
    if device.type != "cuda":
        return None, None
    pinned = [torch.from_numpy(np.ascontiguousarray(x)).pin_memory() for x in inputs]
    h2d = sample_latencies(lambda: [p.to(device, non_blocking=True) for p in pinned], device, 3, iters)
    d2h = sample_latencies(lambda: [o.cpu() for o in outputs], device, 3, iters)
    return round(statistics.median(h2d), 4), round(statistics.median(d2h), 4)


class MemoryWatch:
    """GPU memory a system adds: peak allocated minus what was allocated at ``start()`` (its
    weights, workspaces, CUDA-graph pools and activations; not the caller's tensors).
    ``build_done()`` notes the build's peak and starts a fresh one for inference."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def start(self) -> MemoryWatch:
        if self.device.type == "cuda":
            gc.collect()  # what earlier systems left must not be freed inside this window
            # nor cuBLAS's workspaces (one per stream, allocator memory): torch.compile's
            # CUDA graphs free them before capturing, which read as a negative peak
            torch._C._cuda_clearCublasWorkspaces()
            torch.cuda.empty_cache()
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def build_done(self) -> float | None:
        """The peak so far (the build's), then measure the inference peak from here on."""
        peak = self.peak_mb()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return peak

    def peak_mb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        _sync(self.device)
        return round((torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20, 1)


def relative_error(got: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> float:
    """Largest |got - ref| over the largest |ref|, across outputs."""
    worst = 0.0
    for g, r in zip(got, ref):
        scale = max(float(np.max(np.abs(r))), 1e-12)
        worst = max(worst, float(np.max(np.abs(np.asarray(g, np.float64) - r))) / scale)
    return worst


def _as_list(out: Any) -> list[Any]:
    """A system's outputs in Keras's flat order (a dict's values by sorted key)."""
    if isinstance(out, dict):
        return [out[key] for key in sorted(out)]
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _to_numpy(out: Any) -> list[np.ndarray]:
    result = []
    for o in _as_list(out):
        if isinstance(o, torch.Tensor):
            o = o.detach().float().cpu().numpy()
        result.append(np.asarray(o, dtype=np.float32))
    return result


def measure(
    system: str,
    batch: int,
    precision: str,
    call: Callable[[], Any],
    device: torch.device,
    reference: Sequence[np.ndarray] | None = None,
    host_inputs: Sequence[np.ndarray] | None = None,
    build_s: float | None = None,
    warmup: int = 10,
    iters: int = 50,
    note: str = "",
    memory: MemoryWatch | None = None,
    profile: bool = False,
) -> Result:
    """Time ``call`` (inputs already on ``device``) and fill a Result; ``profile``: also
    record its top kernels (``kernel_profile``) in ``extra["top_kernels"]``."""
    out = call()
    err = relative_error(_to_numpy(out), reference) if reference is not None else None
    samples = sample_latencies(call, device, warmup, iters)
    stats = latency_stats(samples)
    h2d = d2h = None
    if host_inputs is not None:
        h2d, d2h = transfer_times(
            host_inputs, [o for o in _as_list(out) if isinstance(o, torch.Tensor)], device
        )
    peak = memory.peak_mb() if memory is not None else None
    return Result(
        system,
        batch,
        precision,
        stats,
        round(batch / stats["p50"] * 1e3, 1),
        iters,
        build_s=None if build_s is None else round(build_s, 2),
        h2d_ms=h2d,
        d2h_ms=d2h,
        peak_memory_mb=peak,
        max_rel_err=err,
        note=note,
        extra={"top_kernels": kernel_profile(call, device)} if profile else {},
    )


# -- the systems ---------------------------------------------------------------------------------


def keras_with_policy(model: Any, policy: str) -> Any:
    """A copy of ``model`` built under the Keras dtype ``policy``, with the same weights."""
    import keras

    if policy == "float32":
        return model

    def rebuild(layer: Any) -> Any:  # saved configs pin each layer's dtype: replace it
        config = layer.get_config()
        if "dtype" in config:
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    try:
        clone = keras.models.clone_model(model, clone_function=rebuild)
    except Exception:  # a model class of its own (keras_hub backbones): rebuild it whole
        config = model.get_config()
        if "dtype" not in config:
            raise
        clone = model.__class__.from_config({**config, "dtype": policy})
    clone.set_weights(model.get_weights())
    return clone


def bench_keras_model(
    keras_model: Any,
    batches: Sequence[int],
    precision: str = "FP32",
    systems: Sequence[str] = ("kerasrt",),
    device: str = "auto",
    warmup: int = 10,
    iters: int = 50,
    converter_kwargs: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    model_path: str | None = None,
    artifact: str | os.PathLike[str] | None = None,
    inputs: Callable[[int], Sequence[np.ndarray]] | None = None,
    profile: bool = False,
) -> list[Result]:
    """Measure ``systems`` on ``keras_model`` (torch backend) at each batch size, same inputs,
    errors against Keras FP32. ``model_path`` (a .keras file) saves one for the JAX worker.
    ``artifact`` (a saved kerasrt model of ``keras_model``): kerasrt runs the artifact's own
    engines where it has one of this precision for the batch's shapes, and its build time is
    then load + first call (like trtexec --loadEngine); other batches are converted.
    ``inputs(batch)`` gives the host inputs of a batch (default: random draws of the model's
    input specs, normal floats and 0/1 integers, unknown sizes 8). ``profile``: kerasrt's
    rows also record their top kernels (``kernel_profile``)."""
    from kerasrt.frontend import keras_adapter as ka
    from kerasrt.validate import keras_outputs, random_inputs_for

    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise ValueError(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    say = progress or (lambda _msg: None)
    specs = ka.input_specs(keras_model)
    results: list[Result] = []
    for batch in batches:
        if inputs is not None:
            host = [np.asarray(x) for x in inputs(batch)]
        else:
            shapes = [
                ((batch, *[d if d is not None else 8 for d in shape[1:]]), dtype) for shape, dtype in specs
            ]
            host = random_inputs_for(shapes, seed=batch)
        tensors = [torch.from_numpy(x).to(dev) for x in host]
        with torch.no_grad():
            reference = [np.asarray(o, np.float64) for o in keras_outputs(keras_model, [t for t in tensors])]
        for system in systems:
            say(f"{system}, batch {batch}")
            if system == "keras-jax-jit":
                results.append(
                    _bench_jax(keras_model, model_path, batch, precision, host, reference, warmup, iters)
                )
                continue
            memory = MemoryWatch(dev).start()
            call, build, note = _prepare_system(
                system,
                keras_model,
                precision,
                tensors,
                dev,
                converter_kwargs,
                artifact,
                lambda detail, head=f"{system}, batch {batch}": say(f"{head}: {detail}"),
            )
            build_peak = memory.build_done()
            transfers = host if system == "kerasrt" else None
            with torch.no_grad():
                result = measure(
                    system,
                    batch,
                    precision,
                    call,
                    dev,
                    reference,
                    transfers,
                    build,
                    warmup,
                    iters,
                    note,
                    memory,
                    profile=profile and system == "kerasrt",
                )
            result.extra["build_peak_memory_mb"] = build_peak
            results.append(result)
            del call
    return results


def _artifact_serves(artifact: str | os.PathLike[str], precision: str, shapes: ShapeKey) -> bool:
    """Whether the artifact saved an engine of ``precision`` for these input shapes."""
    from kerasrt.runtime.artifact import saved_engines

    saved_precision, saved_shapes = saved_engines(artifact)
    return saved_precision == precision and shapes in saved_shapes


def _prepare_system(
    system: str,
    keras_model: Any,
    precision: str,
    tensors: Sequence[torch.Tensor],
    device: torch.device,
    converter_kwargs: dict[str, Any] | None,
    artifact: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Callable[[], Any], float | None, str]:
    """Build ``system`` for these inputs (kerasrt's build reports to ``progress``); returns
    (call, build seconds, note)."""
    from kerasrt.converter import Converter

    begin = time.perf_counter()
    shapes = tuple(tuple(t.shape) for t in tensors)
    if system == "kerasrt" and artifact is not None and _artifact_serves(artifact, precision, shapes):
        from kerasrt.runtime.artifact import load

        loaded = load(artifact, device=str(device))
        loaded(*tensors)  # load its engines, capture
        _sync(device)
        kinds = {e.compiler for e in loaded.program(shapes).compiled_engines.values()}
        how = "recompiled" if "inductor" in kinds else "loaded"
        note = f"the artifact's engines ({how}); build s = load + first call"
        return (lambda: loaded(*tensors)), time.perf_counter() - begin, note
    if system == "kerasrt":
        optimized = Converter(
            keras_model,
            precision_mode=precision,
            input_shapes=[tuple(t.shape) for t in tensors],
            device=str(device),
            progress=progress,
            **(converter_kwargs or {}),
        )
        # INT8/FP8: calibrated on the timed inputs (ranges for speed, not for accuracy)
        calibration = [list(tensors)] if optimized.settings.quantized else None
        optimized = optimized.convert(calibration_input_fn=calibration)
        optimized(*tensors)  # compile, autotune, capture
        _sync(device)
        return (lambda: optimized(*tensors)), time.perf_counter() - begin, ""
    policy = KERAS_POLICY[precision]
    model = keras_with_policy(keras_model, policy)
    from kerasrt.frontend.keras_adapter import call_inputs

    args = call_inputs(model, tensors)
    if system == "keras-eager":
        return (lambda: model(args, training=False)), None, f"policy {policy}"
    compiled = torch.compile(lambda: model(args, training=False))
    with torch.no_grad(), dynamo_census() as census:
        compiled()
    _sync(device)
    return compiled, time.perf_counter() - begin, f"policy {policy}; {census['summary']}"


@contextlib.contextmanager
def dynamo_census() -> Iterator[dict[str, Any]]:
    """What torch.compile made of the calls inside: graphs compiled, graph breaks, and frames
    it left to run eagerly (after its recompile limit, say). Keras's layer calls break
    Dynamo's graph and reuse one ``forward`` for every layer, so a Keras model yields dozens of
    recompile warnings; they are kept out of the report, and these counts say instead how
    much of the model torch.compile compiled. Fills the yielded dict on exit."""
    from torch._dynamo.utils import counters

    dynamo_log = logging.getLogger("torch._dynamo")
    level = dynamo_log.level
    counters.clear()
    dynamo_log.setLevel(logging.ERROR)
    census: dict[str, Any] = {}
    try:
        yield census
    finally:
        dynamo_log.setLevel(level)
        frames = counters["frames"]
        census.update(
            graphs=counters["stats"]["unique_graphs"],
            graph_breaks=sum(counters["graph_break"].values()),
            frames=frames["total"],
            eager_frames=frames["total"] - frames["ok"],
        )
        census["summary"] = (
            f"Dynamo compiled {census['graphs']} graphs, {census['graph_breaks']} graph breaks, "
            f"{census['eager_frames']} of {census['frames']} frames left eager"
        )


def _bench_jax(
    keras_model: Any,
    model_path: str | None,
    batch: int,
    precision: str,
    host: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    warmup: int,
    iters: int,
) -> Result:
    """Keras on the JAX backend under jax.jit, in a child process; same inputs and reference."""
    with tempfile.TemporaryDirectory(prefix="kerasrt-bench-") as tmp:
        path = model_path
        if path is None:
            path = os.path.join(tmp, "model.keras")
            keras_model.save(path)
        np.savez(os.path.join(tmp, "inputs.npz"), *host)
        request = {
            "model": path,
            "inputs": os.path.join(tmp, "inputs.npz"),
            "policy": JAX_POLICY[precision],
            "warmup": warmup,
            "iters": iters,
            "out": os.path.join(tmp, "result.json"),
            "imports": _defining_packages(keras_model),
        }
        env = {
            **os.environ,
            "KERAS_BACKEND": "jax",
            "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
            # the packages that define the model's layers import from where this process's do
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        }
        proc = subprocess.run(
            [sys.executable, "-m", "kerasrt.bench_jax", json.dumps(request)],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not os.path.exists(request["out"]):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return Result("keras-jax-jit", batch, precision, {}, 0.0, 0, note=f"failed: {tail[0][:200]}")
        with open(request["out"]) as fh:
            data = json.load(fh)
        outputs = [np.load(os.path.join(tmp, f"out{i}.npy")) for i in range(data["outputs"])]
    stats = data["latency_ms"]
    return Result(
        "keras-jax-jit",
        batch,
        precision,
        stats,
        round(batch / stats["p50"] * 1e3, 1),
        iters,
        build_s=data["build_s"],
        peak_memory_mb=data.get("peak_memory_mb"),
        max_rel_err=relative_error(outputs, reference),
        note=f"policy {JAX_POLICY[precision]}, {data['device']}",
    )


def _defining_packages(keras_model: Any) -> list[str]:
    """The importable packages (other than Keras) whose classes the model's layers are: the
    JAX worker imports them so that loading the saved model finds those classes."""
    layers = [keras_model, *keras_model._flatten_layers(include_self=False, recursive=True)]
    packages = {type(layer).__module__.split(".")[0] for layer in layers}
    return sorted(packages - {"keras", "__main__", "builtins"})


def report_json(results: Sequence[Result], meta: dict[str, Any]) -> dict[str, Any]:
    """The --json document: schema version, environment, one row per system and batch."""
    return {"schema": SCHEMA_VERSION, **meta, "results": [r.to_json() for r in results]}


def environment() -> dict[str, Any]:
    """Card, library versions and date, for every benchmark record."""
    import keras

    env = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "keras": keras.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def plot(results: Sequence[Result], path: Any, title: str = "") -> None:
    """Throughput and p50 latency by batch size, one line per system (matplotlib)."""
    from pathlib import Path

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from kerasrt.errors import KerasRTError

        raise KerasRTError("--plot needs matplotlib: pip install matplotlib") from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for system in dict.fromkeys(r.system for r in results):
        rows = sorted((r for r in results if r.system == system and r.latency_ms), key=lambda r: r.batch)
        if not rows:
            continue
        batches = [r.batch for r in rows]
        left.plot(batches, [r.throughput for r in rows], marker="o", label=system)
        right.plot(batches, [r.latency_ms["p50"] for r in rows], marker="o", label=system)
    for ax, label in ((left, "throughput (samples/s)"), (right, "latency p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
