"""Bad input: each gets a kerasrt error naming the problem, a non-zero CLI exit, and no
half-written output."""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import layers as L

import kerasrt
from kerasrt.cli import main
from kerasrt.demo import MODEL_PATH
from kerasrt_testing import assert_close, keras_reference, random_input, randomize


@pytest.fixture
def small_model() -> keras.Model:
    inp = keras.Input((4, 4, 2), name="image")
    return randomize(keras.Model(inp, L.Dense(3)(L.Flatten()(L.Conv2D(3, 2)(inp)))))


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    truncated = tmp / "truncated.keras"
    truncated.write_bytes(MODEL_PATH.read_bytes()[:5000])
    corrupt = tmp / "corrupt.keras"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    not_model = tmp / "notes.txt"
    not_model.write_text("hello")
    bad_h5 = tmp / "bad.h5"
    bad_h5.write_bytes(b"not hdf5 at all")
    zip_not_keras = tmp / "other.keras"
    import zipfile

    with zipfile.ZipFile(zip_not_keras, "w") as zf:
        zf.writestr("readme.txt", "not a model")
    return {
        "missing": (tmp / "nope.keras", "does not exist"),
        "truncated": (truncated, "not a valid .keras file"),
        "corrupt": (corrupt, "not a valid .keras file"),
        "not_a_model": (not_model, "unknown model format"),
        "bad_h5": (bad_h5, "not a valid HDF5 file"),
        "zip_not_keras": (zip_not_keras, "could not load"),
        "directory": (tmp, "is a directory"),
    }


@pytest.mark.parametrize(
    "case", ["missing", "truncated", "corrupt", "not_a_model", "bad_h5", "zip_not_keras", "directory"]
)
def test_bad_model_files(tmp_path: Path, case: str, capsys) -> None:
    path, message = _bad_files(tmp_path)[case]
    with pytest.raises(kerasrt.ModelLoadError, match=message):
        kerasrt.Converter(path).convert()
    out = tmp_path / "out_krt"
    assert main(["convert", str(path), "-o", str(out)]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out_krt")]


@keras.saving.register_keras_serializable(package="kerasrt_tests")
class Doubler(L.Layer):
    def call(self, x):
        return x * 2.0


def test_unknown_custom_layer_needs_custom_objects(tmp_path: Path) -> None:
    inp = keras.Input((3,))
    model = keras.Model(inp, Doubler(name="doubler")(inp))
    path = tmp_path / "custom.keras"
    model.save(path)
    keras.saving.get_custom_objects().pop("kerasrt_tests>Doubler")
    try:
        with pytest.raises(kerasrt.UnknownLayerError, match="custom_objects"):
            kerasrt.Converter(path).convert()
        optimized = kerasrt.Converter(path, custom_objects={"kerasrt_tests>Doubler": Doubler}).convert()
        np.testing.assert_allclose(optimized(np.ones((1, 3), "float32")), 2.0)
    finally:
        keras.saving.get_custom_objects()["kerasrt_tests>Doubler"] = Doubler


def test_wrong_inputs_at_inference(small_model: keras.Model) -> None:
    optimized = kerasrt.Converter(small_model, batch_size=2).convert()
    with pytest.raises(kerasrt.InputSignatureError, match="must have rank 4"):
        optimized(random_input((2, 4, 4)))
    with pytest.raises(kerasrt.InputSignatureError, match=r"must have shape \(None, 4, 4, 2\)"):
        optimized(random_input((2, 4, 5, 2)))
    with pytest.raises(kerasrt.InputSignatureError, match="must be float32, got int64"):
        optimized(np.ones((2, 4, 4, 2), dtype=np.int64))
    with pytest.raises(kerasrt.InputSignatureError, match="takes 1 input"):
        optimized(random_input((2, 4, 4, 2)), random_input((2, 4, 4, 2)))
    with pytest.raises(kerasrt.InputSignatureError, match="not a numeric array"):
        optimized(np.array([object()]))
    # float64 is the same kind: accepted and cast
    assert optimized(random_input((2, 4, 4, 2)).astype(np.float64)).dtype == np.float32


def test_unseen_shape_without_build_at_runtime(small_model: keras.Model) -> None:
    optimized = kerasrt.Converter(small_model, batch_size=2, allow_build_at_runtime=False).convert()
    optimized(random_input((2, 4, 4, 2)))
    with pytest.raises(kerasrt.EngineNotBuiltError, match=r"no engine for input shapes \[\[3, 4, 4, 2\]\]"):
        optimized(random_input((3, 4, 4, 2)))


def test_build_prebuilds_shapes_even_without_build_at_runtime(small_model: keras.Model) -> None:
    conv = kerasrt.Converter(
        small_model, batch_size=2, allow_build_at_runtime=False, maximum_cached_engines=3
    )
    optimized = conv.convert()
    conv.build(lambda: [random_input((3, 4, 4, 2)), random_input((5, 4, 4, 2))])
    assert sorted(k[0][0] for k in optimized.engine_shapes) == [2, 3, 5]
    x = random_input((5, 4, 4, 2))
    assert_close(optimized(x), keras_reference(small_model, [x])[0])  # served, nothing built


def test_engine_cache_builds_and_evicts(small_model: keras.Model) -> None:
    conv = kerasrt.Converter(small_model, batch_size=2, maximum_cached_engines=2)
    optimized = conv.convert()
    conv.build(lambda: [random_input((3, 4, 4, 2)), random_input((2, 4, 4, 2))])
    assert optimized.engine_shapes == [((3, 4, 4, 2),), ((2, 4, 4, 2),)]
    optimized(random_input((5, 4, 4, 2)))  # evicts the least recently used (batch 3)
    assert optimized.engine_shapes == [((2, 4, 4, 2),), ((5, 4, 4, 2),)]
    x = random_input((5, 4, 4, 2))
    expected = np.asarray(keras.ops.convert_to_numpy(small_model(x, training=False)))
    np.testing.assert_allclose(optimized(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"precision_mode": "INT4"}, "precision_mode 'INT4' is not supported"),
        ({"minimum_segment_size": 0}, "minimum_segment_size"),
        ({"maximum_cached_engines": 0}, "maximum_cached_engines"),
        ({"input_shapes": [(2, 4, 4)]}, "does not fit the model's input"),
        ({"input_shapes": [(2, 4, 4, 2), (2, 3)]}, "1 inputs but 2 input shapes"),
        (
            {"input_shapes": [(2, "four", 4, 2)]},
            "one shape \\(a tuple of positive integers\\) per model input",
        ),
        ({"input_shapes": 5}, "or a dict of them by input name; got 5"),
        ({"input_shapes": {"pixels": (2, 4, 4, 2)}}, r"no input named \['pixels'\]; its inputs are \["),
    ],
)
def test_bad_settings(small_model: keras.Model, kwargs: dict, message: str) -> None:
    with pytest.raises(kerasrt.ConversionError, match=message):
        kerasrt.Converter(small_model, **kwargs).convert()


