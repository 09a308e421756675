"""keras_hub backbones (small configs, built offline from their constructor arguments) convert
without input shapes and match Keras at several batch sizes and sequence lengths from one
conversion."""

from __future__ import annotations

from collections.abc import Callable

import keras
import keras_hub
import numpy as np
import pytest

import kerasrt
from kerasrt_testing import FP32_ATOL, FP32_RTOL, assert_close, decode_step, randomize


def _text(batch: int, length: int, segments: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 1000 + length)
    lengths = rng.integers(1, length + 1, (batch, 1))
    inputs = {
        "token_ids": rng.integers(0, 100, (batch, length)).astype("int32"),
        "padding_mask": (np.arange(length)[None, :] < lengths).astype("int32"),
    }
    if segments:
        inputs["segment_ids"] = (np.arange(length)[None, :] >= lengths // 2).astype("int32")
    return inputs


def _images(batch: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(batch + height * width).random((batch, height, width, 3)).astype("float32")


TEXT_CONFIG = {
    "vocabulary_size": 100,
    "num_layers": 2,
    "num_heads": 2,
    "hidden_dim": 16,
    "intermediate_dim": 32,
    "max_sequence_length": 64,
}
"""A small text backbone (BERT's and GPT-2's constructors take the same arguments)."""

BACKBONES: dict[str, tuple[Callable[[], keras.Model], list]] = {
    "bert_encoder": (
        lambda: keras_hub.models.BertBackbone(**TEXT_CONFIG),
        [_text(1, 5, True), _text(3, 17, True), _text(2, 64, True)],
    ),
    "gpt2_decoder": (  # causal and padding masks
        lambda: keras_hub.models.GPT2Backbone(**TEXT_CONFIG),
        [_text(1, 4), _text(4, 23)],
    ),
    "vit": (
        lambda: keras_hub.models.ViTBackbone(
            image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
        ),
        [_images(1, 32, 32), _images(3, 32, 32)],
    ),
    "resnet": (  # image sizes of unknown height and width
        lambda: keras_hub.models.ResNetBackbone(
            input_conv_filters=[8],
            input_conv_kernel_sizes=[7],
            stackwise_num_filters=[64, 16],
            stackwise_num_blocks=[1, 1],
            stackwise_num_strides=[1, 2],
            block_type="bottleneck_block",
            image_shape=(None, None, 3),
        ),
        [_images(1, 32, 32), _images(2, 64, 48)],
    ),
}


def _outputs(result: object) -> list[np.ndarray]:
    if isinstance(result, dict):
        return [keras.ops.convert_to_numpy(v) for _, v in sorted(result.items())]
    return [
        keras.ops.convert_to_numpy(v) for v in (result if isinstance(result, (list, tuple)) else [result])
    ]


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_converts_without_shapes_and_matches_keras_at_every_shape(name: str) -> None:
    make, inputs = BACKBONES[name]
    keras.utils.set_random_seed(0)
    model = randomize(make())
    optimized = kerasrt.Converter(model, maximum_cached_engines=4).convert()
    assert [n.attrs["reason"] for s in optimized.sources for n in s.nodes if n.op == "keras_layer"] == []
    for x in inputs:
        want = _outputs(model(x))
        got = optimized(x)  # the model's outputs flattened (a dict's in the order of its keys)
        got = got if isinstance(got, list) else [got]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_close(g, w, rtol=FP32_RTOL, atol=FP32_ATOL)
    assert len(optimized.sources) == 1  # one import served every shape


def test_fp16_bert_stays_within_keras_mixed_precision_error() -> None:
    make, inputs = BACKBONES["bert_encoder"]
    keras.utils.set_random_seed(0)
    model = randomize(make())
    optimized = kerasrt.Converter(model, precision_mode="FP16").convert()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        mixed = make()
        mixed.set_weights(model.get_weights())
    finally:
        keras.config.set_dtype_policy("float32")
    for x in inputs[:2]:
        want = _outputs(model(x))[1]  # sequence_output (after pooled_output)
        ours = optimized(x)[1]
        theirs = _outputs(mixed(x))[1].astype(np.float32)
        scale = np.abs(want).max()
        assert np.abs(ours - want).max() <= max(2 * np.abs(theirs - want).max(), 1e-3 * scale)


def test_input_shapes_by_name_build_the_first_engine_at_convert() -> None:
    make, inputs = BACKBONES["bert_encoder"]
    model = randomize(make())
    x = inputs[1]  # batch 3, sequence 17
    shapes = {name: array.shape for name, array in x.items()}
    optimized = kerasrt.Converter(model, input_shapes=shapes).convert()
    assert optimized.engine_shapes == [tuple(x[name].shape for name in sorted(x))]  # inputs in model order
    for g, w in zip(optimized(x), _outputs(model(x))):
        assert_close(g, w, rtol=FP32_RTOL, atol=FP32_ATOL)
    with pytest.raises(kerasrt.ConversionError, match=r"no shape for \['token_ids'\]; its inputs are"):
        kerasrt.Converter(model, input_shapes={k: v for k, v in shapes.items() if k != "token_ids"})


def test_a_decode_step_with_a_kv_cache_converts_whole_and_matches_at_every_position() -> None:
    """GPT-2's one-token step: the position embedding is sliced and the cache written at a
    position read from an input tensor (a gather and an index_put at run time), so one
    conversion serves every position and batch."""
    keras.utils.set_random_seed(0)
    backbone = randomize(keras_hub.models.GPT2Backbone(**TEXT_CONFIG))
    model = decode_step(backbone, cache_length=32)
    rng = np.random.default_rng(0)

    def step_inputs(batch: int, position: int) -> list[np.ndarray]:
        return [
            rng.integers(0, 100, (batch, 1)).astype("int32"),
            rng.standard_normal((batch, 2, 2, 32, 2, 8)).astype("float32"),
            np.full((batch, 1), position, "int32"),
        ]

    optimized = kerasrt.Converter(model, maximum_cached_engines=3).convert()
    nodes = [n for s in optimized.sources for n in s.nodes]
    assert [n.attrs["reason"] for n in nodes if n.op == "keras_layer"] == []
    assert sum(n.op == "index_put" for n in nodes) == 4  # keys and values of two layers
    for batch, position in [(2, 5), (2, 31), (3, 0)]:
        x = step_inputs(batch, position)
        want = _outputs(model(x))
        got = optimized(*x)
        for g, w in zip(got, want):
            assert_close(g, w, rtol=FP32_RTOL, atol=FP32_ATOL)
        written = got[1][:, :, :, position]  # the new keys and values, at that position only
        assert not np.allclose(written, x[1][:, :, :, position])
        np.testing.assert_array_equal(np.delete(got[1], position, axis=3), np.delete(x[1], position, axis=3))


@pytest.mark.parametrize("name", ["bert_encoder", "gpt2_decoder"])
def test_attention_runs_as_one_op_and_a_fully_padded_sequence_matches_keras(name: str) -> None:
    make, _ = BACKBONES[name]
    keras.utils.set_random_seed(0)
    model = randomize(make())
    x = _text(3, 11, segments=name == "bert_encoder")
    x["padding_mask"][2] = 0  # a sequence of padding only: its queries attend to no key
    optimized = kerasrt.Converter(model).convert()
    got = optimized(x)
    for g, w in zip(got if isinstance(got, list) else [got], _outputs(model(x)), strict=True):
        assert_close(g, w, rtol=FP32_RTOL, atol=FP32_ATOL)
    ops = [n.op for n in optimized.primary_graph().nodes]
    assert ops.count("attention") == TEXT_CONFIG["num_layers"] and "softmax" not in ops
