"""Where a CUDA-graph call's time goes beyond the graph: kerasrt's whole call against its
pieces (the runner's input copy + replay + output copy, the bare replay), device time per call
as ``kerasrt bench`` measures it (CUDA events around each call; host work before the replay
shows up as the GPU waiting).

    source .whl/activate.sh && python bench/call_overhead.py [MODEL:BATCH ...]
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import torch

import kerasrt
from kerasrt.bench import latency_stats, sample_latencies


def probe(name: str, batch: int) -> dict:
    model = getattr(keras.applications, name)(weights=None, classifier_activation=None)
    optimized = kerasrt.Converter(model, precision_mode="FP16", batch_size=batch).convert()
    dev = torch.device("cuda")
    x = torch.randn(batch, 224, 224, 3, device=dev)
    optimized(x)
    runner = optimized.program(optimized.engine_shapes[0])._graph

    def runner_call() -> None:
        with torch.inference_mode():
            runner([x])

    pieces = {"call": lambda: optimized(x), "runner": runner_call, "replay": runner.graph.replay}
    row: dict = {"model": name, "batch": batch}
    for _ in range(2):  # two rounds: the second is reported, the first warms clocks
        for piece, fn in pieces.items():
            row[piece] = latency_stats(sample_latencies(fn, dev, warmup=20, iters=200))["p50"]
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    rows = [probe(s.split(":")[0], int(s.split(":")[1])) for s in sys.argv[1:] or ["ResNet50:1"]]
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "call_overhead.json"), "w") as fh:
            json.dump(rows, fh, indent=1)
