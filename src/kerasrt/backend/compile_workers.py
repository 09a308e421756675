"""Compile Triton kernels in parallel worker processes, ahead of timing them.

The tactics time every config of kerasrt's Triton kernels on every eligible convolution, and
each config's first launch compiles it (Python front end, LLVM, ptxas: about a second each,
one after another). Here each worker is a fresh interpreter (``python -m
kerasrt.backend.compile_workers``, tasks as JSON on stdin: no pickle, no fork of a process
that holds a CUDA context, no re-import of the user's script) that launches its share of the
candidates once on empty tensors of the same shapes, strides and dtypes. Triton writes each
compiled kernel to its cache folder, which the workers share with this process
(``kerasrt.cache.share_with_triton``), so the timing that follows finds every kernel
compiled. Purely a speed-up: a task that fails or a worker that dies leaves its kernels to
be compiled in this process as before.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

WORKERS_VARIABLE = "KERASRT_COMPILE_WORKERS"
"""Environment variable: how many worker processes compile Triton candidates (0 or 1: none)."""

MIN_TASKS = 8
"""Fewer candidate compiles than this are not worth starting a worker (~5 s to import torch)."""

TIMEOUT_S = 900.0
"""A worker still running after this long is stopped (its kernels compile in this process)."""

Task = dict[str, Any]


def worker_count() -> int:
    """Workers to start: ``KERASRT_COMPILE_WORKERS``, else one per two cores, at most 8."""
    value = os.environ.get(WORKERS_VARIABLE)
    if value is not None:
        try:
            return max(0, int(value))
        except ValueError:
            raise ValueError(f"{WORKERS_VARIABLE} must be a whole number, got {value!r}") from None
    return min(8, (os.cpu_count() or 1) // 2)


def task(module: str, config: int, args: Sequence[Any]) -> Task:
    """One compile: ``module.launch(module.CONFIGS[config], *args)``, its tensors described by
    shape, strides and dtype (the worker makes empty ones alike: Triton specializes a kernel
    on dtypes, alignment and some integer values, never on tensor contents)."""
    return {"module": module, "config": config, "args": [_describe(a) for a in args]}


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "stride": list(value.stride()), "dtype": str(value.dtype)[6:]}
    if isinstance(value, tuple):
        return list(value)
    return value


def materialize(value: Any, device: torch.device) -> Any:
    """The argument a task describes: an empty tensor on ``device``, or the value itself."""
    if isinstance(value, dict) and "tensor" in value:
        dtype = getattr(torch, value["dtype"])
        return torch.empty_strided(value["tensor"], value["stride"], dtype=dtype, device=device)
    return value


def shares(tasks: Sequence[Task], workers: int) -> list[list[Task]]:
    """Tasks dealt to ``workers`` lists, duplicates dropped; tasks of one kernel config with
    the same dtypes and flags (most likely one compile, whatever the shapes) stay together,
    so two workers seldom compile the same kernel."""
    groups: dict[str, list[Task]] = defaultdict(list)
    seen: set[str] = set()
    for t in tasks:
        text = json.dumps(t, sort_keys=True)
        if text in seen:
            continue
        seen.add(text)
        flags = [a if not isinstance(a, dict) else a["dtype"] for a in t["args"] if not isinstance(a, list)]
        groups[json.dumps([t["module"], t["config"], flags])].append(t)
    dealt: list[list[Task]] = [[] for _ in range(max(1, workers))]
    for group in sorted(groups.values(), key=len, reverse=True):
        min(dealt, key=len).extend(group)
    return [share for share in dealt if share]


def compile_all(tasks: Sequence[Task], workers: int | None = None, device: str = "cuda") -> int:
    """Run ``tasks`` in worker processes (``worker_count()`` unless given) and wait for them;
    returns how many workers ran. Does nothing below ``MIN_TASKS`` tasks or two workers."""
    workers = worker_count() if workers is None else workers
    if workers < 2 or len(tasks) < MIN_TASKS:
        return 0
    dealt = shares(tasks, workers)
    begin = time.perf_counter()
    log.info("compiling %d Triton kernel candidates in %d processes", len(tasks), len(dealt))
    procs = []
    for share in dealt:
        proc = subprocess.Popen(
            [sys.executable, "-m", __name__, device],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append((proc, json.dumps(share)))
    for proc, text in procs:
        try:
            _, err = proc.communicate(text, timeout=max(1.0, TIMEOUT_S - (time.perf_counter() - begin)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            log.warning("a Triton compile worker ran past %.0f s and was stopped", TIMEOUT_S)
            continue
        if proc.returncode:
            log.warning("a Triton compile worker failed (exit %d): %s", proc.returncode, err.strip()[-500:])
    log.info("compiled in %.1f s", time.perf_counter() - begin)
    return len(dealt)


def run_tasks(tasks: Sequence[Task], device: torch.device) -> tuple[int, int]:
    """Launch each task once (compiling it); (tasks run, tasks that failed). A config that
    does not compile fails here as it does in the timing, which skips it."""
    failed = 0
    for t in tasks:
        module = importlib.import_module(t["module"])
        try:
            args = [materialize(a, device) for a in t["args"]]
            module.launch(module.CONFIGS[t["config"]], *args)
        except Exception as exc:  # not a candidate after all: the timing will say so too
            log.debug("compile task %s failed: %s", t, exc)
            failed += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(tasks), failed


def main() -> None:
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    run_tasks(json.load(sys.stdin), device)


if __name__ == "__main__":
    main()
