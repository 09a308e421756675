"""Per-layer lowerings: each Keras layer, converted alone, matches Keras on random inputs.

Every case asserts the layer was really lowered into IR ops (no Keras fallback).
Tolerance: float32, max abs error <= 1e-4 * max|output| + 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import pytest

from kerasrt_testing import assert_close, convert_and_check, keras_reference, random_input, randomize

L = keras.layers

# (id, layer factory, input shape without batch)
CASES: list[tuple[str, Callable[[], Any], tuple[int, ...]]] = [
    ("conv2d_same", lambda: L.Conv2D(8, 3, padding="same"), (9, 9, 4)),
    ("conv2d_valid_stride2", lambda: L.Conv2D(8, 3, strides=2), (11, 11, 4)),
    ("conv2d_same_stride2_even", lambda: L.Conv2D(6, 3, strides=2, padding="same"), (10, 10, 3)),
    ("conv2d_dilated", lambda: L.Conv2D(5, 3, dilation_rate=2, padding="same"), (12, 12, 3)),
    ("conv2d_groups", lambda: L.Conv2D(8, 3, groups=2, padding="same"), (8, 8, 4)),
    ("conv2d_nobias_relu", lambda: L.Conv2D(8, (1, 3), use_bias=False, activation="relu"), (7, 7, 3)),
    ("conv2d_rect_kernel_stride", lambda: L.Conv2D(4, (3, 5), strides=(1, 2), padding="same"), (9, 10, 2)),
    ("conv1d_causal", lambda: L.Conv1D(6, 3, padding="causal", activation="tanh"), (12, 4)),
    ("conv1d_stride", lambda: L.Conv1D(6, 4, strides=2), (15, 3)),
    ("conv3d", lambda: L.Conv3D(4, 3, padding="same"), (6, 6, 6, 2)),
    ("conv2d_transpose", lambda: L.Conv2DTranspose(5, 3, strides=2, padding="same"), (6, 6, 4)),
    ("conv2d_transpose_valid", lambda: L.Conv2DTranspose(5, 4, strides=2), (5, 5, 3)),
    ("conv1d_transpose", lambda: L.Conv1DTranspose(4, 3, strides=2, padding="same"), (8, 3)),
    ("depthwise", lambda: L.DepthwiseConv2D(3, padding="same"), (8, 8, 6)),
    ("depthwise_mult_stride", lambda: L.DepthwiseConv2D(3, strides=2, depth_multiplier=2), (9, 9, 3)),
    ("separable", lambda: L.SeparableConv2D(8, 3, padding="same", activation="relu"), (8, 8, 4)),
    ("separable_mult", lambda: L.SeparableConv2D(6, 3, depth_multiplier=2, strides=2), (9, 9, 3)),
    ("dense", lambda: L.Dense(7), (5,)),
    ("dense_3d_gelu", lambda: L.Dense(7, activation="gelu"), (4, 5)),
    ("dense_nobias_softmax", lambda: L.Dense(6, use_bias=False, activation="softmax"), (5,)),
    ("einsum_dense", lambda: L.EinsumDense("abc,cd->abd", output_shape=(None, 6), bias_axes="d"), (4, 5)),
    ("batchnorm", lambda: L.BatchNormalization(), (6, 6, 5)),
    ("batchnorm_axis1", lambda: L.BatchNormalization(axis=1), (5, 6, 6)),
    ("batchnorm_noscale", lambda: L.BatchNormalization(center=False, scale=False), (7,)),
    ("layernorm", lambda: L.LayerNormalization(), (4, 8)),
    ("layernorm_axes", lambda: L.LayerNormalization(axis=[-2, -1]), (4, 6, 3)),
    ("layernorm_noscale", lambda: L.LayerNormalization(center=False, scale=False, epsilon=1e-3), (4, 8)),
    ("groupnorm", lambda: L.GroupNormalization(groups=2), (5, 5, 4)),
    ("unitnorm", lambda: L.UnitNormalization(), (6,)),
    ("rmsnorm", lambda: L.RMSNormalization(), (4, 8)),
    ("relu", lambda: L.ReLU(), (4, 6)),
    ("relu6", lambda: L.ReLU(max_value=6.0), (4, 6)),
    ("relu_threshold", lambda: L.ReLU(negative_slope=0.1, threshold=0.5), (4, 6)),
    ("leaky_relu", lambda: L.LeakyReLU(negative_slope=0.2), (4, 6)),
    ("elu", lambda: L.ELU(alpha=0.7), (4, 6)),
    ("prelu", lambda: L.PReLU(), (4, 6)),
    ("softmax", lambda: L.Softmax(axis=1), (4, 6)),
    *[
        (f"act_{a}", (lambda a=a: L.Activation(a)), (3, 7))
        for a in [
            "sigmoid",
            "tanh",
            "swish",
            "silu",
            "gelu",
            "softplus",
            "softsign",
            "selu",
            "elu",
            "exponential",
            "hard_sigmoid",
            "hard_swish",
            "mish",
            "relu6",
            "log_softmax",
            "linear",
            "leaky_relu",
            "celu",
            "hard_tanh",
            "log_sigmoid",
            "sparse_plus",
            "soft_shrink",
            "tanh_shrink",
        ]
    ],
    ("act_glu", lambda: L.Activation("glu"), (3, 8)),
    ("maxpool2d", lambda: L.MaxPooling2D(2), (8, 8, 3)),
    ("maxpool2d_same_stride", lambda: L.MaxPooling2D(3, strides=2, padding="same"), (9, 9, 3)),
    ("avgpool2d", lambda: L.AveragePooling2D(2), (8, 8, 3)),
    ("avgpool2d_same", lambda: L.AveragePooling2D(3, strides=2, padding="same"), (9, 9, 3)),
    ("maxpool1d", lambda: L.MaxPooling1D(2), (8, 3)),
    ("avgpool1d_same", lambda: L.AveragePooling1D(3, strides=1, padding="same"), (8, 3)),
    ("maxpool3d", lambda: L.MaxPooling3D(2), (4, 4, 4, 2)),
    ("gap2d", lambda: L.GlobalAveragePooling2D(), (5, 5, 3)),
    ("gap2d_keepdims", lambda: L.GlobalAveragePooling2D(keepdims=True), (5, 5, 3)),
    ("gmp2d", lambda: L.GlobalMaxPooling2D(), (5, 5, 3)),
    ("gap1d", lambda: L.GlobalAveragePooling1D(), (5, 3)),
    ("zeropad2d", lambda: L.ZeroPadding2D(((1, 2), (0, 3))), (4, 4, 2)),
    ("zeropad1d", lambda: L.ZeroPadding1D(2), (4, 2)),
    ("cropping2d", lambda: L.Cropping2D(((1, 0), (2, 1))), (6, 6, 2)),
    ("cropping1d", lambda: L.Cropping1D((1, 2)), (6, 2)),
    ("upsampling2d_nearest", lambda: L.UpSampling2D(2), (4, 4, 3)),
    ("upsampling2d_bilinear", lambda: L.UpSampling2D(2, interpolation="bilinear"), (4, 4, 3)),
    ("upsampling1d", lambda: L.UpSampling1D(3), (4, 3)),
    ("resizing_bilinear", lambda: L.Resizing(6, 10), (4, 5, 3)),
    ("reshape", lambda: L.Reshape((3, -1)), (4, 6)),
    ("flatten", lambda: L.Flatten(), (3, 4, 2)),
    ("permute", lambda: L.Permute((2, 1)), (3, 5)),
    ("repeat_vector", lambda: L.RepeatVector(3), (5,)),
    ("rescaling", lambda: L.Rescaling(1 / 127.5, offset=-1), (4, 4, 3)),
    ("normalization", lambda: L.Normalization(mean=[0.5, 1.0, -1.0], variance=[1.0, 4.0, 0.25]), (4, 4, 3)),
    ("dropout", lambda: L.Dropout(0.5), (4, 6)),
    ("spatial_dropout", lambda: L.SpatialDropout2D(0.5), (4, 4, 3)),
    ("gaussian_noise", lambda: L.GaussianNoise(0.3), (4, 6)),
    ("activity_reg", lambda: L.ActivityRegularization(0.1), (4, 6)),
    ("identity", lambda: L.Identity(), (4, 6)),
    ("masking", lambda: L.Masking(0.0), (4, 6)),
]


@pytest.mark.parametrize("make_layer, shape", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_layer_matches_keras(make_layer: Callable[[], Any], shape: tuple[int, ...]) -> None:
    inp = keras.Input(shape)
    model = randomize(keras.Model(inp, make_layer()(inp)), seed=3)
    convert_and_check(model, [random_input((2, *shape))])


MERGES = [
    ("add", L.Add),
    ("subtract", L.Subtract),
    ("multiply", L.Multiply),
    ("average", L.Average),
    ("maximum", L.Maximum),
    ("minimum", L.Minimum),
    ("concat", lambda: L.Concatenate(axis=-1)),
    ("concat_axis1", lambda: L.Concatenate(axis=1)),
    ("dot", lambda: L.Dot(axes=-1)),
]


@pytest.mark.parametrize("make_layer", [m[1] for m in MERGES], ids=[m[0] for m in MERGES])
def test_merge_layer_matches_keras(make_layer: Callable[[], Any]) -> None:
    a, b = keras.Input((4, 6)), keras.Input((4, 6))
    model = keras.Model([a, b], make_layer()([a, b]))
    convert_and_check(model, [random_input((2, 4, 6), seed=1), random_input((2, 4, 6), seed=2)])


def test_embedding_with_integer_input() -> None:
    inp = keras.Input((7,), dtype="int32")
    model = keras.Model(inp, L.Embedding(10, 4)(inp))
    convert_and_check(model, [random_input((2, 7), dtype="int32")])


@pytest.mark.parametrize("causal", [False, True])
def test_multi_head_attention(causal: bool) -> None:
    q, v = keras.Input((5, 8)), keras.Input((6, 8))
    mha = L.MultiHeadAttention(num_heads=2, key_dim=4, value_dim=3)
    out = mha(q, v, use_causal_mask=causal) if not causal else mha(q, q, use_causal_mask=True)
    model = randomize(keras.Model([q, v], out))
    convert_and_check(model, [random_input((2, 5, 8), seed=1), random_input((2, 6, 8), seed=2)])


class _AtPosition(L.Layer):
    """Reads rows of a table and writes an update into a buffer at a position taken from an
    input tensor (what a KV-cache step does): Keras's ops.slice and ops.slice_update with a
    tensor start."""

    def build(self, shapes):
        self.table = self.add_weight(shape=(16, 4), name="table")

    def call(self, buffer, update, position):
        start = position[0, 0]
        rows = keras.ops.slice(self.table, [start, 0], [3, 4])  # three rows from `start`
        written = keras.ops.slice_update(buffer, [0, start, 0], update)
        return written + keras.ops.sum(rows), rows


@pytest.mark.parametrize("position", [0, 5, 13])
def test_slice_and_update_at_a_position_read_from_a_tensor(position: int) -> None:
    buffer, update, where = keras.Input((16, 4)), keras.Input((3, 4)), keras.Input((1,), dtype="int32")
    model = randomize(keras.Model([buffer, update, where], _AtPosition()(buffer, update, where)))
    positions = [np.full((2, 1), p, "int32") for p in (position, (position + 7) % 14)]
    optimized = convert_and_check(
        model, [random_input((2, 16, 4), seed=1), random_input((2, 3, 4), seed=2), positions[0]]
    )
    ops = [n.op for n in optimized.primary_graph().nodes]
    assert "index_put" in ops and "gather" in ops
    x = [random_input((2, 16, 4), seed=3), random_input((2, 3, 4), seed=4), positions[1]]
    for got, want in zip(optimized(*x), keras_reference(model, x)):  # another position: no rebuild
        assert_close(got, want)
    assert len(optimized.engine_shapes) == 1


def test_a_slice_ending_at_a_position_read_from_a_tensor_falls_back_to_keras() -> None:
    """Its output size depends on a tensor's value: the layer runs in Keras (the sizes of its
    outputs still known), the model converts and matches."""

    class Prefix(L.Layer):
        def call(self, x, position):
            return keras.ops.sum(x[:, : position[0, 0]], axis=1)

    x, where = keras.Input((6, 3)), keras.Input((1,), dtype="int32")
    model = keras.Model([x, where], Prefix()(x, where))
    optimized = convert_and_check(
        model, [random_input((2, 6, 3)), np.full((2, 1), 4, "int32")], allow_fallback=True
    )
    (node,) = [n for n in optimized.primary_graph().nodes if n.op == "keras_layer"]
    assert node.attrs["reason"].startswith("could not be traced")