def test_not_a_model() -> None:
    with pytest.raises(kerasrt.ModelLoadError, match="is a layer, not a model"):
        kerasrt.Converter(L.Dense(3))
    with pytest.raises(kerasrt.ModelLoadError, match=r"expected a keras\.Model"):
        kerasrt.Converter(42)


def test_save_refuses_foreign_directory(tmp_path: Path, small_model: keras.Model) -> None:
    conv = kerasrt.Converter(small_model)
    conv.convert()
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "data.txt").write_text("keep me")
    with pytest.raises(kerasrt.ArtifactError, match="not a kerasrt artifact"):
        conv.save(tmp_path / "precious")
    assert (tmp_path / "precious" / "data.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "manifest.json").unlink(), "has no manifest.json"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "corrupt"),
        (lambda d: (d / "manifest.json").write_text('{"format": "other"}'), "not a kerasrt artifact"),
        (lambda d: (d / "weights.safetensors").write_bytes(b"\x00" * 10), "corrupt"),
        (lambda d: (d / "weights.safetensors").unlink(), "has no weights.safetensors"),
        (lambda d: shutil.rmtree(d), "does not exist"),
    ],
)
def test_damaged_artifacts(tmp_path: Path, small_model: keras.Model, damage, message: str, capsys) -> None:
    conv = kerasrt.Converter(small_model)
    conv.convert()
    path = conv.save(tmp_path / "art")
    damage(path)
    with pytest.raises(kerasrt.ArtifactError, match=message):
        kerasrt.load(path)
    assert main(["inspect", str(path)]) == 2
    assert "error:" in capsys.readouterr().err


def test_batch_profile_serves_every_batch_in_range_with_two_engines(small_model: keras.Model) -> None:
    conv = kerasrt.Converter(small_model, batch_profile=(1, 4, 8), allow_build_at_runtime=False)
    optimized = conv.convert()
    assert sorted(k[0][0] for k in optimized.engine_shapes) == [4, 8]  # opt and max, prebuilt
    for batch in (1, 3, 4, 5, 8):
        x = random_input((batch, 4, 4, 2), seed=batch)
        got = optimized(x)
        assert got.shape[0] == batch
        assert_close(got, keras_reference(small_model, [x])[0])
    assert sorted(k[0][0] for k in optimized.engine_shapes) == [4, 8]  # nothing else was built
    with pytest.raises(
        kerasrt.InputSignatureError, match=r"batch size 9 is outside the batch profile \[1, 8\]"
    ):
        optimized(random_input((9, 4, 4, 2)))
    with pytest.raises(kerasrt.ConversionError, match="batch_profile must be"):
        kerasrt.Converter(small_model, batch_profile=(4, 2, 8))
