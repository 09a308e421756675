"""Compiling kernels in worker processes, ahead of their timing: Triton's, and cuDNN's
runtime-compiled execution plans.

A cold build compiles hundreds of Triton candidates. In threads they contend for Python's
GIL, and more threads were no faster (BENCHMARKS.md has the measurements); processes compile
in parallel for real:

1. ``collect`` runs the launches (within ``op_library.precompiling()``, so each is a
   warm-up) with Triton's ``jit_cache_hook`` set. The hook sees each specialization a launch
   would compile, records it (Triton's own JSON of it) and tells Triton to skip compiling.
2. ``compile_requests`` hands the requests to worker processes. Each worker rebuilds the
   specialization with ``JITFunction.preload``, which compiles it into Triton's on-disk
   cache (``TRITON_CACHE_DIR``, inherited).
3. The parent's first real launch of each kernel finds its binary in that cache.

A request is any function of JSON values that returns one (``Request``): cuDNN builds the
plans of a conv + bias + SiLU graph by compiling them at run time (NVRTC), about 0.3 s a
plan with the GIL held, so the tactics have workers build and serialize them
(``cudnn_conv.serialized_plan``) and only deserialize and time them here. Those requests
need a CUDA context in the worker, so only a few workers take them (``GPU_WORKERS``).

Workers are fresh interpreters (``python -m kerasrt.backend.compile_pool``) fed one request
at a time over a pipe. They are not multiprocessing children, which would import the
user's ``__main__`` again. A few threads here take requests from the same queue (those
worth doing here: ``Request.here``), and do whatever a worker failed to or left undone
because it died.
``KERASRT_COMPILE_WORKERS`` sets how many workers may run. With 0, the Triton kernels compile
here in threads, and the cuDNN plans are built where they are timed, as before workers.
``KERASRT_COMPILE_GPU_WORKERS`` sets how many of them may build cuDNN plans, each holding about
0.55 GB of GPU memory while the build lasts; with 0, the plans are built where they are timed.
"""

from __future__ import annotations

import collections
import importlib
import json
import logging
import os
import select
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WORKERS_VARIABLE = "KERASRT_COMPILE_WORKERS"
MAX_WORKERS = 16
"""Workers at most, unless ``KERASRT_COMPILE_WORKERS`` asks for more (one per CPU core)."""
MIN_REQUESTS = 128
REQUESTS_PER_WORKER = 4
"""Workers start for ``MIN_REQUESTS`` or more requests, one per this many at most: starting
them takes seconds, so they pay off only for builds with about a hundred compiles or more
(BENCHMARKS.md, thirteenth to fifteenth rounds)."""
THREADS = 8
"""Threads compiling here when no worker runs (and for what no worker compiled)."""
THREADS_BESIDE_WORKERS = 4
"""Threads compiling here while workers run (they take the first requests as workers start)."""
GPU_WORKERS_VARIABLE = "KERASRT_COMPILE_GPU_WORKERS"
GPU_WORKERS = 8
"""Workers that take ``gpu`` requests, unless ``KERASRT_COMPILE_GPU_WORKERS`` says otherwise.
Each holds a CUDA context from its first such request on (about half a GB of GPU memory):
fewer of them keep a cold build's peak memory down at some cost in build time."""
REPLY_TIMEOUT_S = 600.0
"""A worker silent this long on one request is stopped; the request is then done here (if
``here``) or left undone."""


@dataclass(frozen=True)
class Request:
    """One piece of compiling: ``function`` ("module:qualname") called with ``args`` (JSON
    values), returning a JSON value (or None). ``here``: done in this process when no worker
    does it; otherwise it is left undone (its caller does the work its own way). ``gpu``: the
    worker doing it creates a CUDA context (a cuDNN handle), so only ``GPU_WORKERS`` of the
    workers take such requests (or the first ``KERASRT_COMPILE_GPU_WORKERS``)."""

    function: str
    args: tuple
    here: bool = True
    gpu: bool = False


def triton_request(module: str, name: str, specialization: str, device: int) -> Request:
    """Compile one specialization (Triton's JSON of it) of the Triton JIT function ``name`` of
    ``module`` for CUDA device ``device``."""
    return Request(f"{__name__}:preload", (module, name, specialization, device))


def preload(module: str, name: str, specialization: str, device: int) -> None:
    """Compile a Triton specialization into Triton's cache (and the kernel's in-memory one)."""
    kernel = _lookup(module, name)
    if device:
        import torch

        with torch.cuda.device(device):
            kernel.preload(specialization)
    else:
        kernel.preload(specialization)


