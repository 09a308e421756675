"""Which kernel each convolution shape of a model got, with the timings that decided it.

source .whl/activate.sh && python bench/tactics_report.py MODEL[:BATCH] ...
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import torch

import kerasrt


def report(name: str, batch: int) -> list[dict]:
    model = getattr(keras.applications, name)(weights=None, classifier_activation=None)
    optimized = kerasrt.Converter(model, precision_mode="FP16", batch_size=batch).convert()
    optimized(torch.randn(batch, 224, 224, 3, device="cuda"))
    program = optimized.program(optimized.engine_shapes[0])
    rows = []
    for sig, choice in program.kernel_choices.items():
        row = {"model": name, "batch": batch, "signature": sig, **vars(choice)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    rows = []
    for spec in sys.argv[1:] or ["ResNet50:128"]:
        name, _, batch = spec.partition(":")
        rows += report(name, int(batch or 128))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "tactics_report.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
