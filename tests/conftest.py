"""Shared test setup: Keras runs on its torch backend, and helpers for model weights."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("KERASRT_CHECK_PASSES", "1")  # verify(graph) after every optimizer pass

import numpy as np


def randomize_weights(model, seed: int = 0, calibration=None) -> None:
    """Give ``model`` non-trivial normalization statistics, scales and biases, in place.

    Freshly built Keras models have BatchNormalization at mean 0 / variance 1 / gamma 1 /
    beta 0 and zero biases, which hides any lowering that drops or misapplies them. This
    draws, per variable (the scale is modest so deep nets stay finite):

    * BatchNormalization: moving_mean ~ N(0, 0.1), moving_variance ~ U(0.5, 1.5),
      gamma ~ U(0.8, 1.2), beta ~ N(0, 0.1);
    * LayerNormalization / GroupNormalization: gamma ~ U(0.8, 1.2), beta ~ N(0, 0.1);
    * ConvNeXt's LayerScale (initialized at 1e-6, which would hide its whole residual
      branch under any tolerance): U(0.8, 1.2);
    * every other variable named ``bias``: N(0, 0.05).

    ``calibration``, a batch of typical inputs, gives BatchNormalization the statistics of
    a trained network instead: after the draws above, one training-mode pass over that
    batch (momentum 0, dropout off) sets every moving_mean / moving_variance to the batch
    statistics of its input, so each normalizes to gamma * N(0, 1) + beta. Without it a
    deep network from ``weights=None`` (Glorot kernels) shrinks the input's signal at every
    layer until its output hardly depends on the input: MobileNet's logits for two random
    images differ by 1e-7 of their size, so comparing them proves nothing. The measured
    statistics are not perturbed afterwards: that would be gamma/beta noise again, except
    that it compounds layer over layer (EfficientNetV2L's logits reach 1e12).
    """
    import keras

    rng = np.random.default_rng(seed)
    draws = {
        "moving_mean": lambda shape: rng.normal(0.0, 0.1, shape),
        "moving_variance": lambda shape: rng.uniform(0.5, 1.5, shape),
        "gamma": lambda shape: rng.uniform(0.8, 1.2, shape),
        "beta": lambda shape: rng.normal(0.0, 0.1, shape),
    }
    norms = (
        keras.layers.BatchNormalization,
        keras.layers.LayerNormalization,
        keras.layers.GroupNormalization,
    )
    layers = list(model._flatten_layers(include_self=False, recursive=True))
    for layer in layers:
        is_norm = isinstance(layer, norms)
        is_scale = type(layer).__name__ == "LayerScale"
        for var in layer._trainable_variables + layer._non_trainable_variables:
            name = var.path.split("/")[-1]
            if is_norm and name in draws:
                value = draws[name](tuple(var.shape))
            elif is_scale:
                value = draws["gamma"](tuple(var.shape))
            elif name == "bias":
                value = rng.normal(0.0, 0.05, tuple(var.shape))
            else:
                continue
            var.assign(value.astype(var.dtype))
    if calibration is None:
        return
    batch_norms = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    dropouts = [
        layer
        for layer in layers
        if isinstance(layer, (keras.layers.Dropout, keras.layers.GaussianDropout, keras.layers.AlphaDropout))
    ]
    saved = [(layer, "momentum", layer.momentum) for layer in batch_norms]
    saved += [(layer, "rate", layer.rate) for layer in dropouts]
    try:
        for layer, attr, _ in saved:
            setattr(layer, attr, 0.0)
        model(calibration, training=True)
    finally:
        for layer, attr, value in saved:
            setattr(layer, attr, value)


# Keras is the float32 reference: on CUDA, keep its convolutions and matmuls off TF32 too
# (kerasrt's FP32 engines never use TF32).
import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
