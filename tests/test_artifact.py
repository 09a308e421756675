"""Saved artifacts: JSON + safetensors, no pickle, same outputs in a fresh process."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import layers as L

import kerasrt
from kerasrt_testing import assert_close, random_input, randomize
from test_models import HostRoundTrip

FRESH_PROCESS = """
import pickle, sys, numpy as np, kerasrt

def forbidden(*args, **kwargs):
    raise AssertionError("pickle used while loading")

pickle.load = pickle.loads = pickle.Unpickler = forbidden  # loading must not unpickle anything
model = kerasrt.load(sys.argv[1])
x = np.load(sys.argv[2])
np.save(sys.argv[3], model(x))
"""


def _model_with_fallback() -> keras.Model:
    inp = keras.Input((6, 6, 3), name="image")
    x = L.Conv2D(4, 3, activation="relu")(inp)
    x = L.BatchNormalization()(x)
    x = L.Reshape((16, 4))(x)
    x = HostRoundTrip(name="host")(x)
    x = L.Flatten()(x)
    return randomize(keras.Model(inp, L.Dense(3)(L.Dense(8, activation="relu")(x))))


def test_round_trip_in_a_fresh_process(tmp_path: Path) -> None:
    inp = keras.Input((6, 6, 3), name="image")
    model = randomize(keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(L.Conv2D(4, 3)(inp)))))
    conv = kerasrt.Converter(model, batch_size=2)
    optimized = conv.convert()
    path = conv.save(tmp_path / "art")
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "weights.safetensors"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "kerasrt-artifact" and manifest["settings"]["minimum_segment_size"] == 3
    assert {"kerasrt", "torch", "keras"} <= set(manifest["versions"])
    x = random_input((2, 6, 6, 3))
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        check=True,
        env=env,
    )
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), optimized(x))


def test_loading_runs_no_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conv = kerasrt.Converter(_model_with_fallback(), batch_size=2)
    optimized = conv.convert()
    path = conv.save(tmp_path / "art")

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used while loading")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    loaded = kerasrt.load(path)
    x = random_input((2, 6, 6, 3))
    np.testing.assert_array_equal(loaded(x), optimized(x))  # the fallback layer runs from keras_model.keras


def test_fallback_model_matches_keras_after_load(tmp_path: Path) -> None:
    model = _model_with_fallback()
    conv = kerasrt.Converter(model, batch_size=2)
    conv.convert()
    loaded = kerasrt.load(conv.save(tmp_path / "art"))
    x = random_input((2, 6, 6, 3))
    expected = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))
    np.testing.assert_allclose(loaded(x), expected, rtol=1e-4, atol=1e-5)


def test_loaded_model_builds_new_shapes_and_save_overwrites(tmp_path: Path) -> None:
    inp = keras.Input((5,))
    model = randomize(keras.Model(inp, L.Dense(2)(inp)))
    conv = kerasrt.Converter(model, batch_size=2)
    conv.convert()
    path = conv.save(tmp_path / "art")
    loaded = kerasrt.load(path)
    x = random_input((7, 5))
    expected = np.asarray(keras.ops.convert_to_numpy(model(x)))
    np.testing.assert_allclose(loaded(x), expected, rtol=1e-5, atol=1e-6)
    assert loaded.engine_shapes == [((7, 5),)]
    conv.save(path)  # replacing an existing artifact is allowed
    assert kerasrt.load(path).engine_shapes == [((2, 5),)]
    assert not [p for p in tmp_path.iterdir() if p.name != "art"]


def test_weights_are_stored_once_across_engines(tmp_path: Path) -> None:
    from safetensors import safe_open

    inp = keras.Input((5,))
    model = randomize(keras.Model(inp, L.Dense(2)(inp)))
    conv = kerasrt.Converter(model, batch_size=2, maximum_cached_engines=2)
    optimized = conv.convert()
    optimized(random_input((3, 5)))
    path = conv.save(tmp_path / "art")
    with safe_open(str(path / "weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert (
        sorted(k for k in keys if "kernel" in k) == ["dense.kernel"]
        or len([k for k in keys if "kernel" in k]) == 1
    )
    assert len(kerasrt.load(path).engine_shapes) == 2


COMPILED_FRESH_PROCESS = """
import pickle, sys, numpy as np, torch, kerasrt

