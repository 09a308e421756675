"""Child process of ``kerasrt.bench``: Keras on the JAX backend under ``jax.jit`` (XLA).

Loads the model under the requested dtype policy, jits a stateless inference call, times it
after warm-up (``block_until_ready`` per call, wall clock) and writes the result as JSON plus
its outputs as .npy files next to the result. Usage: python -m kerasrt.bench_jax REQUEST_JSON
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time


def main(request: dict) -> None:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax
    import keras
    import numpy as np

    from kerasrt.bench import keras_with_policy, latency_stats
    from kerasrt.frontend.keras_adapter import call_inputs

    if keras.backend.backend() != "jax":
        raise SystemExit("kerasrt.bench_jax needs KERAS_BACKEND=jax")
    for module in request.get("imports", []):  # packages that register the model's classes
        importlib.import_module(module)
    model = keras.models.load_model(request["model"], compile=False, safe_mode=True)
    model = keras_with_policy(model, request["policy"])
    with np.load(request["inputs"], allow_pickle=False) as data:
        host = [data[f"arr_{i}"] for i in range(len(data.files))]
    device = jax.devices()[0]
    inputs = [jax.device_put(x, device) for x in host]
    params = [v.value for v in model.trainable_variables]
    state = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def infer(params, state, *xs):
        out, _ = model.stateless_call(params, state, call_inputs(model, xs), training=False)
        return out

    begin = time.perf_counter()
    out = jax.block_until_ready(infer(params, state, *inputs))
    build_s = time.perf_counter() - begin
    for _ in range(request["warmup"]):
        jax.block_until_ready(infer(params, state, *inputs))
    samples = []
    for _ in range(request["iters"]):
        t = time.perf_counter()
        jax.block_until_ready(infer(params, state, *inputs))
        samples.append((time.perf_counter() - t) * 1e3)
    outs = keras.tree.flatten(out)
    folder = os.path.dirname(request["out"])
    for i, o in enumerate(outs):
        np.save(os.path.join(folder, f"out{i}.npy"), np.asarray(o, dtype=np.float32))
    peak = None
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        peak = round(stats["peak_bytes_in_use"] / 2**20, 1)
    result = {
        "latency_ms": latency_stats(samples),
        "build_s": round(build_s, 2),
        "outputs": len(outs),
        "device": str(device.device_kind),
        "peak_memory_mb": peak,
    }
    with open(request["out"], "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
