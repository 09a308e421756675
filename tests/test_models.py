"""Whole-model structures: keras.ops calls, nesting, sharing, multi-IO, subclassed models,
custom layers, a transformer encoder, and a fallback layer in the middle."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers as L
from keras import ops

import kerasrt
from kerasrt_testing import (
    assert_close,
    convert_and_check,
    fallbacks,
    keras_reference,
    random_input,
    randomize,
)


def test_sequential_cnn() -> None:
    model = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            L.Conv2D(8, 3, activation="relu"),
            L.BatchNormalization(),
            L.MaxPooling2D(),
            L.Flatten(),
            L.Dense(10),
        ]
    )
    convert_and_check(randomize(model), [random_input((3, 12, 12, 3))])


def test_keras_ops_inside_functional_model() -> None:
    inp = keras.Input((6, 8))
    x = L.Dense(8)(inp)
    x = ops.transpose(x, (0, 2, 1))
    x = ops.mean(x, axis=-1, keepdims=True) + ops.max(x, axis=-1, keepdims=True) * 2.0
    x = ops.where(x > 0, ops.sqrt(ops.abs(x) + 1.0), -x)
    x = ops.concatenate([x, ops.sum(x, axis=1, keepdims=True)], axis=1)
    x = ops.reshape(x, (-1, 9))
    model = keras.Model(inp, ops.softmax(x, axis=-1))
    optimized = convert_and_check(randomize(model), [random_input((2, 6, 8))], optimization_level=0)
    layers = {n.layer.split("_")[0] for n in optimized.primary_graph().nodes}
    assert {"transpose", "dense", "where", "softmax"} <= layers  # keras.ops calls keep their names


def test_nested_models_and_shared_layers() -> None:
    inner_in = keras.Input((8,))
    inner = keras.Model(inner_in, L.Dense(8, activation="tanh", name="inner_dense")(inner_in), name="inner")
    shared = L.Dense(8, name="shared")
    a, b = keras.Input((8,)), keras.Input((8,))
    ya = shared(inner(a))
    yb = shared(inner(b))
    model = keras.Model([a, b], L.Add()([ya, yb]))
    optimized = convert_and_check(
        randomize(model), [random_input((2, 8), seed=1), random_input((2, 8), seed=2)]
    )
    graph = optimized.primary_graph()
    assert {"inner/inner_dense", "shared"} <= {n.layer for n in graph.nodes}
    # the shared layer's weights are one constant, read by both calls
    kernels = [v for v in graph.constants.values() if v.name.startswith("shared.kernel")]
    assert len(kernels) == 1 and len(kernels[0].users) == 2


def test_nested_sequential_inside_functional() -> None:
    block = keras.Sequential([L.Conv2D(4, 3, padding="same"), L.ReLU()], name="block")
    inp = keras.Input((8, 8, 2))
    model = keras.Model(inp, L.GlobalAveragePooling2D()(block(inp)))
    convert_and_check(randomize(model), [random_input((2, 8, 8, 2))])


def test_multiple_inputs_and_outputs() -> None:
    image, meta = keras.Input((8, 8, 3), name="image"), keras.Input((4,), name="meta")
    x = L.GlobalAveragePooling2D()(L.Conv2D(6, 3)(image))
    x = L.Concatenate()([x, L.Dense(6)(meta)])
    cls = L.Dense(3, name="cls")(x)
    reg = L.Dense(1, name="reg")(x)
    model = keras.Model({"image": image, "meta": meta}, {"cls": cls, "reg": reg})
    inputs = [random_input((2, 8, 8, 3), seed=1), random_input((2, 4), seed=2)]
    optimized = kerasrt.Converter(randomize(model), input_shapes=[(2, 8, 8, 3), (2, 4)]).convert()
    assert not fallbacks(optimized)
    expected = model({"image": inputs[0], "meta": inputs[1]}, training=False)
    got = optimized({"image": inputs[0], "meta": inputs[1]})
    assert isinstance(got, list) and len(got) == 2
    for g, name in zip(got, ["cls", "reg"]):
        assert_close(g, np.asarray(ops.convert_to_numpy(expected[name])))


@keras.saving.register_keras_serializable(package="kerasrt_tests")
class Block(L.Layer):
    """A custom layer with its own weights and Python logic (no static graph)."""

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, shape):
        self.w = self.add_weight((shape[-1], self.units), initializer="glorot_uniform")
        self.scale = self.add_weight((self.units,), initializer="ones")

    def call(self, x):
        h = ops.matmul(x, self.w)
        for _ in range(2):  # Python control flow is fine when traced
            h = ops.tanh(h) * self.scale
        return h + ops.mean(h, axis=-1, keepdims=True)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Conv2D(4, 3, padding="same")
        self.bn = L.BatchNormalization()
        self.block = Block(5)

    def call(self, x, training=False):
        x = ops.relu(self.bn(self.conv(x), training=training))
        return self.block(ops.mean(x, axis=(1, 2)))


def test_custom_layer_is_traced_not_fallen_back() -> None:
    inp = keras.Input((6,))
    model = keras.Model(inp, L.Dense(3)(Block(4, name="block")(inp)))
    optimized = convert_and_check(model, [random_input((2, 6))])
    assert "block" in {n.layer for n in optimized.primary_graph().nodes}


def test_subclassed_model_is_traced() -> None:
    model = Subclassed()
    x = random_input((2, 8, 8, 3))
    model(x)
    randomize(model)
    convert_and_check(model, [x])


def test_subclassed_model_converts_at_the_shape_keras_recorded_and_serves_other_batches() -> None:
    model = randomize(Subclassed())
    model(random_input((1, 8, 8, 3)))  # Keras records (1, 8, 8, 3); the batch stays symbolic
    optimized = kerasrt.Converter(model).convert()
    assert optimized.engine_shapes == [((1, 8, 8, 3),)]
    for batch in (1, 3):
        x = random_input((batch, 8, 8, 3))
        assert_close(optimized(x), keras.ops.convert_to_numpy(model(x)), rtol=1e-4)
    with pytest.raises(kerasrt.InputSignatureError, match=r"shape \(None, 8, 8, 3\)"):
        optimized(random_input((2, 9, 8, 3)))


def test_subclassed_model_never_built_asks_for_its_input_shapes() -> None:
    with pytest.raises(kerasrt.ConversionError, match=r"never built or called.*input_shapes"):
        kerasrt.Converter(Subclassed()).convert()


def encoder_block(x, heads: int, width: int, mlp: int, name: str):
    attn = L.MultiHeadAttention(heads, width // heads, name=f"{name}_mha")(x, x)
    x = L.LayerNormalization(epsilon=1e-6, name=f"{name}_ln1")(x + attn)
    h = L.Dense(mlp, activation="gelu", name=f"{name}_mlp1")(x)
    h = L.Dense(width, name=f"{name}_mlp2")(h)
    return L.LayerNormalization(epsilon=1e-6, name=f"{name}_ln2")(x + h)


def test_transformer_encoder() -> None:
    tokens = keras.Input((16,), dtype="int32")
    x = L.Embedding(50, 32)(tokens)
    positions = ops.expand_dims(ops.arange(16), 0)
    x = x + L.Embedding(16, 32)(positions)
    for i in range(2):
        x = encoder_block(x, heads=4, width=32, mlp=64, name=f"enc{i}")
    model = randomize(keras.Model(tokens, L.Dense(5)(x[:, 0])))
    optimized = convert_and_check(model, [random_input((2, 16), dtype="int32")])
    assert "attention" in {n.op for n in optimized.primary_graph().nodes}


@keras.saving.register_keras_serializable(package="kerasrt_tests")
class HostRoundTrip(L.Layer):
    """A layer that leaves the framework (numpy on the host): it cannot be traced."""

    def call(self, x):
        array = ops.convert_to_numpy(x)
        return ops.convert_to_tensor(np.sort(array, axis=-1) * 0.5)

    def compute_output_shape(self, input_shape):
        return input_shape


def test_untraceable_layer_in_the_middle_falls_back() -> None:
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", activation="relu")(inp)
    x = L.Conv2D(4, 3, padding="same")(x)
    x = L.BatchNormalization()(x)
    x = L.Reshape((64, 4))(x)
    x = HostRoundTrip(name="host")(x)
    x = L.Flatten()(x)
    x = L.Dense(16, activation="relu")(x)
    x = L.Dense(8)(x)
    model = randomize(keras.Model(inp, L.Dense(3)(x)))
    optimized = convert_and_check(model, [random_input((2, 8, 8, 3))], allow_fallback=True)
    (node,) = fallbacks(optimized)
    assert node.layer == "host" and "reads tensor values on the host" in node.attrs["reason"]
    kinds = [s.kind for s in optimized.program(optimized.engine_shapes[0]).segments]
    assert kinds == ["engine", "fallback", "engine"]


def test_keep_in_keras_forces_fallback() -> None:
    inp = keras.Input((6,))
    x = L.Dense(6, name="first")(inp)
    x = L.Dense(6, name="middle")(x)
    model = randomize(keras.Model(inp, L.Dense(2, name="last")(x)))
    optimized = convert_and_check(
        model, [random_input((2, 6))], allow_fallback=True, keep_in_keras=["middle"], minimum_segment_size=1
    )
    (node,) = fallbacks(optimized)
    assert node.layer == "middle" and "keep_in_keras" in node.attrs["reason"]


def test_minimum_segment_size_leaves_small_runs_native() -> None:
    inp = keras.Input((6,))
    x = L.Dense(6, name="first")(inp)
    x = HostRoundTrip(name="host")(x)
    model = randomize(keras.Model(inp, L.Dense(2, name="last")(x)))
    optimized = convert_and_check(model, [random_input((2, 6))], allow_fallback=True, minimum_segment_size=3)
    segments = optimized.program(optimized.engine_shapes[0]).segments
    assert [s.kind for s in segments] == ["native", "fallback", "native"]
    assert "minimum_segment_size=3" in segments[0].reason


def test_h5_file_converts(tmp_path) -> None:
    inp = keras.Input((5,))
    model = randomize(keras.Model(inp, L.Dense(3, activation="relu")(L.Dense(4)(inp))))
    path = tmp_path / "m.h5"
    model.save(path)
    optimized = kerasrt.Converter(str(path), batch_size=4).convert()
    x = random_input((4, 5))
    assert_close(optimized(x), keras_reference(model, [x])[0])


def test_torch_in_torch_out_and_numpy_in_numpy_out() -> None:
    import torch

    inp = keras.Input((5,))
    model = randomize(keras.Model(inp, L.Dense(3)(inp)))
    optimized = kerasrt.Converter(model, batch_size=2).convert()
    x = random_input((2, 5))
    assert isinstance(optimized(x), np.ndarray)
    out = optimized(torch.from_numpy(x))
    assert isinstance(out, torch.Tensor)
    assert_close(out.numpy(), optimized(x), rtol=0, atol=0)


def test_traced_subclassed_model_names_its_sublayers() -> None:
    model = Subclassed(name="sub")
    x = random_input((2, 8, 8, 3))
    model(x)
    optimized = convert_and_check(randomize(model), [x], optimization_level=0)
    layers = {n.layer for n in optimized.primary_graph().nodes}
    conv = model.conv.name
    assert {f"sub/{conv}", f"sub/{model.bn.name}", f"sub/{model.block.name}"} <= layers


def test_graph_walk_releases_each_value_after_its_last_reader() -> None:
    from kerasrt.frontend import keras_adapter as ka

    inp = keras.Input((4,))
    a = L.Dense(4, name="a")(inp)
    b = L.Dense(4, name="b")(a)  # a is read twice: released after both readers ran
    c = L.Dense(4, name="c")(a)
    shared = L.Dense(4, name="shared")  # two nodes: its values are never released early
    d = L.Add(name="add")([shared(b), shared(c)])
    model = keras.Model(inp, [L.Dense(2, name="head")(d), b])  # b is an output: kept
    ran: list[str] = []
    released: list[tuple[str, int]] = []

    def call(op, *args, **kwargs):
        ran.append(op.name)
        return op.name

    ka.run_graph(model, ["input"], call, release=lambda v: released.append((v, len(ran))))
    last_reader_of_a = max(ran.index("b"), ran.index("c")) + 1
    assert released == [("a", last_reader_of_a), ("add", len(ran))]
