"""Where kerasrt's GPU memory goes at one batch size: allocated after each build stage.

source .whl/activate.sh && python bench/memory_probe.py [BATCH]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import torch

import kerasrt


def mib(x: int) -> str:
    return f"{x / 2**20:,.0f} MiB"


def main(batch: int) -> None:
    model = keras.applications.ResNet50(weights=None, classifier_activation=None)
    x = torch.randn(batch, 224, 224, 3, device="cuda")
    for graphs in (False, True):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        optimized = kerasrt.Converter(
            model, precision_mode="FP16", batch_size=batch, cuda_graphs=graphs
        ).convert()
        torch.cuda.synchronize()
        print(
            f"cuda_graphs={graphs}: after convert {mib(torch.cuda.memory_allocated() - base)}, "
            f"peak {mib(torch.cuda.max_memory_allocated() - base)}"
        )
        torch.cuda.reset_peak_memory_stats()
        optimized(x)
        torch.cuda.synchronize()
        print(
            f"  after first call {mib(torch.cuda.memory_allocated() - base)}, "
            f"peak {mib(torch.cuda.max_memory_allocated() - base)}"
        )
        torch.cuda.reset_peak_memory_stats()
        optimized(x)
        torch.cuda.synchronize()
        print(
            f"  steady call: allocated {mib(torch.cuda.memory_allocated() - base)}, "
            f"peak {mib(torch.cuda.max_memory_allocated() - base)}"
        )
        del optimized
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 128)
