"""Shared test setup: Keras runs on its torch backend, and helpers for model weights."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np


def randomize_weights(model, seed: int = 0) -> None:
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
    for layer in model._flatten_layers(include_self=False, recursive=True):
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