def supported() -> bool:
    """Whether this Triton has what the pool needs: ``knobs.runtime.jit_cache_hook`` and
    ``JITFunction.preload`` (Triton 3.4 and later)."""
    try:
        import triton
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    return hasattr(runtime, "jit_cache_hook") and hasattr(JITFunction, "preload")


def collect(launches: Callable[[], None], runtime: Any = None) -> list[Request]:
    """What the Triton launches in ``launches`` would compile, in order, without duplicates,
    compiling none of it. ``launches`` runs in this thread; kernels launched by other threads
    meanwhile compile as usual. ``runtime``: Triton's ``knobs.runtime`` (a test's stand-in)."""
    if runtime is None:
        import triton

        runtime = triton.knobs.runtime
    found: dict[Request, None] = {}
    collecting = threading.get_ident()
    previous = runtime.jit_cache_hook

    def hook(**kwargs: Any) -> bool | None:
        if threading.get_ident() != collecting:
            return previous(**kwargs) if previous is not None else None
        fn, compile_ = kwargs["fn"], kwargs["compile"]
        request = triton_request(fn.module, fn.name, compile_["specialization_data"], int(compile_["device"]))
        found[request] = None
        return True  # recorded: Triton skips compiling it

    runtime.jit_cache_hook = hook
    try:
        launches()
    finally:
        runtime.jit_cache_hook = previous
    return list(found)


def worker_count(requests: int) -> int:
    """How many workers to start for ``requests`` compiles: one per CPU core this process may
    use (``MAX_WORKERS`` at most), or ``KERASRT_COMPILE_WORKERS``; none for fewer than
    ``MIN_REQUESTS``."""
    if requests < MIN_REQUESTS:
        return 0
    limit = _configured(WORKERS_VARIABLE, min(usable_cores(), MAX_WORKERS))
    return min(limit, requests // REQUESTS_PER_WORKER)


def _configured(variable: str, default: int) -> int:
    """The whole number in environment variable ``variable`` (0 at least), else ``default``."""
    configured = os.environ.get(variable, "").strip()
    if configured:
        try:
            return max(int(configured), 0)
        except ValueError:
            log.warning("ignoring %s=%r: not a whole number", variable, configured)
    return default


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS tells it)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def compile_requests(requests: Sequence[Request]) -> tuple[dict[Request, Any], int]:
    """Do ``requests``: in worker processes where there are enough to pay for their start,
    with threads here taking the ``here`` requests from the same queue meanwhile (the first
    ones while the workers start) and doing whatever a worker failed to; the ``gpu`` requests
    only in the first ``GPU_WORKERS`` workers (or here, if ``here``). Returns the
    results of the requests done, and how many workers ran. Failures are logged, not
    raised: a Triton kernel that does not compile fails again where it is launched, and the
    tactics drop that candidate."""
    requests = list(dict.fromkeys(requests))
    workers = worker_count(len(requests))

    def queue(takes: Callable[[Request], bool]) -> collections.deque[Request]:
        return collections.deque(r for r in requests if takes(r))

    only_gpu_workers = queue(lambda r: workers > 0 and r.gpu)
    only_workers = queue(lambda r: workers > 0 and not r.gpu and not r.here)
    shared = queue(lambda r: r.here and not (workers > 0 and r.gpu))
    gpu_workers = _configured(GPU_WORKERS_VARIABLE, GPU_WORKERS)
    results: dict[Request, Any] = {}
    failed: list[Request] = []
    environment: dict[str, str] = {}
    if workers:
        environment = _worker_environment()
        forget_compiler_version()
    threads = [
        threading.Thread(
            target=_serve,
            args=(
                (only_gpu_workers, only_workers, shared) if i < gpu_workers else (only_workers, shared),
                results,
                failed,
                environment,
            ),
            name=f"kerasrt-compile-worker-{i}",
        )
        for i in range(workers)
    ]
    local = THREADS_BESIDE_WORKERS if workers else THREADS
    threads += [
        threading.Thread(target=_drain, args=(shared, results), name=f"kerasrt-compile-{i}")
        for i in range(local)
    ]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException:  # Ctrl-C: let every thread stop after its current request
        for pending in (shared, only_workers, only_gpu_workers):
            pending.clear()
        raise
    redo = collections.deque(r for r in [*failed, *only_gpu_workers] if r.here)
    if redo:
        log.debug("doing %d request(s) here that no worker did", len(redo))
        _drain(redo, results, THREADS)
    return results, workers


