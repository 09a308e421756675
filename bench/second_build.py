"""Is a cold build slower when another model was built earlier in the same process?

In the fifteenth round's suite run, MobileNetV2's batch-1 build took 79.5 s after ResNet50's
systems had run in the process, against 25.9 s alone (H100). There the parent spent its
timing phases (``best_config`` 65.8 s, ``measure_depthwise`` 44.7 s, 2.9 s and 4.7 s alone)
in Triton's ``_do_compile`` and elsewhere, after the workers had compiled the kernels. This
builds FIRST then SECOND (batch 1, FP16, every cache empty as in ``build_phases``) in one
process. Each build prints what it spent in the garbage collector (by generation), in Triton's
``compile`` (a disk-cache hit returns early), in its backend's stages (``make_cubin`` runs
ptxas: a miss), in building launchers with gcc (a miss) and in loading them, and which ptxas
the parent's cache keys name. ``PROFILE=1`` also profiles the second convert.

    source .whl/activate.sh && python bench/second_build.py [FIRST] [SECOND]

Found with it (sixteenth round): the parent ran ptxas for all 173 kernels its workers had
compiled, because it still keyed kernels by the ptxas it used before Inductor repointed
``TRITON_PTXAS_PATH`` (105.7 s); ``compile_pool.forget_compiler_version`` fixed it (29.9 s).
"""

from __future__ import annotations

import cProfile
import gc
import io
import json
import os
import pstats
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import build_phases  # first: empty cache folders, CUDA's JIT cache off
import torch
import triton.backends.nvidia.compiler
import triton.compiler
import triton.compiler.compiler
import triton.runtime.build

import kerasrt

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from kerasrt_testing import calibrated_application

SECONDS, CALLS = build_phases.SECONDS, build_phases.CALLS  # what ``build_phases.timed`` adds to
_GC_BEGIN: dict[int, float] = {}


def gc_callback(phase: str, info: dict) -> None:
    """Time each collection (the callback runs in the collecting thread, GIL held)."""
    key = threading.get_ident()
    if phase == "start":
        _GC_BEGIN[key] = time.perf_counter()
    elif key in _GC_BEGIN:
        label = f"gc{info['generation']}"
        SECONDS[label] += time.perf_counter() - _GC_BEGIN.pop(key)
        CALLS[label] += 1


build_phases.timed(triton.compiler, "compile", "compile_jit")  # kerasrt's kernels (JITFunction binds it)
build_phases.timed(triton.compiler.compiler, "compile", "compile_inductor")  # Inductor calls this one
backend = triton.backends.nvidia.compiler.CUDABackend
for stage in ("make_ttir", "make_ptx", "make_cubin"):
    build_phases.timed(backend, stage)
build_phases.timed(triton.runtime.build, "_build", "gcc_build")  # a launcher or utility missing on disk
build_phases.timed(triton.runtime.build, "_load_module_from_path", "module_load")  # each launcher's dlopen
gc.callbacks.append(gc_callback)


def build(name: str, profile: bool) -> None:
    """Convert ``name`` at batch 1 (FP16) and run it once; print the times (and the profile)."""
    model = calibrated_application(name)
    x = torch.randn(1, 224, 224, 3, device="cuda")
    profiler = cProfile.Profile() if profile else None
    begin = time.perf_counter()
    if profiler:
        profiler.enable()
    engine = kerasrt.Converter(model, precision_mode="FP16", batch_size=1).convert()
    if profiler:
        profiler.disable()
    converted = time.perf_counter() - begin
    engine(x)
    torch.cuda.synchronize()
    print(
        f"{name}: convert {converted:.1f} s, with the first call {time.perf_counter() - begin:.1f} s",
        flush=True,
    )
    seconds = {k: round(v, 2) for k, v in SECONDS.items()}
    print(json.dumps({"model": name, "seconds": seconds, "calls": dict(CALLS)}), flush=True)
    print(f"objects tracked by the collector: {len(gc.get_objects())}", flush=True)
    ptxas = triton.backends.nvidia.compiler.get_ptxas_version(90).split("\n")[-2:]
    print(f"TRITON_PTXAS_PATH={os.environ.get('TRITON_PTXAS_PATH')}; keyed by {ptxas}", flush=True)
    SECONDS.clear()
    CALLS.clear()
    if profiler:
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(20)
        stats.sort_stats("cumulative").print_stats(30)
        print(text.getvalue(), flush=True)


if __name__ == "__main__":
    first = sys.argv[1] if len(sys.argv) > 1 else "ResNet50"
    second = sys.argv[2] if len(sys.argv) > 2 else "MobileNetV2"
    build(first, profile=False)
    build(second, profile=bool(os.environ.get("PROFILE")))
