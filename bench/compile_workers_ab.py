"""Do engines built with the compile workers run as fast as engines built the old way?

Three cold builds of one keras.applications model (``bench/build_phases.py``, each with
empty caches): with the compile workers, with threads (``KERASRT_COMPILE_WORKERS=0``), and
with the workers again (an order control). Then each built engine is timed in its own fresh
process, from its own build's caches (the tactic choices reused, nothing measured again),
in rotated order over several rounds, so that neither build order nor run order favours one.
Also: which tactic choices the builds differ in, and the GPU's memory in use while each cold
build ran (the workers' CUDA contexts included), sampled with nvidia-smi.

    source .whl/activate.sh && python bench/compile_workers_ab.py [MODEL] [BATCH] [ROUNDS]

Each line of stdout is one JSON record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILDS = {"workers": {}, "threads": {"KERASRT_COMPILE_WORKERS": "0"}, "workers-again": {}}

TIME_ENGINE = """
import json, logging, os, sys, time
import keras, torch, kerasrt
from kerasrt.bench import latency_stats, sample_latencies
sys.path.insert(0, sys.argv[3])
from kerasrt_testing import calibrated_application
model = calibrated_application(sys.argv[1])
x = torch.randn(int(sys.argv[2]), 224, 224, 3, device="cuda")
begin = time.perf_counter()
engine = kerasrt.Converter(model, precision_mode="FP16", batch_size=x.shape[0]).convert()
engine(x)
torch.cuda.synchronize()
built = time.perf_counter() - begin
stats = latency_stats(sample_latencies(lambda: engine(x), x.device, 50, 1000))
print(json.dumps({"rebuild_from_cache_s": round(built, 1), **stats}))
"""


def gpu_memory_mib() -> int | None:
    """The GPU's memory in use (all processes), from nvidia-smi."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return int(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def cold_build(model: str, batch: int, extra_env: dict[str, str]) -> dict:
    """``build_phases``' record of one cold build, with the peak GPU memory seen meanwhile."""
    peak = [gpu_memory_mib()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            used = gpu_memory_mib()
            if used is not None and (peak[0] is None or used > peak[0]):
                peak[0] = used

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    proc = subprocess.run(
        [sys.executable, str(HERE / "build_phases.py"), model, str(batch)],
        capture_output=True,
        text=True,
        env={**os.environ, **extra_env},
    )
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"the build failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    record["peak_gpu_memory_mib"] = peak[0]
    return record


def time_engine(model: str, batch: int, cache_dirs: dict[str, str]) -> dict:
    """Latency of the engine a build chose, in a fresh process reusing that build's caches."""
    proc = subprocess.run(
        [sys.executable, "-c", TIME_ENGINE, model, str(batch), str(HERE.parent / "tests")],
        capture_output=True,
        text=True,
        env={**os.environ, "KERAS_BACKEND": "torch", **cache_dirs},
    )
    if proc.returncode:
        raise SystemExit(f"timing failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def choices(cache_dir: str) -> dict[str, dict]:
    """The tactic choices a build stored (signature -> choice)."""
    (path,) = Path(cache_dir).glob("tactics-*.json")
    return json.loads(path.read_text())["choices"]


def differences(a: dict[str, dict], b: dict[str, dict]) -> list[dict]:
    """The signatures whose chosen kernel, cuDNN plan or Triton config differ."""
    fields = ("kernel", "plan", "config", "splitk_config")
    out = []
    for sig in sorted(a.keys() | b.keys()):
        ca, cb = a.get(sig, {}), b.get(sig, {})
        if any(ca.get(f) != cb.get(f) for f in fields):
            out.append(
                {"sig": sig[:90], "a": {f: ca.get(f) for f in fields}, "b": {f: cb.get(f) for f in fields}}
            )
    return out


def chosen_ms(table: dict[str, dict]) -> float:
    """The summed device ms the tactics measured for their chosen kernels (one call each)."""
    from kerasrt.backend.tactics import Choice

    return round(sum(Choice(**c).ms or 0.0 for c in table.values()), 4)


def main(model: str, batch: int, rounds: int) -> None:
    builds = {}
    for name, extra in BUILDS.items():
        record = cold_build(model, batch, extra)
        builds[name] = record
        keep = ("convert_and_first_call_s", "error", "p50_ms", "peak_gpu_memory_mib", "child_processes")
        print(json.dumps({"build": name, **{k: record.get(k) for k in keep}}), flush=True)
    tables = {name: choices(r["cache_dirs"]["KERASRT_CACHE_DIR"]) for name, r in builds.items()}
    for name, table in tables.items():
        print(
            json.dumps({"build": name, "choices": len(table), "chosen_ms_sum": chosen_ms(table)}), flush=True
        )
    names = list(builds)
    for other in names[1:]:
        diff = differences(tables[names[0]], tables[other])
        print(
            json.dumps({"a": names[0], "b": other, "differing_choices": len(diff), "first": diff[:12]}),
            flush=True,
        )
    p50s: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            begin = time.perf_counter()
            stats = time_engine(model, batch, builds[name]["cache_dirs"])
            p50s[name].append(stats["p50"])
            print(
                json.dumps(
                    {"round": r, "build": name, "wall_s": round(time.perf_counter() - begin, 1), **stats}
                ),
                flush=True,
            )
    print(json.dumps({"p50_ms_by_round": p50s}), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    main(
        args[0] if args else "EfficientNetB0",
        int(args[1]) if len(args) > 1 else 1,
        int(args[2]) if len(args) > 2 else 3,
    )
