"""Basic timing: median wall time per batch for Keras and for the converted model."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    """Median and spread of per-call times in milliseconds."""

    name: str
    median_ms: float
    min_ms: float
    max_ms: float
    iters: int


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(name: str, fn: Callable[[], Any], warmup: int = 3, iters: int = 20) -> Timing:
    """Time ``fn`` after ``warmup`` calls; device work is waited for on CUDA."""
    for _ in range(warmup):
        fn()
    _sync()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing(name, statistics.median(samples), min(samples), max(samples), iters)


def compare_keras(
    keras_model: Any, model: Any, inputs: Sequence[Any], warmup: int = 3, iters: int = 20
) -> list[Timing]:
    """Keras eager (current backend, inference mode) vs kerasrt on the same numpy inputs."""
    args = inputs[0] if len(inputs) == 1 else list(inputs)
    keras_t = time_call("keras", lambda: keras_model(args, training=False), warmup, iters)
    device = getattr(model, "device", torch.device("cpu"))
    tensors = [torch.as_tensor(x).to(device) for x in inputs]
    krt_t = time_call("kerasrt", lambda: model(*tensors), warmup, iters)
    return [keras_t, krt_t]
