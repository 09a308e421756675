"""Throughput by batch size: is a large batch faster run whole or as smaller batches in turn?

At batch 128 ResNet50's first-stage tensors are 196 MiB each and its 1x1 convolutions run at
HBM's traffic floor. A smaller batch's tensors fit in the H100's 50 MB L2, so running a batch
of 128 as 4 batches of 32 (each an engine call; the calls' inputs are views of the batch) can
be faster if the kernels keep their efficiency at the smaller batch. This converts each model
at each batch B (FP16, caches as they are) and times a whole batch of the largest size run as
its chunks of B in turn, as a chunked engine would (each chunk a view of one input tensor).
Each row also counts the engine's merged kernels by kind (``merges.KINDS``), which makes it
the A/B script for merges: run it with another commit's ``src`` first on ``PYTHONPATH``.

    source .whl/activate.sh && python bench/batch_scaling.py [MODEL,...] [BATCH,...]

Sixteenth round (H100, ResNet50): 26,463 img/s in chunks of 16, 31,522 of 32, 35,361 of 64,
38,443 whole: chunking does not pay.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time

import torch

import kerasrt
from kerasrt.backend import merges
from kerasrt.bench import latency_stats, sample_latencies

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from kerasrt_testing import calibrated_application


def chunked_p50_ms(engine, chunks: tuple[torch.Tensor, ...]) -> float:
    """Median device milliseconds of one engine call per chunk, in turn."""
    return latency_stats(
        sample_latencies(lambda: [engine(chunk) for chunk in chunks], chunks[0].device, iters=100)
    )["p50"]


def main(models: list[str], batches: list[int]) -> None:
    for name in models:
        model = calibrated_application(name)
        whole = torch.randn(max(batches), 224, 224, 3, device="cuda")
        for batch in batches:
            chunks = whole.split(batch)
            x = chunks[0]
            begin = time.perf_counter()
            engine = kerasrt.Converter(model, precision_mode="FP16", batch_size=batch).convert()
            engine(x)
            torch.cuda.synchronize()
            built = time.perf_counter() - begin
            p50 = chunked_p50_ms(engine, chunks)
            program = engine.program(engine.engine_shapes[0])
            merged = collections.Counter(k.partition(":")[0] for k in program.kernel_convs.values())
            row = {"model": name, "chunk": batch, "chunks": len(chunks), "build_s": round(built, 1)}
            row["merged"] = {kind: merged[kind] for kind in merges.KINDS}
            row |= {"p50_ms": p50, "img_per_s": round(len(whole) / p50 * 1e3)}
            print(json.dumps(row), flush=True)
            del engine
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(
        (sys.argv[1] if len(sys.argv) > 1 else "ResNet50").split(","),
        [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "16,32,64,128").split(",")],
    )
