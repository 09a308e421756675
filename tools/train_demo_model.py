"""Train the demo digits CNN embedded in ``kerasrt.demo``.

This script regenerates the demo model shipped in the package; kerasrt itself
never needs scikit-learn at run time.  It is a developer tool: scikit-learn is
only used here to load the small 8x8 handwritten digits data set that it ships
(no network access is needed).

Outputs (overwritten on each run):

* ``src/kerasrt/demo/digits_cnn.keras``: the trained Keras 3 model.  Its input
  is raw pixel values in ``[0, 16]`` as float32 with shape ``(8, 8, 1)``; the
  scaling to ``[0, 1]`` is done by a ``Rescaling`` layer inside the model.  The
  output is 10 logits (no softmax).
* ``src/kerasrt/demo/digits_test.npz``: the held-out test split, ``x`` as uint8
  ``(N, 8, 8, 1)`` and ``y`` as uint8 ``(N,)``.

Usage::

    python tools/train_demo_model.py
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import time
from pathlib import Path

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SEED = 0
TEST_SIZE = 0.2
EPOCHS = 30
BATCH_SIZE = 32
LEARNING_RATE = 3e-3

DEMO_DIR = Path(__file__).resolve().parents[1] / "src" / "kerasrt" / "demo"
MODEL_PATH = DEMO_DIR / "digits_cnn.keras"
DATA_PATH = DEMO_DIR / "digits_test.npz"


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x_train, x_test, y_train, y_test)`` as uint8 arrays.

    Images have shape ``(N, 8, 8, 1)`` with raw pixel values in ``[0, 16]``.
    """
    digits = load_digits()
    images = digits.images.astype(np.uint8)[..., np.newaxis]
    labels = digits.target.astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        labels,
        test_size=TEST_SIZE,
        random_state=SEED,
        stratify=labels,
    )
    return x_train, x_test, y_train, y_test


def build_model() -> keras.Model:
    """Build the small functional CNN (raw pixels in, 10 logits out)."""
    inputs = keras.Input(shape=(8, 8, 1), dtype="float32", name="pixels")
    x = keras.layers.Rescaling(1.0 / 16.0, name="rescale")(inputs)
    x = keras.layers.Conv2D(16, 3, padding="same", name="conv1")(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", name="conv3")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.Activation("relu", name="relu2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(0.2, name="dropout")(x)
    outputs = keras.layers.Dense(10, name="logits")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def main() -> None:
    """Train, evaluate and save the demo model and its test data."""
    keras.utils.set_random_seed(SEED)
    x_train, x_test, y_train, y_test = load_data()

    steps_per_epoch = -(-len(y_train) // BATCH_SIZE)
    schedule = keras.optimizers.schedules.CosineDecay(LEARNING_RATE, decay_steps=EPOCHS * steps_per_epoch)
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.summary()

    start = time.perf_counter()
    model.fit(
        x_train.astype("float32"),
        y_train,
        epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        shuffle=True,
        verbose=2,
    )
    train_seconds = time.perf_counter() - start

    logits = model.predict(x_test.astype("float32"), verbose=0)
    accuracy = float(np.mean(np.argmax(logits, axis=-1) == y_test))

    # Save an uncompiled, inference-only copy: the optimizer state would
    # more than double the file size and is useless to kerasrt.
    export = build_model()
    export.set_weights(model.get_weights())
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    export.save(MODEL_PATH)
    np.savez_compressed(DATA_PATH, x=x_test, y=y_test)

    print(f"train samples: {len(y_train)}, test samples: {len(y_test)}")
    print(f"training time: {train_seconds:.1f} s")
    print(f"saved {MODEL_PATH} ({MODEL_PATH.stat().st_size} bytes)")
    print(f"saved {DATA_PATH} ({DATA_PATH.stat().st_size} bytes)")
    print(f"test accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    main()
