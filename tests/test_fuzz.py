"""Differential fuzzing: random valid Keras functional models through the frontend, every
optimizer pass and the torch backend must match Keras. A failure prints the model."""

from __future__ import annotations

import os

import keras
import numpy as np
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from keras import layers as L

import kerasrt
from kerasrt_testing import FP32_ATOL, FP32_RTOL, keras_reference, randomize

ACTIVATIONS = [None, "relu", "relu6", "swish", "sigmoid", "tanh", "gelu", "hard_swish"]


@st.composite
def functional_models(draw: st.DrawFn) -> tuple[keras.Model, str]:
    """A random DAG of image layers on an 8x8x3 input, with branches, merges and reshapes."""
    inp = keras.Input((8, 8, 3))
    tensors = [inp]
    lines = ["Input(8, 8, 3)"]
    for _ in range(draw(st.integers(2, 7))):
        src_i = draw(st.integers(0, len(tensors) - 1))
        x = tensors[src_i]
        kind = draw(
            st.sampled_from(["conv", "dwconv", "bn", "act", "add", "concat", "pool", "dense", "reshape"])
        )
        if kind == "conv":
            layer = L.Conv2D(
                draw(st.sampled_from([4, 8])),
                draw(st.sampled_from([1, 3])),
                padding="same",
                activation=draw(st.sampled_from(ACTIVATIONS)),
                use_bias=draw(st.booleans()),
            )
            y = layer(x)
        elif kind == "dwconv":
            layer = L.DepthwiseConv2D(3, padding="same", activation=draw(st.sampled_from(ACTIVATIONS)))
            y = layer(x)
        elif kind == "bn":
            layer = L.BatchNormalization()
            y = layer(x)
        elif kind == "act":
            layer = L.Activation(draw(st.sampled_from(ACTIVATIONS[1:])))
            y = layer(x)
        elif kind in ("add", "concat"):
            peers = [t for t in tensors if t.shape == x.shape] if kind == "add" else tensors
            other = peers[draw(st.integers(0, len(peers) - 1))]
            layer = L.Add() if kind == "add" else L.Concatenate()
            y = layer([x, other])
        elif kind == "pool":
            layer = draw(st.sampled_from([L.MaxPooling2D(3, 1, "same"), L.AveragePooling2D(3, 1, "same")]))
            y = layer(x)
        elif kind == "dense":
            layer = L.Dense(draw(st.sampled_from([4, 6])), activation=draw(st.sampled_from(ACTIVATIONS)))
            y = layer(x)
        else:
            layer = L.Reshape((8, 8, x.shape[-1]))
            y = layer(L.Reshape((64, x.shape[-1]))(x))
        tensors.append(y)
        lines.append(
            f"t{len(tensors) - 1} = {type(layer).__name__}({layer.get_config().get('activation', '')})"
            f"(t{src_i}) -> {tuple(y.shape)}"
        )
    outputs = [L.Dense(5)(L.GlobalAveragePooling2D()(tensors[-1]))]
    if draw(st.booleans()) and len(tensors) > 2:
        outputs.append(tensors[draw(st.integers(1, len(tensors) - 2))])
    return keras.Model(inp, outputs), "\n".join(lines)


EXAMPLES = int(os.environ.get("KERASRT_FUZZ_EXAMPLES", "40"))  # bounded in CI; raise it to hunt


@settings(
    max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 40, suppress_health_check=list(HealthCheck)
)
@given(functional_models(), st.integers(0, 2**16))
def test_random_models_match_keras(case: tuple[keras.Model, str], seed: int) -> None:
    model, description = case
    note(description)
    randomize(model, seed=seed)
    x = np.random.default_rng(seed).standard_normal((2, 8, 8, 3)).astype("float32")
    optimized = kerasrt.Converter(model, batch_size=2).convert()
    got = optimized(x)
    got = got if isinstance(got, list) else [got]
    for g, r in zip(got, keras_reference(model, [x])):
        err = float(np.max(np.abs(g - r)))
        assert err <= FP32_ATOL + FP32_RTOL * float(np.max(np.abs(r))), f"max abs err {err:.3g}"
