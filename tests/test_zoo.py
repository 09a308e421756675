"""bench/zoo.py: its table covers keras.applications at each architecture's default
resolution, its comparison picks the fastest peer, and a CPU run writes a record that
``--resume`` continues and ``--report`` prints. (Zoo timings belong in BENCHMARKS.md; every zoo
architecture's conversion is checked against Keras in test_applications.py.)"""

from __future__ import annotations

import json
import os
import sys

import keras
import pytest

from kerasrt.bench import Result
from kerasrt_testing import application

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import zoo


def test_every_application_is_in_the_zoo_with_a_peer() -> None:
    table = zoo.zoo()
    apps = [n for n in dir(keras.applications) if n[:1].isupper()]
    assert set(apps) <= set(table)
    without = {n for n in apps if table[n].peer is None}
    assert without == {"NASNetMobile"}  # no library has it
    for entry in table.values():
        assert entry.peer is None or entry.peer.split(":")[0] in ("torchvision", "timm", "transformers")
    for name in apps:  # batches 1 and 128, or a note that says why not 128
        assert table[name].batches[0] == 1 and (table[name].batches[-1] == 128 or table[name].note)


@pytest.mark.parametrize("name", [*zoo.DEFAULT_SIDES, "ResNet50", "ConvNeXtTiny"])
def test_zoo_resolution_is_the_architecture_default(name: str) -> None:
    built = application(name)  # no input_shape: the constructor's own default
    assert built.input_shape[1] == zoo.DEFAULT_SIDES.get(name, 224)
    keras.backend.clear_session()


def _row(system: str, p50: float, model: str = "M", batch: int = 1, err: float | None = None) -> Result:
    return Result(
        system, batch, "FP16", {"p50": p50}, batch / p50 * 1e3, 5, max_rel_err=err, extra={"model": model}
    )


def test_comparison_is_against_the_fastest_peer_not_the_floor() -> None:
    rows = [
        _row("kerasrt", 1.0, err=2e-3),
        _row("keras-jax-jit", 3.0),
        _row("torch-compile", 1.5),
        _row("keras-eager", 50.0, err=4e-3),
        _row("kerasrt", 10.0, batch=128),
        _row("torch-compile", 8.0, batch=128),
        Result("kerasrt", 1, "FP16", {}, 0.0, 0, note="RuntimeError: no kernel", extra={"model": "N"}),
        _row("torch-compile", 2.0, model="N"),
    ]
    table = {(c["model"], c["batch"]): c for c in zoo.comparisons(rows)}
    assert table[("M", 1)]["peer"].system == "torch-compile"
    assert table[("M", 1)]["speedup"] == pytest.approx(1.5)
    assert table[("M", 1)]["keras_mixed_err"] == 4e-3
    assert table[("M", 128)]["speedup"] == pytest.approx(0.8)
    assert table[("N", 1)]["kerasrt"] is None and "no kernel" in table[("N", 1)]["failure"]
    text = zoo.markdown(rows, {"device": "cpu", "torch": "t", "keras": "k", "date": "d"}, "cmd")
    assert "geometric-mean speedup over the fastest peer 1.50x over 1 rows; 0 rows below 1.0x" in text
    assert "large batch: geometric-mean speedup over the fastest peer 0.80x over 1 rows; 1 rows below" in text
    assert "kerasrt failed on 1 rows: N b1" in text


@pytest.mark.slow
def test_a_cpu_run_writes_a_record_that_resumes_and_reports(tmp_path, capsys) -> None:
    out = str(tmp_path / "zoo.json")
    args = ["--models", "MobileNetV3Small", "--batches", "1", "--precision", "FP32", "--no-peers"]
    args += ["--systems", "kerasrt,keras-eager", "--iters", "2", "--out", out, "--profile"]
    zoo.main(args)
    record = json.loads(open(out).read())
    systems = {r["system"]: r for r in record["results"]}
    assert set(systems) == {"kerasrt", "keras-eager"} and record["device"] == "cpu"
    assert systems["kerasrt"]["max_rel_err"] < 1e-4  # FP32 against Keras FP32
    assert systems["keras-eager"]["max_rel_err"] == 0.0  # Keras FP32 is the reference itself
    top = systems["kerasrt"]["extra"]["top_kernels"]  # on a CPU: operators by their own time
    assert top and any("conv" in k["name"] for k in top) and 0 < sum(k["share"] for k in top) <= 1.001
    capsys.readouterr()
    zoo.main([*args, "--resume"])  # nothing left to measure: the record is kept as it was
    assert json.loads(open(out).read())["results"] == record["results"]
    zoo.main(["--report", out])
    text = capsys.readouterr().out
    assert "| MobileNetV3Small | 1 | kerasrt  |" in text and "keras-eager policy float32" in text
    assert "- MobileNetV3Small b1 kerasrt: aten::" in text  # the profile


def test_the_stored_gpu_record_reports(capsys) -> None:
    """bench/records holds the zoo's record so far, for --resume on the GPU machine: it must
    stay readable by this code."""
    record = os.path.join(os.path.dirname(__file__), "..", "bench", "records", "zoo-h100.json")
    zoo.main(["--report", record])
    text = capsys.readouterr().out
    assert text.startswith("Card: NVIDIA H100") and "| ConvNeXtTiny | 128 |" in text
    assert "geometric-mean speedup over the fastest peer" in text
