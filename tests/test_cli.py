"""The command line, run as a user would: convert, inspect, validate, bench, demo, --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import layers as L

import kerasrt
from kerasrt.cli import main
from kerasrt.demo import MODEL_PATH
from kerasrt_testing import randomize


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    inp = keras.Input((6, 6, 2), name="image")
    x = L.Conv2D(4, 3, activation="relu", name="conv")(inp)
    model = randomize(keras.Model(inp, L.Dense(3, name="head")(L.Flatten()(x)), name="tiny"))
    path = tmp_path / "tiny.keras"
    model.save(path)
    return path


def test_convert_inspect_validate_bench(tmp_path: Path, model_file: Path, capsys) -> None:
    out = tmp_path / "tiny_krt"
    assert main(["convert", str(model_file), "-o", str(out), "--batch-size", "4"]) == 0
    text = capsys.readouterr().out
    assert "kerasrt conversion of 'tiny'" in text and "in 1 engine(s)" in text

    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input_shapes"] == [[4, 6, 6, 2]]
    assert report["segments"][0]["kind"] == "engine" and report["fallbacks"] == []
    assert report["ops"]["conv_fused"] == 1  # conv + bias + relu fused by the optimizer
    assert report["optimization"]["rules"]["fuse_activation"] == 1

    assert main(["inspect", str(out), "--graph"]) == 0
    assert "= conv_fused(" in capsys.readouterr().out

    assert main(["validate", str(model_file), str(out)]) == 0
    assert "OK" in capsys.readouterr().out

    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, image=np.random.default_rng(5).standard_normal((4, 6, 6, 2)).astype("float32"))
    assert main(["validate", str(model_file), str(out), "--inputs", str(inputs)]) == 0
    capsys.readouterr()

    # a self-contained artifact has no Keras model to compare against: one clear error, exit 2
    assert main(["bench", str(out), "--iters", "3"]) == 2
    assert "holds no Keras model" in capsys.readouterr().err
    assert main(["convert", str(model_file), "-o", str(out), "--batch-size", "4", "--keras-model"]) == 0
    capsys.readouterr()
    assert main(["bench", str(out), "--iters", "3", "--compare", "--systems", "keras-eager"]) == 0
    table, legend, notes = capsys.readouterr().out.partition("ms: time per call on the device")
    rows = [line.split() for line in table.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [("kerasrt", "4"), ("keras-eager", "4")]  # the engine's batch
    assert legend and "keras-eager (batch 4): policy float32" in notes


def test_validate_detects_a_different_model(tmp_path: Path, model_file: Path, capsys) -> None:
    out = tmp_path / "tiny_krt"
    assert main(["convert", str(model_file), "-o", str(out)]) == 0
    other = keras.saving.load_model(model_file)
    randomize(other, seed=99)
    other_file = tmp_path / "other.keras"
    other.save(other_file)
    assert main(["validate", str(other_file), str(out)]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_input_shape_and_keep_in_keras_options(tmp_path: Path, model_file: Path, capsys) -> None:
    out = tmp_path / "tiny_krt"
    args = [
        "convert",
        str(model_file),
        "-o",
        str(out),
        "--input-shape",
        "3,6,6,2",
        "--keep-in-keras",
        "conv",
        "--minimum-segment-size",
        "1",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "input shapes: [[3, 6, 6, 2]]" in text and "conv: kept in Keras" in text


def test_bad_shape_argument_exits_nonzero(model_file: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(model_file), "-o", str(tmp_path / "o"), "--input-shape", "a,b"])
    assert exc.value.code == 2


@pytest.mark.parametrize("command", [[], ["convert"], ["inspect"], ["validate"], ["bench"], ["demo"]])
def test_help(command: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: kerasrt" in capsys.readouterr().out


def test_demo_reports_accuracy_error_and_timing(capsys) -> None:
    assert main(["demo", "--iters", "3"]) == 0
    text = capsys.readouterr().out
    assert "max abs error vs Keras" in text and "OK" in text
    assert "accuracy on 360 test images: Keras 99.17%, kerasrt 99.17%" in text
    assert "ms/batch" in text


def test_console_script_and_other_keras_backend(tmp_path: Path) -> None:
    """`kerasrt` as installed; conversion from a process whose Keras runs on another backend."""
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    script = (
        "import numpy as np, keras, kerasrt\n"
        "assert keras.backend.backend() == 'jax'\n"
        f"conv = kerasrt.Converter({str(MODEL_PATH)!r}, batch_size=2)\n"
        "m = conv.convert()\n"
        "x = np.random.default_rng(0).uniform(0, 16, (2, 8, 8, 1)).astype('float32')\n"
        "ref = keras.saving.load_model(" + repr(str(MODEL_PATH)) + ")(x)\n"
        "assert np.abs(m(x) - np.asarray(ref)).max() < 1e-4, 'mismatch'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
    # a fallback layer runs on the caller's backend (JAX) at inference
    script = (
        "import sys; sys.path.insert(0, " + repr(str(Path(__file__).parent)) + ")\n"
        "import numpy as np, keras, kerasrt\n"
        "from test_models import HostRoundTrip\n"
        "inp = keras.Input((6,))\n"
        "x = keras.layers.Dense(6)(inp)\n"
        "model = keras.Model(inp, keras.layers.Dense(2)(HostRoundTrip(name='host')(x)))\n"
        "m = kerasrt.Converter(model, batch_size=3).convert()\n"
        "assert [n.layer for n in m.primary_graph().nodes if n.op == 'keras_layer'] == ['host']\n"
        "x = np.random.default_rng(0).standard_normal((3, 6)).astype('float32')\n"
        "assert np.abs(m(x) - np.asarray(model(x))).max() < 1e-5, 'mismatch'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kerasrt_bin = Path(sys.executable).with_name("kerasrt")
    proc = subprocess.run(
        [str(kerasrt_bin), "inspect", str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "not a kerasrt artifact" in proc.stderr


def test_batch_profile_option_round_trips_through_the_artifact(tmp_path: Path, model_file: Path) -> None:
    out = tmp_path / "profiled_krt"
    assert main(["convert", str(model_file), "-o", str(out), "--batch-profile", "1,2,4"]) == 0
    loaded = kerasrt.load(out)
    assert loaded.settings.batch_profile == (1, 2, 4)
    assert sorted(k[0][0] for k in loaded.engine_shapes) == [2, 4]
    x = np.random.default_rng(0).standard_normal((3, 6, 6, 2)).astype("float32")
    assert loaded(x).shape[0] == 3
    assert main(["convert", str(model_file), "-o", str(tmp_path / "bad"), "--batch-profile", "4,2,8"]) == 2
    assert not (tmp_path / "bad").exists()


def test_conv_kernels_option(tmp_path: Path, model_file: Path, capsys) -> None:
    out = tmp_path / "inductor_krt"
    assert main(["convert", str(model_file), "-o", str(out), "--conv-kernels", "inductor"]) == 0
    assert kerasrt.load(out).settings.conv_kernels == "inductor"
    bad = tmp_path / "cudnn_on_cpu"
    args = ["convert", str(model_file), "-o", str(bad), "--precision", "fp16", "--conv-kernels", "cudnn"]
    assert main([*args, "--device", "cpu"]) != 0
    assert "nvidia-cudnn-frontend" in capsys.readouterr().err and not bad.exists()


def test_error_messages_keep_their_brackets(tmp_path: Path, capsys) -> None:
    """An error naming "[abc]" (a path, an extra such as kerasrt[serve]) is printed as it is,
    not read as rich markup and dropped."""
    missing = tmp_path / "model[abc].keras"
    assert main(["convert", str(missing), "-o", str(tmp_path / "out")]) == 2
    assert "model[abc].keras" in capsys.readouterr().err.replace("\n", "")
