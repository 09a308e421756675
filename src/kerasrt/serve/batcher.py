"""Dynamic batching: requests that arrive within ``max_queue_delay_ms`` of the first one waiting
are concatenated, up to ``max_batch_size`` rows, and run as one engine call; each request gets
its own rows of the outputs back.

One batch runs at a time per model (a GPU runs one engine call at a time anyway), on a worker
thread, so the event loop keeps taking requests while it computes. The queue is bounded: a
request that finds ``max_queue_size`` requests waiting is refused at once (``QueueFull``),
never left to hang; one that waits longer than ``timeout_s`` fails with ``RequestTimeout``
(its rows are dropped if they have not run yet). An engine error fails the requests of that
batch only. ``close()`` refuses new requests and returns once every accepted one is answered.

A batch is padded to a power of two rows (repeating its last row; the padding is dropped
from the outputs), so a model serves every traffic pattern from at most log2(max_batch_size)+1
engine shapes instead of building one per batch size.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from kerasrt.serve.metrics import ServingMetrics

log = logging.getLogger(__name__)
Run = Callable[[list[np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class BatchingConfig:
    """How requests are batched; the CLI's ``--max-batch-size`` and its kin."""

    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 256
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue_size < 1:
            raise ValueError("max_batch_size and max_queue_size must be >= 1")
        if self.max_queue_delay_ms < 0 or self.timeout_s <= 0:
            raise ValueError("max_queue_delay_ms must be >= 0 and timeout_s > 0")

    def bucket(self, rows: int) -> int:
        """The engine batch that serves ``rows`` rows: the next power of two, at most
        ``max_batch_size`` (a single larger request runs at its own size)."""
        if rows >= self.max_batch_size:
            return rows
        return min(1 << (rows - 1).bit_length(), self.max_batch_size)


class QueueFull(RuntimeError):
    """The model's queue holds ``max_queue_size`` requests: try again later (HTTP 503)."""


class RequestTimeout(RuntimeError):
    """A request waited longer than ``timeout_s`` for its result."""


class Closed(RuntimeError):
    """The model is shutting down and takes no new requests."""


@dataclass(eq=False)
class _Request:
    inputs: list[np.ndarray]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def rows(self) -> int:
        return int(self.inputs[0].shape[0])

    @property
    def signature(self) -> tuple:
        """What must agree for requests to share a batch: every input's trailing shape, dtype."""
        return tuple((a.shape[1:], a.dtype.str) for a in self.inputs)


class DynamicBatcher:
    """Batches the requests of one model; ``run`` computes a batch (list of input arrays, rows
    first) and returns its outputs (rows first)."""

    def __init__(
        self, run: Run, config: BatchingConfig, metrics: ServingMetrics | None = None, name: str = "model"
    ):
        self.run = run
        self.config = config
        self.metrics = metrics
        self.name = name
        self._pending: deque[_Request] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"kerasrt-{name}")
        self._closing = False
        self._idle: asyncio.Event | None = None

    async def submit(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The outputs of one request (its own rows), once its batch has run."""
        if self._closing:
            self._count("rejected")
            raise Closed(f"model {self.name!r} is shutting down")
        if len(self._pending) >= self.config.max_queue_size:
            self._count("rejected")
            raise QueueFull(
                f"model {self.name!r} has {len(self._pending)} requests waiting (max_queue_size "
                f"{self.config.max_queue_size}); try again later"
            )
        loop = asyncio.get_running_loop()
        request = _Request(list(inputs), loop.create_future())
        self._pending.append(request)
        self._start(loop)
        self._arrived.set()
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), self.config.timeout_s)
        except asyncio.TimeoutError:
            if request in self._pending:
                self._pending.remove(request)
            self._count("timeout")
            raise RequestTimeout(
                f"no result from model {self.name!r} within {self.config.timeout_s:g} s"
            ) from None

    async def close(self) -> None:
        """Take no new requests; return when every accepted one is answered."""
        self._closing = True
        if self._worker is not None:
            self._arrived.set()
            await self._worker
        self._executor.shutdown(wait=True)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._serve())

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending or not self._closing:
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._gather()
            batch = self._take()
            if batch:
                await self._run_batch(loop, batch)

    async def _gather(self) -> None:
        """Wait until the batch is full or the first request has waited the queue delay."""
        deadline = self._pending[0].enqueued + self.config.max_queue_delay_ms / 1e3
        while sum(r.rows for r in self._pending) < self.config.max_batch_size and not self._closing:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[_Request]:
        """The requests of the next batch: the oldest, and those after it that fit its shapes
        and the row limit."""
        first = self._pending.popleft()
        batch, rows = [first], first.rows
        kept: deque[_Request] = deque()
        while self._pending:
            request = self._pending.popleft()
            if request.signature == first.signature and rows + request.rows <= self.config.max_batch_size:
                batch.append(request)
                rows += request.rows
            else:
                kept.append(request)
        self._pending.extendleft(reversed(kept))
        return [r for r in batch if not r.future.done()]

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> None:
        rows = sum(r.rows for r in batch)
        padded = self.config.bucket(rows)
        inputs = [np.concatenate([r.inputs[i] for r in batch]) for i in range(len(batch[0].inputs))]
        if padded > rows:
            inputs = [np.concatenate([a, np.repeat(a[-1:], padded - rows, axis=0)]) for a in inputs]
        began = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._executor, self.run, inputs)
        except Exception as exc:  # this batch's requests fail; the model keeps serving
            log.error(
                json.dumps({"event": "batch_failed", "model": self.name, "rows": rows, "error": str(exc)})
            )
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
            self._count("failed", len(batch))
            return
        computed = time.perf_counter() - began
        start = 0
        for request in batch:
            part = [o[start : start + request.rows] for o in outputs]
            start += request.rows
            if not request.future.done():
                request.future.set_result(part)
        if self.metrics is not None:
            self.metrics.batch(self.name, [began - r.enqueued for r in batch], computed, rows)
        log.info(
            json.dumps(
                {
                    "event": "batch",
                    "model": self.name,
                    "requests": len(batch),
                    "rows": rows,
                    "engine_batch": padded,
                    "queue_ms": round(1e3 * max(began - r.enqueued for r in batch), 3),
                    "compute_ms": round(1e3 * computed, 3),
                }
            )
        )

    def _count(self, outcome: str, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.requests(self.name, outcome, n)
