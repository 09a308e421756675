"""Check a converted model against the original Keras model on the same inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kerasrt.frontend import keras_adapter as ka
from kerasrt.runtime import OptimizedModel


@dataclass(frozen=True)
class OutputError:
    """How far one output is from Keras: absolute, and relative to the output's scale."""

    name: str
    max_abs: float
    scale: float
    ok: bool

    @property
    def max_rel(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else self.max_abs


def random_inputs(model: OptimizedModel, batch: int, seed: int = 0) -> list[np.ndarray]:
    """Fresh random inputs for every input of a converted model (unknown dims set to 8)."""
    shapes = [
        ((batch, *(d if d is not None else 8 for d in spec.shape[1:])), spec.dtype) for spec in model.inputs
    ]
    return random_inputs_for(shapes, seed)


def random_inputs_for(specs: Sequence[tuple[Sequence[int], str]], seed: int = 0) -> list[np.ndarray]:
    """Random arrays of the given (shape, dtype): normal floats, small non-negative ints."""
    rng = np.random.default_rng(seed)
    arrays = []
    for shape, dtype in specs:
        shape = tuple(shape)
        if dtype.startswith(("float", "bfloat")):
            arrays.append(rng.standard_normal(shape).astype("float32" if dtype == "bfloat16" else dtype))
        elif dtype == "bool":
            arrays.append(rng.integers(0, 2, shape).astype(bool))
        else:
            arrays.append(rng.integers(0, 2, shape).astype(dtype))
    return arrays


def keras_outputs(keras_model: Any, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The Keras model's outputs as numpy arrays, in inference mode."""
    keras = ka.keras_module()
    out = keras_model(ka.call_inputs(keras_model, inputs), training=False)
    return [np.asarray(keras.ops.convert_to_numpy(o)) for o in ka.flatten(out)]


def compare(
    keras_model: Any,
    model: OptimizedModel,
    inputs: Sequence[np.ndarray],
    rtol: float = 1e-4,
    atol: float = 1e-6,
) -> list[OutputError]:
    """Per-output errors of ``model`` against Keras; ok when max_abs <= atol + rtol * scale."""
    expected = keras_outputs(keras_model, inputs)
    got = model(*inputs)
    got = got if isinstance(got, list) else [got]
    names = (
        model.output_names
        if len(model.output_names) == len(got)
        else [f"output_{i}" for i in range(len(got))]
    )
    results = []
    for name, ref, out in zip(names, expected, got):
        if ref.shape != out.shape:
            results.append(OutputError(name, float("inf"), 0.0, False))
            continue
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        max_abs = float(np.max(np.abs(ref64 - out64))) if ref.size else 0.0
        scale = float(np.max(np.abs(ref64))) if ref.size else 0.0
        ok = bool(np.isfinite(max_abs)) and max_abs <= atol + rtol * scale
        results.append(OutputError(name, max_abs, scale, ok))
    return results