def _serve(
    queues: tuple[collections.deque[Request], ...],
    results: dict[Request, Any],
    failed: list[Request],
    environment: dict[str, str],
) -> None:
    """Start a worker and feed it requests from ``queues`` (the first until empty, then the
    next) until none are left; its results go to ``results``, what it did not do to
    ``failed``."""
    try:
        worker = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=environment,
            text=True,
        )
    except OSError as exc:
        log.warning("cannot start a compile worker (%s); compiling in this process", exc)
        return
    try:
        while True:
            request = _next(queues)
            if request is None:
                return
            reply = _ask(worker, request)
            if reply is not None and reply.get("ok"):
                results[request] = reply.get("result")
                continue
            failed.append(request)
            log.debug("a worker did not do %s%s: %s", request.function, request.args[:2], reply)
            if reply is None:
                return  # the worker died or hung: the threads here drain the rest
    finally:
        _stop(worker)


def _next(queues: tuple[collections.deque[Request], ...]) -> Request | None:
    for queue in queues:
        try:
            return queue.popleft()
        except IndexError:
            continue
    return None


def _worker_environment() -> dict[str, str]:
    """This process's environment (Triton's cache folder included), with kerasrt importable."""
    environment = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the kerasrt package
    paths = [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment["PYTHONPATH"] = os.pathsep.join([root, *paths])
    try:
        import triton

        environment["TRITON_CACHE_DIR"] = str(triton.knobs.cache.dir)  # where this process looks
    except (ImportError, AttributeError):
        pass
    return environment


def forget_compiler_version(compiler: Any = None) -> None:
    """Make this process key Triton's disk cache by the ptxas its environment names now, as a
    fresh worker does. Triton puts the ptxas version in every cache key, looked up once per
    process (``get_ptxas_version`` and ``CUDABackend.hash`` are memoized), while Inductor
    points ``TRITON_PTXAS_PATH`` at torch's own ptxas on its first compile: a process that
    compiled a Triton kernel before that kept the old version in its keys, and every kernel
    its workers compiled then missed here and compiled again.
    ``compiler``: ``triton.backends.nvidia.compiler`` (a test's stand-in)."""
    if compiler is None:
        try:
            from triton.backends.nvidia import compiler
        except ImportError:
            return
    backend = getattr(compiler, "CUDABackend", None)
    for memoized in (getattr(compiler, "get_ptxas_version", None), getattr(backend, "hash", None)):
        clear = getattr(memoized, "cache_clear", None)
        if clear is not None:
            clear()


def _ask(worker: subprocess.Popen, request: Request) -> dict | None:
    """Send one request and wait for its reply; None when the worker died or stayed silent."""
    assert worker.stdin is not None and worker.stdout is not None
    try:
        worker.stdin.write(json.dumps({"function": request.function, "args": request.args}) + "\n")
        worker.stdin.flush()
        ready, _, _ = select.select([worker.stdout], [], [], REPLY_TIMEOUT_S)
        line = worker.stdout.readline() if ready else ""
    except (BrokenPipeError, OSError, ValueError):
        return None
    try:
        return json.loads(line) if line else None
    except json.JSONDecodeError:
        return None


def _stop(worker: subprocess.Popen) -> None:
    try:
        if worker.stdin is not None:
            worker.stdin.close()
        worker.wait(timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        worker.kill()
        worker.wait()


def _drain(queue: collections.deque[Request], results: dict[Request, Any], threads: int = 1) -> None:
    """Do requests from ``queue`` in this process until none are left, in ``threads``
    threads (a Triton compile here also fills the kernel's in-memory cache, as its launch
    would)."""
    if threads > 1:
        pool = [threading.Thread(target=_drain, args=(queue, results)) for _ in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        return
    while True:
        try:
            request = queue.popleft()
        except IndexError:
            return
        try:
            results[request] = run(request.function, request.args)
        except Exception as exc:  # a Triton launch meets it again and drops the candidate
            log.debug("%s%s failed: %s", request.function, request.args[:2], exc)


def run(function: str, args: Sequence[Any]) -> Any:
    """Call ``function`` ("module:qualname") with ``args``."""
    module, _, name = function.partition(":")
    return _lookup(module, name)(*args)


def _lookup(module: str, qualname: str) -> Any:
    """The object named ``qualname`` in ``module`` (imported)."""
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def serve_requests() -> None:
    """A worker's loop: one JSON request per line on stdin, one JSON reply per line on the
    original stdout. Anything the compilers print goes to stderr instead, never into the
    replies."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        try:
            request = json.loads(line)
            reply: dict[str, Any] = {"ok": True, "result": run(request["function"], request["args"])}
        except Exception as exc:  # reported to the parent, which may do it again
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve_requests()
