"""Where a cold convert + build goes: wall seconds per phase of converting a keras.applications
model (tactics: cuDNN plans, each Triton kernel's configs, Inductor's estimate; the engines'
compile on the first call), with every cache empty (fresh kerasrt, Triton and Inductor cache
folders and CUDA's JIT cache off).

    source .whl/activate.sh && python bench/build_phases.py [MODEL] [BATCH]
"""

from __future__ import annotations

import collections
import functools
import json
import os
import sys
import tempfile
import time

for variable in ("KERASRT_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
    os.environ[variable] = tempfile.mkdtemp(prefix=variable.lower())
os.environ["CUDA_CACHE_DISABLE"] = "1"
os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402 (after the cache folders are set)
import torch  # noqa: E402

import kerasrt  # noqa: E402
from kerasrt.backend import tactics  # noqa: E402

SECONDS: collections.Counter[str] = collections.Counter()
CALLS: collections.Counter[str] = collections.Counter()


def timed(module, name: str) -> None:
    """Replace ``module.name`` with a wrapper adding its wall time to SECONDS[name]."""
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            SECONDS[name] += time.perf_counter() - begin
            CALLS[name] += 1

    setattr(module, name, wrapper)


def main(name: str, batch: int) -> None:
    for phase in (
        "measure_cudnn",
        "_time_triton",
        "_time_splitk",
        "inductor_estimate_ms",
        "measure_depthwise",
        "choose",
    ):
        timed(tactics, phase)
    model = getattr(keras.applications, name)(weights=None, classifier_activation=None)
    x = torch.randn(batch, 224, 224, 3, device="cuda")
    begin = time.perf_counter()
    optimized = kerasrt.Converter(model, precision_mode="FP16", batch_size=batch).convert()
    converted = time.perf_counter() - begin
    optimized(x)
    torch.cuda.synchronize()
    total = time.perf_counter() - begin
    row = {
        "model": name,
        "batch": batch,
        "convert_s": round(converted, 1),
        "convert_and_first_call_s": round(total, 1),
        "phases_s": {k: round(v, 1) for k, v in SECONDS.items()},
        "calls": dict(CALLS),
    }
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ResNet50", int(sys.argv[2]) if len(sys.argv) > 2 else 1)
