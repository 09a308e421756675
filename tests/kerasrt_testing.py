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
    batch (momentum 0, dropout off) measures the batch statistics of every BN input;
    moving_mean becomes the measured mean and moving_variance the measured variance times
    U(1, 1.5). Why: a deep network from ``weights=None`` (Glorot kernels) shrinks the
    input's signal at every layer until its output hardly depends on the input
    (MobileNet's logits for two random images differ by 1e-7 of their size, so comparing
    them proves nothing). Exact batch statistics overshoot the other way: every layer then
    amplifies small differences, float32 rounding included (ResNet101's own float32 logits
    are 1e-3 off float64 ones), and factors below 1 compound the same way (EfficientNetV2L's
    logits reach 1e12). The U(1, 1.5) damping keeps the logits input-dependent (two images
    differ by more than 1e-2 of the logit scale) while float32 stays within 2e-5 of float64.
    """
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
    for layer in batch_norms:
        var = keras.ops.convert_to_numpy(layer.moving_variance)
        layer.moving_variance.assign((var * rng.uniform(1.0, 1.5, var.shape)).astype(var.dtype))


def randomize(model: Any, seed: int = 0, calibration: np.ndarray | None = None) -> Any:
    """``randomize_weights`` that returns the model (handy inline)."""
    randomize_weights(model, seed, calibration)
    return model


def random_input(shape: Sequence[int], seed: int = 1, dtype: str = "float32") -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype.startswith("int"):
        return rng.integers(0, 10, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _nasnet_mobile(**kwargs: Any) -> Any:
    """NASNetMobile through the generic ``NASNet`` constructor with exactly the arguments
    ``keras.applications.NASNetMobile`` passes: on the torch backend Keras refuses to build it
    ("not available with the torch backend ... due to an outstanding bug") although it runs
    the model fine."""
    from keras.src.applications import nasnet

    return nasnet.NASNet(
        penultimate_filters=1056,
        num_blocks=4,
        stem_block_filters=32,
        skip_reduction=False,
        filter_multiplier=2,
        default_size=224,
        name="nasnet_mobile",
        **kwargs,
    )


def application(name: str, size: int | None = None) -> Any:
    """keras.applications' architecture ``name`` with ``weights=None`` and logits out, at
    ``size`` x ``size`` images (None: the architecture's default resolution)."""
    ctor = getattr(keras.applications, name)
    if name == "NASNetMobile" and keras.backend.backend() == "torch":
        ctor = _nasnet_mobile
    kwargs: dict[str, Any] = {"weights": None}
    if size is not None:
        kwargs["input_shape"] = (size, size, 3)
    try:
        return ctor(classifier_activation=None, **kwargs)
    except TypeError:  # a constructor without classifier_activation
        return ctor(**kwargs)


@keras.saving.register_keras_serializable("kerasrt_testing")
class DecodeStep(keras.layers.Layer):
    """One generation step of a keras_hub causal LM with its KV cache: (token ids of shape
    (batch, 1), cache, write position of shape (batch, 1)) -> (logits, updated cache), through
    the LM's ``call_with_cache`` (every row at the first row's position, as keras_hub's
    ``generate`` runs a batch)."""

    def __init__(self, lm: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.lm = lm if isinstance(lm, keras.Model) else keras.saving.deserialize_keras_object(lm)

    def call(self, token_ids: Any, cache: Any, index: Any) -> tuple[Any, Any]:
        logits, _, cache = self.lm.call_with_cache(token_ids, cache, index[0, 0])
        return logits, cache

    def compute_output_spec(self, token_ids: Any, cache: Any, index: Any) -> tuple[Any, Any]:
        """Declared, not traced: Keras's torch backend would run the step on CPU tensors with
        the batch set to 83 (the cache's ``.item()`` fails on its meta device), gigabytes for
        a real cache."""
        vocabulary = self.lm.backbone.token_embedding.input_dim
        logits = keras.KerasTensor((*token_ids.shape[:2], vocabulary), dtype=self.compute_dtype)
        return logits, keras.KerasTensor(cache.shape, dtype=cache.dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "lm": keras.saving.serialize_keras_object(self.lm)}


def decode_step(backbone: Any, cache_length: int) -> Any:
    """A functional model of one decode step of a keras_hub decoder ``backbone`` (GPT-2 and
    its kin: ``num_layers``, ``num_heads``, ``hidden_dim``) with a cache of ``cache_length``
    positions: inputs token_ids (batch, 1) int32, cache (batch, layers, 2, cache_length,
    heads, head size), index (batch, 1) int32."""
    import keras_hub

    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    heads = backbone.num_heads
    shape = (backbone.num_layers, 2, cache_length, heads, backbone.hidden_dim // heads)
    token_ids = keras.Input((1,), dtype="int32", name="token_ids")
    cache = keras.Input(shape, name="cache")
    index = keras.Input((1,), dtype="int32", name="index")
    logits, updated = DecodeStep(lm)(token_ids, cache, index)
    return keras.Model([token_ids, cache, index], [logits, updated], name="decode_step")


def calibrated_application(name: str) -> Any:
    """keras.applications' model ``name`` (224x224 images in, logits out) with random weights
    calibrated as a trained network's (``randomize_weights``): fresh weights give logits of
    1e-8 to 1e-11, which FP16 flushes to 0. The benchmarks' image models."""
    return randomize(application(name, 224), calibration=random_input((16, 224, 224, 3)))


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
