"""Triton candidates compiled in worker processes before the tactics time them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras
import pytest
import torch
from keras import layers as L

import kerasrt
from kerasrt.backend import compile_workers, splitk_conv, tactics
from kerasrt_testing import randomize

TESTS = Path(__file__).parent


def test_a_task_describes_the_launch_arguments_and_a_worker_rebuilds_them() -> None:
    x = torch.randn(2, 16, 5, 7, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    t = compile_workers.task("some.kernel", 2, (x, None, (1, 2), [0, 0], "relu", 6.0))
    t = json.loads(json.dumps(t))  # what crosses to the worker
    assert (t["module"], t["config"]) == ("some.kernel", 2)
    rebuilt = [compile_workers.materialize(a, torch.device("cpu")) for a in t["args"]]
    assert (rebuilt[0].shape, rebuilt[0].stride(), rebuilt[0].dtype) == (x.shape, x.stride(), x.dtype)
    assert rebuilt[1:] == [None, [1, 2], [0, 0], "relu", 6.0]


def test_tasks_are_dealt_without_duplicates_one_kernel_config_to_one_worker() -> None:
    def t(config: int, shape: list[int], dtype: str = "float16") -> dict:
        return compile_workers.task("k", config, (torch.empty(shape, dtype=getattr(torch, dtype)), "relu"))

    tasks = [t(0, [1, 8]), t(0, [2, 8]), t(0, [1, 8]), t(1, [1, 8]), t(0, [1, 8], "bfloat16"), t(2, [4, 4])]
    dealt = compile_workers.shares(tasks, 3)
    assert sorted(len(s) for s in dealt) == [1, 2, 2]  # the duplicate dropped; 4 groups, 3 workers
    assert sorted(json.dumps(t, sort_keys=True) for s in dealt for t in s) == sorted(
        {json.dumps(t, sort_keys=True) for t in tasks}
    )
    (together,) = [s for s in dealt if tasks[1] in s]  # config 0 in float16: both shapes
    assert tasks[0] in together
    assert compile_workers.shares(tasks, 8) and len(compile_workers.shares(tasks, 8)) == 4


def test_workers_launch_each_task_once_in_fresh_processes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    record = str(tmp_path / "launches.txt")
    tasks = [
        compile_workers.task("recording_kernel", config, (torch.empty(n, 4), flag, record))
        for config in range(3)
        for n in (1, 2)
        for flag in ("a", "b")
    ]
    assert compile_workers.compile_all(tasks[:4], workers=2, device="cpu") == 0  # too few to bother
    assert not os.path.exists(record)
    assert compile_workers.compile_all(tasks + tasks[:3], workers=2, device="cpu") == 2
    lines = Path(record).read_text().splitlines()
    launched = sorted(line.split(" ", 1)[1] for line in lines)
    expected = sorted(
        f"{c} [{n}, 4] [4, 1] torch.float32 {flag}" for c in (16, 32) for n in (1, 2) for flag in "ab"
    )
    assert launched == expected  # each once; the config that raises launched nothing
    assert len({line.split()[0] for line in lines}) == 2  # in two processes, neither this one
    assert str(os.getpid()) not in {line.split()[0] for line in lines}


def test_the_worker_count_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv(compile_workers.WORKERS_VARIABLE, "3")
    assert compile_workers.worker_count() == 3
    monkeypatch.setenv(compile_workers.WORKERS_VARIABLE, "many")
    with pytest.raises(ValueError, match="KERASRT_COMPILE_WORKERS must be a whole number"):
        compile_workers.worker_count()
    monkeypatch.delenv(compile_workers.WORKERS_VARIABLE)
    assert 0 <= compile_workers.worker_count() <= 8


def test_tactics_compile_the_candidates_of_unmeasured_convolutions_first(tmp_path: Path, monkeypatch) -> None:
    inp = keras.Input((7, 7, 32), name="image")
    x = L.Conv2D(32, 3, padding="same", activation="relu")(inp)
    x = L.Conv2D(64, 3, padding="same")(x)
    model = randomize(keras.Model(inp, L.GlobalAveragePooling2D()(x)))
    graph = kerasrt.Converter(model, batch_size=1, precision_mode="FP16").convert().primary_graph()
    convs = [n for n in graph.nodes if tactics.eligible(n)]
    assert len(convs) == 2 and all(splitk_conv.eligible(n) for n in convs)

    monkeypatch.setenv("KERASRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tactics, "_TABLES", {})
    monkeypatch.setattr(splitk_conv, "available", lambda device: True)  # the split-K kernel "runs" here
    handed: list[list[dict]] = []
    monkeypatch.setattr(compile_workers, "compile_all", lambda tasks, device: handed.append(tasks))
    timed: list[str] = []

    def measure(node, ops, sig, mode):  # the timing sees real operands, after the compiles
        timed.append(str(ops.x.device))
        return tactics.Choice("splitk", splitk_ms=0.1, splitk_config=0)

    monkeypatch.setattr(tactics, "_measure", measure)
    cpu = torch.device("cpu")
    tactics.choose(graph.nodes, cpu, "auto")
    configs = [
        i for i, c in enumerate(splitk_conv.CONFIGS) if splitk_conv.splits_as_configured(c, (1, 32, 7, 7))
    ]
    assert configs  # batch 1 at 7x7: configs that split fully
    (tasks,) = handed
    assert {t["module"] for t in tasks} == {"kerasrt.backend.splitk_conv"}
    assert sorted(t["config"] for t in tasks) == sorted(configs * 2)  # both convolutions
    assert {t["args"][0]["dtype"] for t in tasks} == {"float16"} and timed == ["cpu", "cpu"]
    tactics.choose(graph.nodes, cpu, "auto")  # measured: nothing to compile or time
    assert handed[1] == [] and len(timed) == 2
