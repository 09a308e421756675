"""Per-kernel GPU time of a model's JIT-built engines against its saved AOTInductor packages
(loaded in the same process), without CUDA graphs, so every kernel shows in the profile:
do the packages run the same kernels as fast?

    source .whl/activate.sh && python bench/package_profile.py [MODEL] [BATCH]
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "torch")


def kernel_times(model, x, calls: int = 10) -> dict[str, list[float]]:
    """{kernel name: [launches per call, GPU us per call]} over ``calls`` calls of ``model``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    model.settings = dataclasses.replace(model.settings, cuda_graphs=False)
    for _ in range(5):
        model(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            model(x)
        torch.cuda.synchronize()
    times: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = times[event.name[:70]]
            entry[0] += 1 / calls
            entry[1] += event.device_time_total / calls
    return times


def main() -> None:
    import torch

    import kerasrt

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from kerasrt_testing import calibrated_application, random_input

    name = sys.argv[1] if len(sys.argv) > 1 else "MobileNetV2"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    model = calibrated_application(name)
    x = torch.from_numpy(random_input((batch, 224, 224, 3))).cuda()
    conv = kerasrt.Converter(model, precision_mode="FP16", batch_size=batch)
    jit = conv.convert()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = kerasrt.load(conv.save(os.path.join(tmp, "art")))
        before, after = kernel_times(jit, x), kernel_times(loaded, x)
    for label, times in (("jit", before), ("package", after)):
        launches, us = (sum(v[i] for v in times.values()) for i in (0, 1))
        print(f"{label}: {launches:.0f} kernels, {us:.1f} us GPU time per call")
    print("launches    jit us | launches package us  kernel (largest difference first)")
    for kernel in sorted(set(before) | set(after), key=lambda k: -abs(after[k][1] - before[k][1]))[:30]:
        (n0, t0), (n1, t1) = before[kernel], after[kernel]
        print(f"{n0:8.1f} {t0:9.1f} | {n1:8.1f} {t1:10.1f}  {kernel}")


if __name__ == "__main__":
    main()
