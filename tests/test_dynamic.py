"""Any shape from one conversion: lazy builds, engines compiled from the source graph, artifacts
that serve new shapes without Keras, and the errors at the edges."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import layers as L

import kerasrt
from kerasrt_testing import assert_close, random_input, randomize


def _text_encoder() -> keras.Model:
    """Token ids and a padding mask, both (batch, sequence) with unknown sizes."""
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    mask = keras.Input((None,), dtype="int32", name="mask")
    x = L.Embedding(50, 16)(tokens)
    attention_mask = keras.ops.cast(mask[:, None, :], "bool")
    h = L.MultiHeadAttention(2, 8)(x, x, attention_mask=attention_mask)
    x = L.LayerNormalization()(x + h)
    x = L.Dense(32, activation="gelu")(x)
    return randomize(keras.Model([tokens, mask], L.Dense(4)(x)))


def _text_inputs(batch: int, length: int) -> list[np.ndarray]:
    rng = np.random.default_rng(batch * 100 + length)
    mask = (np.arange(length)[None, :] < rng.integers(1, length + 1, (batch, 1))).astype("int32")
    return [rng.integers(0, 50, (batch, length)).astype("int32"), mask]


def _check(model: keras.Model, optimized: kerasrt.OptimizedModel, inputs: list[np.ndarray]) -> None:
    want = keras.ops.convert_to_numpy(model(inputs))
    assert_close(optimized(*inputs), want)


def test_unknown_sizes_convert_lazily_and_every_shape_matches_keras() -> None:
    model = _text_encoder()
    optimized = kerasrt.Converter(model, maximum_cached_engines=2).convert()  # no input_shapes
    assert optimized.engine_shapes == []  # nothing to build until a call says the sizes
    (source,) = optimized.sources
    assert [v.shape for v in source.inputs] == [("s0", "s1"), ("s0", "s1")]
    for batch, length in [(1, 3), (4, 17), (2, 64), (1, 3)]:
        _check(model, optimized, _text_inputs(batch, length))
    assert len(optimized.sources) == 1  # one import served every shape
    assert optimized.engine_shapes == [((2, 64), (2, 64)), ((1, 3), (1, 3))]  # LRU: two engines kept


def test_build_ahead_of_time_and_no_build_at_runtime() -> None:
    model = _text_encoder()
    conv = kerasrt.Converter(model, allow_build_at_runtime=False, maximum_cached_engines=4)
    optimized = conv.convert()
    with pytest.raises(kerasrt.EngineNotBuiltError, match="allow_build_at_runtime is False"):
        optimized(*_text_inputs(2, 5))
    conv.build(lambda: iter([_text_inputs(2, 5), _text_inputs(3, 9)]))
    assert sorted(optimized.engine_shapes) == [((2, 5), (2, 5)), ((3, 9), (3, 9))]
    _check(model, optimized, _text_inputs(3, 9))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_mismatched_sizes_and_dtypes_get_one_clear_error(dynamic: bool) -> None:
    optimized = kerasrt.Converter(_text_encoder(), use_dynamic_shape=dynamic).convert()
    tokens, mask = _text_inputs(2, 6)
    with pytest.raises(kerasrt.InputSignatureError, match=r"its size s1 must equal 6"):
        optimized(tokens, mask[:, :5])
    with pytest.raises(kerasrt.InputSignatureError, match="rank 2"):
        optimized(tokens[0], mask)
    with pytest.raises(kerasrt.InputSignatureError, match="must be int32"):
        optimized(tokens.astype("float32"), mask)


def _odd_even_cnn() -> keras.Model:
    inp = keras.Input((None, None, 3), name="image")
    x = L.Conv2D(4, 3, strides=2, padding="same", activation="relu")(inp)
    return randomize(keras.Model(inp, L.Dense(2)(L.GlobalAveragePooling2D()(x))))


def test_a_size_that_breaks_the_trace_imports_again_and_the_artifact_keeps_both(tmp_path: Path) -> None:
    model = _odd_even_cnn()
    conv = kerasrt.Converter(model, input_shapes=[(1, 15, 15, 3)], maximum_cached_engines=4)
    optimized = conv.convert()
    x_odd, x_even = random_input((2, 9, 11, 3)), random_input((3, 10, 12, 3))
    assert_close(optimized(x_odd), keras.ops.convert_to_numpy(model(x_odd)))
    assert len(optimized.sources) == 1
    # an even size needs Keras's asymmetric padding: the odd trace does not serve it
    assert_close(optimized(x_even), keras.ops.convert_to_numpy(model(x_even)))
    assert len(optimized.sources) == 2
    path = conv.save(tmp_path / "art")
    assert not (path / "keras_model.keras").exists()
    loaded = kerasrt.load(path)
    for x in (random_input((1, 7, 21, 3)), random_input((2, 20, 8, 3))):
        assert_close(loaded(x), keras.ops.convert_to_numpy(model(x)))
    # odd height with even width: neither stored trace serves it, and no Keras model is there
    with pytest.raises(kerasrt.EngineNotBuiltError, match=r"trace assumed .*Keras model.*not available"):
        loaded(random_input((1, 9, 10, 3)))


FRESH_PROCESS = """
import sys, numpy as np, kerasrt
model = kerasrt.load(sys.argv[1])
for batch in (1, 3):
    np.save(f"{sys.argv[2]}/y{batch}.npy", model(np.load(f"{sys.argv[2]}/x{batch}.npy")))
