"""Accuracy of post-training quantization on real data: models trained on scikit-learn's
digits (the embedded demo CNN, and the ResNet-style ``tests/data/digits_resnet.keras`` that
sees them upscaled to 32x32) calibrated on held-out images and tested on the rest, at every
precision and calibrator, against Keras FP32.

    python bench/quantization.py [--models PATH,...] [--calibration 120] [--device cpu]

Prints one row per (precision, calibrator): top-1 accuracy, its drop from Keras FP32,
top-1 agreement with Keras, the largest output error relative to the output scale, and the
convert time (calibration included).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np

import kerasrt
from kerasrt.demo import DATA_PATH, MODEL_PATH
from kerasrt.quantization.calibrators import CALIBRATORS

RESNET_PATH = Path(__file__).resolve().parents[1] / "tests" / "data" / "digits_resnet.keras"

VARIANTS = (
    [("FP16", None)]
    + [("INT8", c) for c in CALIBRATORS]
    + [("FP8", c) for c in CALIBRATORS if c != "entropy"]
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=f"{MODEL_PATH},{RESNET_PATH}", help="comma-separated .keras files"
    )
    parser.add_argument("--calibration", type=int, default=120, help="images calibrated on (the rest tested)")
    parser.add_argument("--batch", type=int, default=40)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    data = np.load(DATA_PATH)
    x, y = data["x"].astype("float32"), data["y"]
    for path in args.models.split(","):
        measure(Path(path), x, y, args)


def measure(path: Path, x: np.ndarray, y: np.ndarray, args: argparse.Namespace) -> None:
    """One row per precision and calibrator for the model at ``path``."""
    calib, test_x, test_y = x[: args.calibration], x[args.calibration :], y[args.calibration :]
    reference = np.asarray(keras.saving.load_model(path).predict(test_x, verbose=0))
    fp32 = (reference.argmax(-1) == test_y).mean()
    print(
        f"\n{path.name}: {len(calib)} calibration / {len(test_x)} test images; Keras FP32 top-1 {100 * fp32:.2f}%"
    )
    print(
        f"{'precision':<9} {'calibrator':<11} {'top-1 %':>8} {'drop pt':>8} {'agree %':>8} {'rel err':>8} {'s':>6}"
    )
    for precision, calibrator in VARIANTS:
        begin = time.perf_counter()
        converter = kerasrt.Converter(
            path, precision_mode=precision, calibrator=calibrator, batch_size=args.batch, device=args.device
        )
        batches = (
            [calib[i : i + args.batch] for i in range(0, len(calib), args.batch)] if calibrator else None
        )
        model = converter.convert(calibration_input_fn=batches)
        seconds = time.perf_counter() - begin
        out = model.predict(test_x, batch_size=args.batch)
        top1 = (out.argmax(-1) == test_y).mean()
        agree = (out.argmax(-1) == reference.argmax(-1)).mean()
        error = np.abs(out - reference).max() / np.abs(reference).max()
        print(
            f"{precision:<9} {calibrator or '-':<11} {100 * top1:>8.2f} {100 * (fp32 - top1):>8.2f} "
            f"{100 * agree:>8.2f} {error:>8.1e} {seconds:>6.2f}"
        )


if __name__ == "__main__":
    main()
