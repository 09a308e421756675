"""Where a cold convert + build goes: wall seconds per phase of converting a keras.applications
model (tactics: cuDNN plans, the Triton candidates compiled in worker processes and then each
config timed, Inductor's estimate; the engines' compile on the first call), with every cache
empty (fresh kerasrt, Triton and Inductor cache folders and CUDA's JIT cache off); the
first call's error against Keras FP32, and the median of 50 calls (``kerasrt.bench``'s CUDA
event timing, as the suite's, inputs on the device) to compare the engines different
builds chose. ``KERASRT_COMPILE_WORKERS=0`` compiles the candidates in threads instead.

    source .whl/activate.sh && python bench/build_phases.py [MODEL] [BATCH]

``STACKS_EVERY=S`` also prints every thread's stack every S seconds on stderr (faulthandler:
where a slow phase spends its time, even inside C code); ``SAMPLE_EVERY=S`` prints the main
thread's innermost Python frames instead (from a Python thread: safe, but blind while C code
holds the GIL).

Prints one JSON line on stdout: convert and convert + first-call seconds, the error, p50 ms,
seconds and calls per phase, the process's child processes (a compile pool) and the cache
folders it used (kept after exit, so a later process can reuse the tactics). kerasrt's INFO
log (the tactics' phases) goes to stderr.
"""

from __future__ import annotations

import collections
import faulthandler
import functools
import inspect
import json
import logging
import os
import sys
import tempfile
import threading
import time
import traceback

CACHE_VARIABLES = ("KERASRT_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")
for variable in CACHE_VARIABLES:
    os.environ[variable] = tempfile.mkdtemp(prefix=variable.lower())
os.environ["CUDA_CACHE_DISABLE"] = "1"
os.environ.setdefault("KERAS_BACKEND", "torch")

import torch  # noqa: E402 (after the cache folders are set)
import triton.compiler.compiler  # noqa: E402
import triton.runtime.jit  # noqa: E402
from torch._inductor import compile_fx  # noqa: E402

import kerasrt  # noqa: E402
from kerasrt.bench import latency_stats, sample_latencies  # noqa: E402
from kerasrt.runtime import program  # noqa: E402
from kerasrt.tuning import merges, tactics  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from kerasrt_testing import calibrated_application  # noqa: E402 (calibrated random weights)

SECONDS: collections.Counter[str] = collections.Counter()
CALLS: collections.Counter[str] = collections.Counter()


def timed(module, name: str, label: str | None = None) -> None:
    """Replace ``module.name`` (a static method stays one) with a wrapper adding its wall time
    to SECONDS[label or name] and its calls to CALLS; a call made inside another call of the
    same function in the same thread (compile_fx calls itself) is not counted again. Calls in
    several threads at once (the tactics' parallel Triton compiles) each count: their sum
    exceeds the wall time they took."""
    original = getattr(module, name)
    label = label or name
    depth = threading.local()

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if getattr(depth, "n", 0):
            return original(*args, **kwargs)
        begin = time.perf_counter()
        depth.n = 1
        try:
            return original(*args, **kwargs)
        finally:
            depth.n = 0
            SECONDS[label] += time.perf_counter() - begin
            CALLS[label] += 1

    static = isinstance(inspect.getattr_static(module, name), staticmethod)
    setattr(module, name, staticmethod(wrapper) if static else wrapper)


def child_processes() -> int:
    """How many processes this one started (Inductor's compile workers, for one)."""
    me = str(os.getpid())
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                count += f.read().rsplit(")", 1)[1].split()[1] == me
        except OSError:
            continue
    return count


def sample_main_thread(every: float) -> None:
    """Print the main thread's innermost frames every ``every`` seconds (a daemon thread)."""
    main_id = threading.main_thread().ident

    def loop() -> None:
        while True:
            time.sleep(every)
            frame = sys._current_frames().get(main_id)
            stack = "".join(traceback.format_stack(frame)[-14:]) if frame else ""
            print(f"--- main thread at {time.strftime('%X')}\n{stack}", file=sys.stderr, flush=True)

    threading.Thread(target=loop, daemon=True).start()


def main(name: str, batch: int) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("kerasrt").setLevel(logging.INFO)  # the tactics' phases, on stderr
    if os.environ.get("STACKS_EVERY"):
        faulthandler.dump_traceback_later(float(os.environ["STACKS_EVERY"]), repeat=True)
    if os.environ.get("SAMPLE_EVERY"):
        sample_main_thread(float(os.environ["SAMPLE_EVERY"]))
    timed(compile_fx, "compile_fx")  # the engines' Inductor compiles (dynamo imports it per call)
    timed(triton.compiler.compiler, "compile")  # Inductor's Triton kernels (it calls this one)
    timed(triton.runtime.jit.JITFunction, "_do_compile")  # kerasrt's Triton kernels
    timed(program.CudaGraphRunner, "__init__")  # warm-up runs (compiling) and the capture
    timed(tactics, "precompile")  # Triton candidates and cuDNN runtime plans, in workers
    timed(tactics, "choose")  # every per-node choice, its compiling and timing included
    timed(tactics.Tuner, "measure")  # timing one family's configs on one node
    timed(tactics.Tuner, "inductor_ms")
    timed(merges, "merge")
    model = calibrated_application(name)  # as the suite's
    x = torch.randn(batch, 224, 224, 3, device="cuda")
    begin = time.perf_counter()
    optimized = kerasrt.Converter(model, precision_mode="FP16", batch_size=batch).convert()
    converted = time.perf_counter() - begin
    print(f"converted in {converted:.1f} s; first call", file=sys.stderr, flush=True)
    out = optimized(x)
    torch.cuda.synchronize()
    total = time.perf_counter() - begin
    reference = model(x).detach()  # Keras FP32
    error = float((out.float() - reference).abs().max() / reference.abs().max())
    latency = latency_stats(sample_latencies(lambda: optimized(x), x.device))  # as the suite times
    row = {
        "model": name,
        "batch": batch,
        "convert_s": round(converted, 1),
        "convert_and_first_call_s": round(total, 1),
        "error": float(f"{error:.2e}"),
        "p50_ms": latency["p50"],  # the engine built, per call
        "phases_s": {k: round(v, 1) for k, v in SECONDS.items()},
        "calls": dict(CALLS),
        "child_processes": child_processes(),
        "cache_dirs": {v: os.environ[v] for v in CACHE_VARIABLES},  # kept after exit (tactics)
    }
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ResNet50", int(sys.argv[2]) if len(sys.argv) > 2 else 1)
