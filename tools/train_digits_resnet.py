"""Train the ResNet-style digits model the quantization tests measure accuracy on.

A developer tool, like ``train_demo_model.py`` (whose train/test split it reuses: the test
images are the demo's ``digits_test.npz``): scikit-learn's 8x8 digits, upscaled to 32x32
inside the model (``UpSampling2D``), through a small ResNet (a 3x3 stem, three stages of two
basic blocks with BatchNormalization, 1x1 projection shortcuts at the strided ones, 16 / 32 / 64
channels), global pooling and a Dense classifier. Real trained weights and real data: the
FP16 and INT8 errors of a model whose activations have a trained model's scale.

Output (overwritten): ``tests/data/digits_resnet.keras`` (raw pixels in [0, 16] as float32,
shape (8, 8, 1); 10 logits out).

    python tools/train_digits_resnet.py
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import time
from pathlib import Path

import keras
import numpy as np
from train_demo_model import SEED, load_data

L = keras.layers
EPOCHS = 20
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
MODEL_PATH = Path(__file__).resolve().parents[1] / "tests" / "data" / "digits_resnet.keras"


def block(x, filters: int, stride: int, name: str):
    """A ResNet basic block: two 3x3 convolutions with BatchNormalization, the shortcut a 1x1
    projection where the shape changes."""
    y = L.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = L.ReLU(name=f"{name}_relu1")(L.BatchNormalization(name=f"{name}_bn1")(y))
    y = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = L.BatchNormalization(name=f"{name}_bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        x = L.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(x)
        x = L.BatchNormalization(name=f"{name}_proj_bn")(x)
    return L.ReLU(name=f"{name}_out")(L.Add(name=f"{name}_add")([x, y]))


def build_model() -> keras.Model:
    inputs = keras.Input(shape=(8, 8, 1), dtype="float32", name="pixels")
    x = L.Rescaling(1.0 / 16.0, name="rescale")(inputs)
    x = L.UpSampling2D(4, name="upscale")(x)
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(x)
    x = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(x))
    for stage, (filters, stride) in enumerate([(16, 1), (32, 2), (64, 2)], start=1):
        x = block(x, filters, stride, f"stage{stage}_block1")
        x = block(x, filters, 1, f"stage{stage}_block2")
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(10, name="logits")(x), name="digits_resnet")


def main() -> None:
    keras.utils.set_random_seed(SEED)
    x_train, x_test, y_train, y_test = load_data()
    steps = -(-len(y_train) // BATCH_SIZE)
    schedule = keras.optimizers.schedules.CosineDecay(LEARNING_RATE, decay_steps=EPOCHS * steps)
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    begin = time.perf_counter()
    model.fit(
        x_train.astype("float32"), y_train, epochs=EPOCHS, batch_size=BATCH_SIZE, shuffle=True, verbose=2
    )
    seconds = time.perf_counter() - begin
    logits = model.predict(x_test.astype("float32"), verbose=0)
    accuracy = float(np.mean(np.argmax(logits, axis=-1) == y_test))
    export = build_model()  # inference only: no optimizer state in the file
    export.set_weights(model.get_weights())
    MODEL_PATH.parent.mkdir(parents=True, exist_ok=True)
    export.save(MODEL_PATH)
    print(f"training time: {seconds:.1f} s; test accuracy: {accuracy:.4f}")
    print(f"saved {MODEL_PATH} ({MODEL_PATH.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
