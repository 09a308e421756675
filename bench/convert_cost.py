"""Cost of converting a model: wall time and the process's peak resident memory (CPU).

python bench/convert_cost.py [BATCH] [SIZE]    # ResNet50(weights=None) at SIZExSIZE, FP32
"""

from __future__ import annotations

import os
import resource
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras

import kerasrt


def main(batch: int, size: int) -> None:
    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classifier_activation=None)
    begin = time.perf_counter()
    kerasrt.Converter(model, batch_size=batch, device="cpu").convert()
    seconds = time.perf_counter() - begin
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"ResNet50 {size}x{size} batch {batch} FP32 on cpu: convert {seconds:.2f} s, peak RSS {peak:,.0f} MiB"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 32, int(sys.argv[2]) if len(sys.argv) > 2 else 128)