print("keras imported:", "keras" in sys.modules)
"""


def test_a_lambda_model_saves_and_serves_new_batches_without_keras(tmp_path: Path) -> None:
    inp = keras.Input((6,), name="x")
    x = L.Dense(8)(inp)
    x = L.Lambda(lambda t: keras.ops.tanh(t) * 2.0)(x)
    model = randomize(keras.Model(inp, L.Dense(3)(x)))
    conv = kerasrt.Converter(model, batch_size=2)
    conv.convert()
    path = conv.save(tmp_path / "art")  # the lambda was traced: nothing runs in Keras
    for batch in (1, 3):
        np.save(tmp_path / f"x{batch}.npy", random_input((batch, 6), seed=batch))
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(path), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "keras imported: False" in done.stdout
    for batch in (1, 3):
        x = np.load(tmp_path / f"x{batch}.npy")
        assert_close(np.load(tmp_path / f"y{batch}.npy"), keras.ops.convert_to_numpy(model(x)))


def test_a_lambda_that_runs_in_keras_needs_safe_mode_off_to_load(tmp_path: Path) -> None:
    inp = keras.Input((4,), name="x")
    host = L.Lambda(  # reads values on the host: kerasrt cannot trace it, so it runs in Keras
        lambda t: t + float(t.sum() * 0.0) + 1.0, output_shape=(4,), name="host"
    )
    model = randomize(keras.Model(inp, L.Dense(2)(host(L.Dense(4)(inp)))))
    conv = kerasrt.Converter(model, batch_size=2)
    conv.convert()
    with pytest.warns(UserWarning, match=r"safe_mode=False"):
        path = conv.save(tmp_path / "art")
    assert (path / "keras_model.keras").exists()
    x = random_input((2, 4))
    with pytest.raises(kerasrt.ModelLoadError, match=r"safe_mode=False"):
        kerasrt.load(path)(x)
    loaded = kerasrt.load(path, safe_mode=False)
    assert_close(loaded(x), keras.ops.convert_to_numpy(model(x)))


def test_a_model_with_no_known_shape_asks_for_it() -> None:
    class Free(keras.Model):
        def call(self, x):
            return x * 2.0

    with pytest.raises(kerasrt.ConversionError, match=r"never built or called.*input_shapes"):
        kerasrt.Converter(Free()).convert()


def test_python_m_kerasrt_is_the_command_line() -> None:
    done = subprocess.run([sys.executable, "-m", "kerasrt", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "convert" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "kerasrt", "inspect", "/nonexistent"], capture_output=True, text=True
    )
    assert done.returncode != 0 and "nonexistent" in done.stderr


def test_the_command_line_converts_a_model_of_unknown_sizes_lazily(tmp_path: Path, capsys) -> None:
    from kerasrt.cli import main

    tokens = keras.Input((None,), dtype="int32", name="ids")
    model = randomize(keras.Model(tokens, L.Dense(3)(L.Embedding(20, 8)(tokens))))
    model.save(tmp_path / "m.keras")
    out = tmp_path / "out"
    assert main(["convert", str(tmp_path / "m.keras"), "-o", str(out)]) == 0
    assert "no engine built yet" in capsys.readouterr().out
    assert main(["inspect", str(out), "--graph"]) == 0
    assert "int32[s0,s1]" in capsys.readouterr().out  # printed as is, not as rich markup
    assert main(["validate", str(tmp_path / "m.keras"), str(out)]) == 2
    assert "pass --inputs" in capsys.readouterr().err
    np.savez(tmp_path / "x.npz", ids=np.random.default_rng(0).integers(0, 20, (2, 5)).astype("int32"))
    assert main(["validate", str(tmp_path / "m.keras"), str(out), "--inputs", str(tmp_path / "x.npz")]) == 0


def test_dynamic_shape_engines_are_compiled_once_and_serve_every_shape() -> None:
    model = _text_encoder()
    conv = kerasrt.Converter(model, use_dynamic_shape=True, maximum_cached_engines=3)
    optimized = conv.convert()
    shapes = [(1, 3), (4, 17), (2, 64), (4, 17)]
    for batch, length in shapes:
        _check(model, optimized, _text_inputs(batch, length))
    programs = {id(optimized.program(((b, n), (b, n)))) for b, n in shapes}
    assert len(programs) == 1 and len(optimized._dynamic) == 1  # one program, optimized once
    program = optimized.program(((2, 64), (2, 64)))
    assert program.dynamic and program.graph.inputs[0].shape == ("s0", "s1")
    assert program.graph.meta["optimization"]["rules"]  # the optimizer ran on the symbolic graph
    assert len(optimized.engine_shapes) == 3  # LRU over the shapes seen


def test_dynamic_shape_engines_of_a_cnn_take_a_second_source_where_a_guard_breaks() -> None:
    model = _odd_even_cnn()
    optimized = kerasrt.Converter(model, input_shapes=[(1, 15, 15, 3)], use_dynamic_shape=True).convert()
    for shape in [(2, 9, 11, 3), (1, 21, 7, 3)]:
        x = random_input(shape)
        assert_close(optimized(x), keras.ops.convert_to_numpy(model(x)))
    assert len(optimized._dynamic) == 1
    x = random_input((3, 10, 12, 3))  # even sizes: imported again, compiled once more
    assert_close(optimized(x), keras.ops.convert_to_numpy(model(x)))
    assert len(optimized.sources) == 2 and len(optimized._dynamic) == 2


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_a_shape_profile_serves_its_range_and_refuses_outside_without_build_at_runtime(dynamic: bool) -> None:
    model = _text_encoder()
    profile = ([(1, 4), (1, 4)], [(2, 16), (2, 16)], [(4, 32), (4, 32)])
    conv = kerasrt.Converter(
        model,
        shape_profile=profile,
        allow_build_at_runtime=False,
        use_dynamic_shape=dynamic,
        maximum_cached_engines=4,
    )
    optimized = conv.convert()
    assert optimized.engine_shapes == [((2, 16), (2, 16))]  # the opt engine, built at convert()
    for batch, length in [(1, 4), (4, 32), (3, 9)]:  # min, max, and inside: served
        _check(model, optimized, _text_inputs(batch, length))
    with pytest.raises(kerasrt.EngineNotBuiltError, match=r"shape profile serves \[\[1, 4\], \[1, 4\]\] to"):
        optimized(*_text_inputs(5, 8))  # outside: batch above the max
    allowed = kerasrt.Converter(model, shape_profile=profile, use_dynamic_shape=dynamic).convert()
    _check(model, allowed, _text_inputs(5, 40))  # outside, built at run time


def test_a_shape_profile_that_does_not_fit_is_refused() -> None:
    with pytest.raises(kerasrt.ConversionError, match="min <= opt <= max"):
        kerasrt.Converter(_text_encoder(), shape_profile=([(2, 4)] * 2, [(1, 16)] * 2, [(4, 32)] * 2))
    with pytest.raises(kerasrt.ConversionError, match="alone"):
        kerasrt.Converter(
            _text_encoder(),
            shape_profile=([(1, 4)] * 2, [(2, 16)] * 2, [(4, 32)] * 2),
            input_shapes=[(2, 16)] * 2,
        )
    with pytest.raises(kerasrt.ConversionError, match="does not fit"):
        kerasrt.Converter(
            _odd_even_cnn(), shape_profile=([(1, 9, 9, 4)], [(1, 9, 9, 4)], [(1, 9, 9, 4)])
        ).convert()


def test_a_hot_shape_gets_a_static_engine_where_that_is_faster_by_measurement() -> None:
    model = _text_encoder()
    conv = kerasrt.Converter(model, use_dynamic_shape=True, hot_shape_calls=3, maximum_cached_engines=4)
    optimized = conv.convert()
    hot, cold = _text_inputs(2, 9), _text_inputs(3, 5)
    for _ in range(3):
        _check(model, optimized, hot)
    _check(model, optimized, cold)
    key = ((2, 9), (2, 9))
    assert list(optimized.shape_choices) == [key]  # timed once, when the shape became hot
    choice = optimized.shape_choices[key]
    assert choice["static_ms"] > 0 and choice["dynamic_ms"] > 0
    faster = "static" if choice["static_ms"] < choice["dynamic_ms"] else "dynamic"
    assert choice["chosen"] == faster
    assert optimized.program(key).dynamic == (faster == "dynamic")
    assert optimized.program(((3, 5), (3, 5))).dynamic
    _check(model, optimized, hot)  # served by the chosen engine


def test_the_report_lists_each_hot_shape_pick() -> None:
    model = _text_encoder()
    conv = kerasrt.Converter(model, use_dynamic_shape=True, hot_shape_calls=2)
    optimized = conv.convert()
    for _ in range(2):
        optimized(*_text_inputs(2, 6))
    text = conv.summary(print_fn=None)
    assert "hot input shapes [[2, 6], [2, 6]]:" in text and "static" in text and "dynamic" in text
