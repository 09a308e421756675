"""The divergence finder: it names the layer whose lowering is wrong, or the optimizer
rewrite that broke the outputs, and stays quiet on a correct conversion."""

from __future__ import annotations

import keras
import pytest
from keras import layers as L

from kerasrt import passes
from kerasrt.cli import main
from kerasrt.debug import find_divergence
from kerasrt.frontend import aten
from kerasrt.passes.base import Pass, emit, replace, rule
from kerasrt_testing import random_input, randomize


def small_model() -> keras.Model:
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, padding="same", name="conv")(inp)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="act")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return randomize(keras.Model(inp, L.Dense(3, name="head")(x)))


def test_no_divergence_on_a_correct_conversion() -> None:
    assert find_divergence(small_model(), [random_input((2, 6, 6, 3))]) is None


def test_a_wrong_lowering_is_pinned_to_its_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(aten.LOWERINGS, aten.aten.relu.default, lambda c, a: c.emit("sigmoid", [a["input"]]))
    found = find_divergence(small_model(), [random_input((2, 6, 6, 3))])
    assert found is not None and found.stage == "import" and found.layer == "act"


@rule("broken_rule", "relu")
def broken(graph, node):
    return replace(graph, node, emit(graph, node, "sigmoid", [node.inputs[0]]))


def test_a_wrong_rewrite_is_found_by_bisection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(passes.LEVELS, 2, (Pass("broken", (broken,)), *passes.LEVELS[2]))
    found = find_divergence(small_model(), [random_input((2, 6, 6, 3))])
    assert found is not None and found.stage == "optimize"
    assert "broken_rule" in found.detail and found.layer == "act"


def test_cli_debug_reduce(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    path = tmp_path / "m.keras"
    small_model().save(path)
    assert main(["debug", "reduce", str(path)]) == 0
    assert "no divergence" in capsys.readouterr().out
    monkeypatch.setitem(
        aten.LOWERINGS,
        aten.aten.mean.dim,
        lambda c, a: c.emit("reduce_max", [a["input"]], dims=a["dim"], keepdim=a["keepdim"]),
    )
    assert main(["debug", "reduce", str(path)]) == 1
    assert "layer 'gap' is the first to diverge" in capsys.readouterr().out
