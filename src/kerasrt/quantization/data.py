"""Calibration data named on the command line: an ``.npz``/``.npy`` file of samples, or a
Python generator function (``module:function`` or ``path/to/file.py:function``) that yields
batches of the model's inputs, as ``calibration_input_fn`` does in the Python API."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kerasrt.quantization.calibrate import CalibrationError
from kerasrt.user_modules import load_module


def calibration_input_fn(
    spec: str, input_names: Sequence[str], batch_size: int
) -> Callable[[], Iterator[Any]]:
    """The batches ``spec`` names, as a function yielding them."""
    if batch_size < 1:
        raise CalibrationError(f"the calibration batch size must be >= 1, got {batch_size}")
    path = Path(spec)
    if path.suffix.lower() in (".npz", ".npy"):
        arrays = _arrays(path, input_names)
        count = len(arrays[0])

        def batches() -> Iterator[Any]:
            for start in range(0, count, batch_size):
                chunk = [a[start : start + batch_size] for a in arrays]
                yield chunk if len(chunk) > 1 else chunk[0]

        return batches
    if ":" in spec:
        return _generator(spec)
    raise CalibrationError(
        f"calibration data {spec!r} is neither an .npz/.npy file nor a generator function "
        "('module:function' or 'file.py:function')"
    )


def _arrays(path: Path, input_names: Sequence[str]) -> list[np.ndarray]:
    """One array per model input: an .npy file or an .npz's single array feeds a
    single-input model; otherwise the .npz names each input."""
    if not path.exists():
        raise CalibrationError(f"calibration data file {path} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise CalibrationError(f"cannot read calibration data {path}: {exc}") from None
    if isinstance(loaded, np.ndarray):
        found = {"": loaded}
    else:
        with loaded:
            found = {k: loaded[k] for k in loaded.files}
    if len(found) == 1 and len(input_names) == 1:
        arrays = list(found.values())
    else:
        missing = [n for n in input_names if n not in found]
        if missing:
            raise CalibrationError(
                f"calibration data {path} has arrays {sorted(found)}; the model's inputs are "
                f"{list(input_names)} (name one array per input)"
            )
        arrays = [found[n] for n in input_names]
    counts = {len(a) if a.ndim else 0 for a in arrays}
    if len(counts) != 1 or 0 in counts:
        raise CalibrationError(
            f"calibration data {path}: every input needs the same, nonzero number of samples"
        )
    return arrays


def _generator(spec: str) -> Callable[[], Iterator[Any]]:
    where, _, name = spec.rpartition(":")
    module = load_module(where, "calibration generator", CalibrationError)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise CalibrationError(f"{where} has no function {name!r} to yield calibration batches")
    return fn
