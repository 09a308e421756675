"""`kerasrt bench`: the JSON schema, the compared systems, the plot, bad arguments.
(Timings themselves belong in BENCHMARKS.md; here only their shape and consistency.)"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import pytest
import torch
from keras import layers as L

from kerasrt.bench import SCHEMA_VERSION, SYSTEMS, bench_keras_model, dynamo_census
from kerasrt.cli import main
from kerasrt_testing import randomize


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    inp = keras.Input((6, 6, 2))
    x = L.Conv2D(4, 3, padding="same", activation="relu")(inp)
    model = randomize(keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling2D()(x))))
    path = tmp_path_factory.mktemp("bench") / "tiny.keras"
    model.save(path)
    return path


def test_bench_compare_writes_the_documented_json_and_plot(model_file: Path, tmp_path: Path, capsys) -> None:
    report, picture = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", str(model_file), "--batch", "1,3", "--precision", "fp16", "--compare"]
    args += ["--json", str(report), "--plot", str(picture), "--iters", "4", "--warmup", "1"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "p50 ms" in text and "keras-jax-jit" in text and "ms: time per call on the device" in text
    data = json.loads(report.read_text())
    assert data["schema"] == SCHEMA_VERSION and data["precision"] == "FP16"
    assert {"date", "torch", "keras", "device", "model"} <= set(data)
    rows = data["results"]
    assert [(r["system"], r["batch"]) for r in rows] == [(s, b) for b in (1, 3) for s in SYSTEMS]
    for r in rows:
        lat = r["latency_ms"]
        assert set(lat) == {"mean", "p50", "p90", "p95", "p99", "min", "max"}, r
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        # samples/s at the median: batch / p50 (the rounded p50 above), itself rounded to 0.1, so
        # at most 0.05 off whatever the latency (a busy CPU makes it small); the rel term only
        # absorbs float error at large throughputs. A wrong batch factor is off by far more.
        expected = r["batch"] / lat["p50"] * 1e3
        assert r["throughput"] == pytest.approx(expected, abs=0.05 + 1e-9, rel=1e-9)
        assert r["precision"] == "FP16" and r["iters"] == 4
        assert r["max_rel_err"] < 0.05  # every system computed the same function (16-bit)
    compiled_rows = [r for r in rows if r["system"] == "keras-torch-compile"]
    assert all("Dynamo compiled" in r["note"] for r in compiled_rows)
    assert f"keras-torch-compile (batch 3): {compiled_rows[1]['note']}" in text  # under the table
    kerasrt_rows = [r for r in rows if r["system"] == "kerasrt"]
    assert all(r["build_s"] is not None and r["build_s"] >= 0 for r in kerasrt_rows)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dynamo_census_counts_graphs_breaks_and_frames_left_eager() -> None:
    """The keras-torch-compile row's note: how much of the call torch.compile compiled."""

    def broken(x):
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos()

    with dynamo_census() as census:
        torch.compile(broken, backend="eager")(torch.randn(4))
    counts = [census[k] for k in ("graphs", "graph_breaks", "frames", "eager_frames")]
    assert counts == [2, 1, 2, 0]

    twice = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=1), dynamo_census() as census:
        twice(torch.randn(4))
        twice(torch.randn(4, dtype=torch.float64))  # a recompile past the limit: runs eagerly
    assert (census["graphs"], census["eager_frames"]) == (1, 1)
    assert census["summary"] == "Dynamo compiled 1 graphs, 0 graph breaks, 1 of 2 frames left eager"


def test_bench_an_artifact_runs_its_own_engines_at_its_shapes(model_file: Path, tmp_path: Path) -> None:
    """Like trtexec --loadEngine: the saved batch runs the artifact's engines (build time is
    load + first call); another batch is converted from its Keras model, at its precision."""
    artifact = tmp_path / "tiny_krt"
    args = [
        "convert",
        str(model_file),
        "-o",
        str(artifact),
        "--precision",
        "bf16",
        "--batch-size",
        "2",
        "--keras-model",
    ]
    assert main(args) == 0
    report = tmp_path / "a.json"
    assert main(["bench", str(artifact), "--batch", "2,3", "--iters", "3", "--json", str(report)]) == 0
    saved, other = json.loads(report.read_text())["results"]
    for row, batch in ((saved, 2), (other, 3)):
        assert row["system"] == "kerasrt" and row["precision"] == "BF16" and row["batch"] == batch
        assert row["max_rel_err"] < 0.05 and row["build_s"] >= 0
    assert saved["note"].startswith("the artifact's engines (loaded)")
    assert "artifact" not in other["note"]


def test_bench_reports_each_system_and_kerasrt_s_build_steps(model_file: Path) -> None:
    heard: list[str] = []
    model = keras.saving.load_model(model_file)
    bench_keras_model(
        model, [2], systems=["kerasrt", "keras-eager"], warmup=1, iters=2, progress=heard.append
    )
    assert heard[0] == "kerasrt, batch 2" and heard[-1] == "keras-eager, batch 2"
    assert "kerasrt, batch 2: building the engines for input shapes (2, 6, 6, 2)" in heard
    assert all(m.startswith("kerasrt, batch 2: ") for m in heard[1:-1])  # the build's own steps


@pytest.mark.parametrize(
    "extra, message",
    [(["--batch", "0"], "batch sizes must be positive"), (["--precision", "int4"], "invalid choice")],
)
def test_bench_bad_arguments_exit_2(model_file: Path, extra: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", str(model_file), *extra])
    assert exc.value.code == 2 and message in capsys.readouterr().err
