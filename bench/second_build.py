"""Is a cold build slower when another model was built earlier in the same process?

In the fifteenth round's suite run, MobileNetV2's batch-1 build took 79.5 s after ResNet50's
systems had run in the process, against 25.9 s alone (H100). There the parent spent its
timing phases (``best_config`` 65.8 s, ``measure_depthwise`` 44.7 s, 2.9 s and 4.7 s alone)
in Triton's ``_do_compile`` and elsewhere, after the workers had compiled the kernels. This
builds FIRST then SECOND (batch 1, FP16, every cache empty as in ``build_phases``) in one
process and profiles the second convert (cProfile: where the time goes).

    source .whl/activate.sh && python bench/second_build.py [FIRST] [SECOND]

If the second build is as fast as alone, the slowdown needs more of the suite's context:
``python bench/suite.py --models ResNet50,MobileNetV2 --log`` shows its build phases.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import build_phases  # noqa: F401 (first: empty cache folders, CUDA's JIT cache off)
import torch

import kerasrt

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from kerasrt_testing import calibrated_application


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
    build(second, profile=True)
