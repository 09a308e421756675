"""Prometheus metrics of a serving process, labelled by model: requests by outcome, time waiting
in the queue, engine compute time per batch, rows per batch, GPU memory. They are registered
in the registry given (the default one, which KServe's ``/metrics`` endpoint exposes)."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

OUTCOMES = ("ok", "failed", "rejected", "timeout")
"""ok: answered; failed: its batch raised; rejected: queue full or shutting down; timeout."""


class ServingMetrics:
    """The metrics of one server; ``registry``: where they are registered (once per process)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.request_count = Counter(
            "kerasrt_requests", "Inference requests by outcome", ["model", "outcome"], registry=registry
        )
        self.queue_seconds = Histogram(
            "kerasrt_queue_seconds",
            "Time a request waited before its batch ran",
            ["model"],
            registry=registry,
            buckets=(1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        self.compute_seconds = Histogram(
            "kerasrt_compute_seconds",
            "Engine time of one batch",
            ["model"],
            registry=registry,
            buckets=(1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5),
        )
        self.batch_rows = Histogram(
            "kerasrt_batch_size",
            "Rows per engine call (before padding)",
            ["model"],
            registry=registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self.gpu_memory = Gauge(
            "kerasrt_gpu_memory_bytes", "GPU memory allocated by PyTorch", registry=registry
        )
        self.gpu_memory.set_function(_gpu_memory)

    def requests(self, model: str, outcome: str, n: int = 1) -> None:
        self.request_count.labels(model, outcome).inc(n)

    def batch(self, model: str, waits: Sequence[float], compute: float, rows: int) -> None:
        """A batch of ``len(waits)`` requests ran: each waited ``waits[i]`` s, it took ``compute`` s."""
        self.requests(model, "ok", len(waits))
        for wait in waits:
            self.queue_seconds.labels(model).observe(wait)
        self.compute_seconds.labels(model).observe(compute)
        self.batch_rows.labels(model).observe(rows)


def _gpu_memory() -> float:
    import torch

    return float(torch.cuda.memory_allocated()) if torch.cuda.is_available() else 0.0