def forbidden(*args, **kwargs):
    raise AssertionError("pickle or a compiler used while loading a compiled artifact")

class ForbiddenUnpickler(pickle.Unpickler):  # a class: torch subclasses it at import time
    __init__ = forbidden

pickle.load, pickle.loads, pickle.Unpickler = forbidden, forbidden, ForbiddenUnpickler
torch.compile = forbidden  # the engines must come from their packages, not be compiled again

class NoCompilerImports:  # nor import dynamo or Inductor (1-5 s), nor probe the CPU (38 s)
    def find_spec(self, name, path=None, target=None):
        if name.startswith(("torch._inductor", "torch._dynamo")):
            raise AssertionError(f"{name} imported while loading a compiled artifact")

sys.meta_path.insert(0, NoCompilerImports())
model = kerasrt.load(sys.argv[1])
x = np.load(sys.argv[2])
np.save(sys.argv[3], model(x))
program = model.program(model.engine_shapes[0])
print(sorted(e.compiler for e in program.compiled_engines.values()))
"""


def run_packages_in_fresh_process(path: Path, x: np.ndarray, tmp_path: Path) -> np.ndarray:
    """The artifact's output for ``x``, computed in a fresh process that may not unpickle or
    compile: it must run the compiled engine packages."""
    np.save(tmp_path / "x.npy", x)
    args = [
        sys.executable,
        "-c",
        COMPILED_FRESH_PROCESS,
        str(path),
        str(tmp_path / "x.npy"),
        str(tmp_path / "y.npy"),
    ]
    proc = subprocess.run(args, env={**os.environ, "KERAS_BACKEND": "torch"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "['package']"
    return np.load(tmp_path / "y.npy")


def test_compiled_engines_are_saved_once_and_loaded_without_compiling(tmp_path: Path) -> None:
    inp = keras.Input((6, 6, 3), name="image")
    x = L.Conv2D(4, 3, padding="same", activation="relu")(inp)
    model = randomize(keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(x))))
    conv = kerasrt.Converter(model, batch_size=2, precision_mode="FP16", compiler="inductor")
    optimized = conv.convert()
    x = random_input((2, 6, 6, 3))
    expected = optimized(x)
    path = conv.save(tmp_path / "art")
    manifest = json.loads((path / "manifest.json").read_text())
    compiled = manifest["engines"][0]["compiled"]
    assert compiled["environment"]["device"].startswith("cpu") and compiled["environment"]["torch"]
    (package,) = compiled["files"].values()
    assert (path / package).stat().st_size > 0
    with zipfile.ZipFile(path / package) as archive:  # code only: the weights live in safetensors
        assert not [n for n in archive.namelist() if n.endswith((".pkl", ".pt", "constants.bin"))]

    got = run_packages_in_fresh_process(path, x, tmp_path)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-2 * np.abs(expected).max())

    ignored = kerasrt.load(path, compiled_engines=False)  # the user may refuse native code
    assert [e.compiler for e in ignored.program(ignored.engine_shapes[0]).compiled_engines.values()] == [
        "inductor"
    ]

    # engines built for another machine are never run: a warning, and they are recompiled
    compiled["environment"]["torch"] = "0.0-elsewhere"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="will be recompiled"):
        loaded = kerasrt.load(path)
    np.testing.assert_allclose(loaded(x), expected, rtol=0, atol=1e-2 * np.abs(expected).max())
    assert [e.compiler for e in loaded.program(loaded.engine_shapes[0]).compiled_engines.values()] == [
        "inductor"
    ]


def _small_compiling_converter() -> tuple[kerasrt.Converter, np.ndarray, np.ndarray]:
    """A converted one-conv model whose save compiles one AOTInductor package: (converter, an
    input, its output)."""
    inp = keras.Input((4, 4, 2))
    model = randomize(keras.Model(inp, L.Conv2D(3, 3, padding="same", activation="relu")(inp)))
    conv = kerasrt.Converter(model, batch_size=1, compiler="inductor")
    x = random_input((1, 4, 4, 2))
    return conv, x, conv.convert()(x)


def _small_compiled_artifact(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """An artifact with one AOTInductor package: (path, an input, its output)."""
    conv, x, expected = _small_compiling_converter()
    return conv.save(tmp_path / "art"), x, expected


STATIC_RUNTIME_CXX = """#!/bin/sh
case "$*" in *-shared*) exec g++ -static-libstdc++ "$@";; esac
exec g++ "$@"
"""
"""A C++ compiler that links a static copy of the C++ runtime into shared libraries (as the
GCC wrapper set as $CXX on the GPU machine does: its search path has only libstdc++.a)."""


@pytest.mark.slow
def test_packages_are_not_compiled_by_a_compiler_that_links_the_cxx_runtime_statically(
    tmp_path: Path,
) -> None:
    """Packages built by such a compiler do not load (the GPU machine: SIGSEGV in every CUDA
    package); kerasrt compiles them with a compiler that links the runtime shared, and says so."""
    from torch._inductor import config as inductor_config

    from kerasrt.backend.aoti import links_shared_cxx_runtime

    static = tmp_path / "static-runtime-g++"
    static.write_text(STATIC_RUNTIME_CXX)
    static.chmod(0o755)
    assert not links_shared_cxx_runtime(str(static))
    assert links_shared_cxx_runtime(shutil.which("g++"))

    conv, x, expected = _small_compiling_converter()
    with (
        inductor_config.patch({"cpp.cxx": (None, str(static))}),
        pytest.warns(UserWarning, match=r"links the C\+\+ runtime statically.*compiling them with"),
    ):
        path = conv.save(tmp_path / "art")
    got = run_packages_in_fresh_process(path, x, tmp_path)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_an_engine_that_fails_to_compile_ahead_of_time_is_saved_uncompiled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save() warns and leaves that engine's package out (no file left behind); load
    compiles the engine just in time and runs as the converted model did."""
    from kerasrt.backend.torch_backend import TorchEngine

    def fail(self, path):
        path.write_bytes(b"half-written")  # as a compiler dying mid-write would leave it
        raise RuntimeError("AOTInductor cannot lower this")

    conv, x, expected = _small_compiling_converter()
    monkeypatch.setattr(TorchEngine, "export_package", fail)
    with pytest.warns(UserWarning, match="could not be compiled ahead of time.*cannot lower this"):
        path = conv.save(tmp_path / "art")
    compiled = json.loads((path / "manifest.json").read_text())["engines"][0]["compiled"]
    assert compiled["files"] == {} and not list(path.rglob("*.pt2"))
    loaded = kerasrt.load(path)
    np.testing.assert_allclose(loaded(x), expected, rtol=1e-5, atol=1e-6)
    assert [e.compiler for e in loaded.program(loaded.engine_shapes[0]).compiled_engines.values()] == [
        "inductor"
    ]


