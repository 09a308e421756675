"""Basic CUDA check and timing for issue-2-level engines (FP32 torch programs, no compilation).

Converts keras.applications models at 224x224, checks outputs against Keras on the same
device, and times Keras eager (torch backend) against kerasrt with inputs on the device.
Writes a JSON summary to the path given as the first argument (default: stdout only).
Run on the GPU machine: source .whl/activate.sh && python bench/basic_gpu.py $OUT/basic.json
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np
import torch

import kerasrt
from kerasrt.bench import time_call


def run(name: str, make, batches: list[int]) -> list[dict]:
    model = make()
    rows = []
    for batch in batches:
        start = time.perf_counter()
        optimized = kerasrt.Converter(model, batch_size=batch, device="cuda").convert()
        build_s = time.perf_counter() - start
        x = torch.randn(batch, 224, 224, 3, device="cuda")
        with torch.no_grad():
            ref = keras.ops.convert_to_numpy(model(x, training=False))
        got = optimized(x).cpu().numpy()
        err = float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-12))
        keras_t = time_call("keras", lambda: model(x, training=False), warmup=3, iters=10)
        krt_t = time_call("kerasrt", lambda: optimized(x), warmup=3, iters=20)
        row = {
            "model": name, "batch": batch, "build_s": round(build_s, 2), "max_rel_err": err,
            "keras_eager_ms": round(keras_t.median_ms, 3), "kerasrt_ms": round(krt_t.median_ms, 3),
            "speedup": round(keras_t.median_ms / krt_t.median_ms, 2),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "keras", keras.__version__)
    rows = []
    rows += run("ResNet50", lambda: keras.applications.ResNet50(weights=None, classifier_activation=None), [1, 32])
    rows += run("MobileNetV2", lambda: keras.applications.MobileNetV2(weights=None, classifier_activation=None), [1, 32])
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
