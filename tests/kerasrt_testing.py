"""Shared test helpers: non-trivial weights, Keras references, conversion checks."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import torch

import kerasrt

# Keras is the float32 reference: on CUDA, keep its convolutions and matmuls off TF32 too.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

FP32_RTOL = 1e-4
"""float32 tolerance: max abs error <= FP32_RTOL * max|Keras output| + FP32_ATOL."""
FP32_ATOL = 1e-5


def randomize(model: Any, seed: int = 0) -> Any:
    """Give BatchNorm statistics, scales and every bias non-trivial values.

    Fresh layers have identity BN statistics and zero biases, which hide wrong folding
    and wrong broadcasting; this sets them to modest random values.
    """
    rng = np.random.default_rng(seed)
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            for var in layer.weights:
                shape = tuple(var.shape)
                name = var.path.split("/")[-1]
                draw = {
                    "gamma": lambda s: rng.uniform(0.8, 1.2, s),
                    "beta": lambda s: rng.normal(0, 0.1, s),
                    "moving_mean": lambda s: rng.normal(0, 0.1, s),
                    "moving_variance": lambda s: rng.uniform(0.5, 1.5, s),
                }.get(name)
                if draw is not None:
                    var.assign(draw(shape).astype("float32"))
        else:
            for var in layer.weights:
                if var.path.split("/")[-1] == "bias":
                    var.assign(rng.normal(0, 0.05, tuple(var.shape)).astype("float32"))
    return model


def _all_layers(model: Any) -> list[Any]:
    layers = []
    for layer in getattr(model, "layers", []):
        layers.append(layer)
        if hasattr(layer, "layers"):
            layers.extend(_all_layers(layer))
    return layers or [model]


def random_input(shape: Sequence[int], seed: int = 1, dtype: str = "float32") -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype.startswith("int"):
        return rng.integers(0, 10, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def keras_reference(model: Any, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    args = inputs[0] if len(inputs) == 1 else list(inputs)
    out = model(args, training=False)
    return [np.asarray(keras.ops.convert_to_numpy(o)) for o in keras.tree.flatten(out)]


def assert_close(got: np.ndarray, ref: np.ndarray, rtol: float = FP32_RTOL, atol: float = FP32_ATOL) -> None:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err = float(np.max(np.abs(got.astype(np.float64) - ref))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    assert np.isfinite(err) and err <= atol + rtol * scale, f"max abs err {err:.3g} vs scale {scale:.3g}"


def fallbacks(optimized: Any) -> list[Any]:
    return [n for n in optimized.primary_graph().nodes if n.op == "keras_layer"]


def convert_and_check(
    model: Any,
    inputs: Sequence[np.ndarray],
    *,
    allow_fallback: bool = False,
    rtol: float = FP32_RTOL,
    **converter_kwargs: Any,
) -> Any:
    """Convert ``model`` at the inputs' shapes and assert it matches Keras; returns the result."""
    shapes = [x.shape for x in inputs]
    optimized = kerasrt.Converter(model, input_shapes=shapes, **converter_kwargs).convert()
    if not allow_fallback:
        assert not fallbacks(optimized), [(n.layer, n.attrs["reason"]) for n in fallbacks(optimized)]
    got = optimized(*inputs)
    got = got if isinstance(got, list) else [got]
    refs = keras_reference(model, inputs)
    assert len(got) == len(refs)
    for g, r in zip(got, refs):
        assert_close(g, r, rtol=rtol)
    return optimized