def test_a_corrupt_compiled_engine_is_recompiled_with_a_warning(tmp_path: Path) -> None:
    path, x, expected = _small_compiled_artifact(tmp_path)
    (package,) = json.loads((path / "manifest.json").read_text())["engines"][0]["compiled"]["files"].values()
    (path / package).write_bytes(b"not a package")
    loaded = kerasrt.load(path)
    with pytest.warns(UserWarning, match="recompiling it"):
        np.testing.assert_allclose(loaded(x), expected, rtol=1e-5, atol=1e-6)


def test_a_package_whose_loader_crashes_is_tested_in_a_child_process_and_recompiled(
    tmp_path: Path, monkeypatch
) -> None:
    """A loader that segfaults (as it did on the GPU machine for packages with a static C++
    runtime) must not take the user's process down: the verdict comes from a test process."""
    from kerasrt import cache
    from kerasrt.backend import aoti

    monkeypatch.setenv("KERASRT_CACHE_DIR", str(tmp_path / "cache"))
    path, x, expected = _small_compiled_artifact(tmp_path)

    np.testing.assert_allclose(kerasrt.load(path)(x), expected, rtol=1e-5, atol=1e-6)
    assert list(cache.read_json("packages.json").values()) == [None]  # tested once: it loads

    (tmp_path / "cache" / "packages.json").unlink()
    _forget_test_loads(path, monkeypatch)  # as from a machine that could not test it
    monkeypatch.setattr(aoti, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    loaded = kerasrt.load(path)
    with pytest.warns(UserWarning, match=r"package loader crashed \(SIGSEGV\).*recompiling it"):
        np.testing.assert_allclose(loaded(x), expected, rtol=1e-5, atol=1e-6)
    assert [e.compiler for e in loaded.program(loaded.engine_shapes[0]).compiled_engines.values()] == [
        "inductor"
    ]
    monkeypatch.setattr(aoti, "_PROBE", "raise SystemExit(0)")  # the verdict is cached
    with pytest.warns(UserWarning, match="crashed"):
        kerasrt.load(path)(x)


def _forget_test_loads(path: Path, monkeypatch, digest: str | None = None) -> None:
    """Make the artifact at ``path`` vouch for ``digest`` instead of its packages' (nothing if
    None), and forget what this process was vouched for."""
    from kerasrt.backend import aoti

    manifest = json.loads((path / "manifest.json").read_text())
    for engine in manifest["engines"]:
        tested = engine["compiled"]["tested"]
        engine["compiled"]["tested"] = {i: digest for i in tested} if digest else {}
    (path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(aoti, "_VOUCHED", set())


def test_a_package_tested_where_it_was_built_loads_without_a_test_process(
    tmp_path: Path, monkeypatch
) -> None:
    """The building machine's test load travels in the artifact: a machine that never saw the
    model (empty cache) skips its own test process (3-4 s of a first inference on the GPU
    machine), unless the package file is not the one that was tested."""
    from kerasrt import cache
    from kerasrt.backend import aoti

    monkeypatch.setenv("KERASRT_CACHE_DIR", str(tmp_path / "building"))
    path, x, expected = _small_compiled_artifact(tmp_path)
    compiled = json.loads((path / "manifest.json").read_text())["engines"][0]["compiled"]
    (package,), (digest,) = compiled["files"].values(), compiled["tested"].values()
    assert digest == aoti.package_digest(path / package)

    monkeypatch.setenv("KERASRT_CACHE_DIR", str(tmp_path / "fresh"))
    monkeypatch.setattr(aoti, "_VOUCHED", set())
    monkeypatch.setattr(aoti, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    loaded = kerasrt.load(path)  # a test process would report a crash: none is started
    np.testing.assert_allclose(loaded(x), expected, rtol=1e-5, atol=1e-6)
    assert [e.compiler for e in loaded.program(loaded.engine_shapes[0]).compiled_engines.values()] == [
        "package"
    ]
    assert cache.read_json("packages.json") is None

    _forget_test_loads(path, monkeypatch, digest="0" * 20)  # vouches for another file
    loaded = kerasrt.load(path)
    with pytest.warns(UserWarning, match=r"package loader crashed \(SIGSEGV\)"):
        np.testing.assert_allclose(loaded(x), expected, rtol=1e-5, atol=1e-6)


def test_artifact_serves_new_shapes_from_its_source_graph_without_keras(tmp_path: Path) -> None:
    inp = keras.Input((6, 6, 3), name="image")
    model = randomize(keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(L.Conv2D(4, 3)(inp)))))
    conv = kerasrt.Converter(model, batch_size=2)
    optimized = conv.convert()
    path = conv.save(tmp_path / "lean")
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "weights.safetensors"]
    loaded = kerasrt.load(path)
    assert not loaded.keras.available
    x = random_input((2, 6, 6, 3))
    np.testing.assert_array_equal(loaded(x), optimized(x))
    for batch in (1, 3):  # engines compiled from the stored source graph
        x = random_input((batch, 6, 6, 3))
        assert_close(loaded(x), keras.ops.convert_to_numpy(model(x)), rtol=1e-5)
    fallback = kerasrt.Converter(_model_with_fallback(), batch_size=2)
    fallback.convert()
    with pytest.raises(kerasrt.ArtifactError, match=r"layers \['host'\] run in Keras"):
        fallback.save(tmp_path / "no", keras_model=False)
    assert not (tmp_path / "no").exists()
