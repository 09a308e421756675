"""A kerasrt artifact as a KServe model: Open Inference Protocol (v2) metadata and inference,
requests checked against the model's inputs and batched dynamically; and a repository of
artifacts (one directory per model) that the protocol's repository endpoints load and unload.

Failures map to the protocol's statuses: a request that does not fit the model (name, shape,
dtype) is KServe's ``InvalidInput`` (HTTP 400, gRPC INVALID_ARGUMENT); a full queue answers
503 / RESOURCE_EXHAUSTED at once; a request past its timeout 504 / DEADLINE_EXCEEDED; a model
shutting down 503 / UNAVAILABLE; an engine error 500 / INTERNAL for that batch's requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import uuid
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from grpc_interceptor import exceptions as grpc_status
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelRepository
from kserve.errors import InvalidInput

from kerasrt.errors import KerasRTError
from kerasrt.runtime.model import OptimizedModel
from kerasrt.serve.batcher import BatchingConfig, Closed, DynamicBatcher, QueueFull, RequestTimeout
from kerasrt.serve.metrics import ServingMetrics

log = logging.getLogger(__name__)

V2_DATATYPES = {
    "float32": "FP32",
    "float16": "FP16",
    "bfloat16": "BF16",
    "float64": "FP64",
    "int64": "INT64",
    "int32": "INT32",
    "int16": "INT16",
    "int8": "INT8",
    "uint8": "UINT8",
    "bool": "BOOL",
}
"""IR dtype -> the protocol's tensor datatype."""


class Overloaded(grpc_status.ResourceExhausted):
    """The model's queue is full (HTTP 503, gRPC RESOURCE_EXHAUSTED)."""


class TimedOut(grpc_status.DeadlineExceeded):
    """No result within the request timeout (HTTP 504, gRPC DEADLINE_EXCEEDED)."""


class ShuttingDown(grpc_status.Unavailable):
    """The model is being unloaded or the server stopped (HTTP 503, gRPC UNAVAILABLE)."""


class EngineFailed(grpc_status.Internal):
    """The engine raised while running this request's batch (HTTP 500, gRPC INTERNAL)."""


REST_STATUS = {
    Overloaded: HTTPStatus.SERVICE_UNAVAILABLE,
    TimedOut: HTTPStatus.GATEWAY_TIMEOUT,
    ShuttingDown: HTTPStatus.SERVICE_UNAVAILABLE,
    EngineFailed: HTTPStatus.INTERNAL_SERVER_ERROR,
}


def add_rest_handlers(app: Any) -> None:
    """Answer kerasrt's serving errors with their HTTP status (KServe answers unknown errors 500)."""

    async def handler(_: Any, exc: grpc_status.GrpcException) -> JSONResponse:
        return JSONResponse(status_code=REST_STATUS[type(exc)], content={"error": exc.details})

    async def invalid_body(_: Any, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the body back, and a body holding Infinity or NaN (which
        # JSON does not allow, but some clients send) then fails to encode: a 500
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()
        ]
        return JSONResponse(status_code=HTTPStatus.UNPROCESSABLE_ENTITY, content={"error": errors})

    for kind in REST_STATUS:
        app.add_exception_handler(kind, handler)
    app.add_exception_handler(RequestValidationError, invalid_body)


class ArtifactModel(Model):
    """One kerasrt artifact served under ``name``."""

    def __init__(
        self,
        name: str,
        path: str | Path,
        batching: BatchingConfig | None = None,
        metrics: ServingMetrics | None = None,
        device: str = "auto",
        warmup: bool = False,
    ):
        """``warmup``: build the engine of every batch size the batcher forms (powers of two up
        to ``max_batch_size``) when the model loads, so no request waits for a build."""
        super().__init__(name)
        self.path = Path(path)
        self.batching = batching or BatchingConfig()
        self.metrics = metrics
        self.device = device
        self.warmup = warmup
        self.model: OptimizedModel | None = None
        self.batcher: DynamicBatcher | None = None

    def load(self) -> bool:
        from kerasrt.runtime.artifact import load

        model = load(self.path, device=self.device)
        # every power-of-two batch up to max_batch_size keeps its engine
        engines = max(model.settings.maximum_cached_engines, int(math.log2(self.batching.max_batch_size)) + 2)
        model.settings = dataclasses.replace(model.settings, maximum_cached_engines=engines)
        self.model = model
        if self.warmup:
            self._build_every_bucket()
        self.batcher = DynamicBatcher(self._run, self.batching, self.metrics, self.name)
        self.ready = True
        log.info(json.dumps({"event": "loaded", "model": self.name, "path": str(self.path)}))
        return True

    def _build_every_bucket(self) -> None:
        specs = self.model.inputs
        if any(d is None for s in specs for d in s.shape[1:]):
            log.warning(
                json.dumps({"event": "no_warmup", "model": self.name, "why": "unknown non-batch sizes"})
            )
            return
        rows = 1
        while rows <= self.batching.max_batch_size:
            key = tuple((rows, *s.shape[1:]) for s in specs)
            self.model.program(key, build=True)
            log.info(json.dumps({"event": "engine_built", "model": self.name, "batch": rows}))
            rows *= 2

    def _run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        out = self.model(*inputs)
        return list(out) if isinstance(out, list) else [out]

    def stop(self) -> None:
        """Take no new requests; those accepted are answered before the batcher stops."""
        self.ready = False
        if self.batcher is not None:
            batcher, self.batcher = self.batcher, None
            try:
                asyncio.get_running_loop().create_task(batcher.close())
            except RuntimeError:  # no event loop (a test, or after the server stopped)
                asyncio.run(batcher.close())

    # -- metadata --------------------------------------------------------------------------
    def get_input_types(self) -> list[dict[str, Any]]:
        return [
            {
                "name": s.name,
                "datatype": V2_DATATYPES[s.dtype],
                "shape": [-1 if d is None else d for d in s.shape],
            }
            for s in self.model.inputs
        ]

    def get_output_types(self) -> list[dict[str, Any]]:
        source = self.model.sources[0] if self.model.sources else self.model.primary_graph()
        return [
            {
                "name": name,
                "datatype": V2_DATATYPES.get(v.dtype, v.dtype.upper()),
                "shape": [d if isinstance(d, int) else -1 for d in v.shape],
            }
            for name, v in zip(self.model.output_names, source.outputs)
        ]

    # -- inference -------------------------------------------------------------------------
    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise InvalidInput("kerasrt models take Open Inference Protocol (v2) requests")
        batcher = self.batcher
        if batcher is None or not self.ready:
            raise ShuttingDown(f"model {self.name!r} is not serving (unloaded or shutting down)")
        inputs = self._inputs(payload)
        try:
            outputs = await batcher.submit(inputs)
        except QueueFull as exc:
            raise Overloaded(str(exc)) from None
        except RequestTimeout as exc:
            raise TimedOut(str(exc)) from None
        except Closed as exc:
            raise ShuttingDown(str(exc)) from None
        except (KerasRTError, RuntimeError, ValueError) as exc:
            raise EngineFailed(f"model {self.name!r} failed on this request's batch: {exc}") from None
        binary = payload.use_binary_outputs
        infer_outputs = []
        for name, array in zip(self.model.output_names, outputs):
            array = np.ascontiguousarray(array)
            output = InferOutput(name, list(array.shape), V2_DATATYPES[str(array.dtype)])
            output.set_data_from_numpy(array, binary_data=binary)
            infer_outputs.append(output)
        return InferResponse(
            payload.id or str(uuid.uuid4()),
            self.name,
            infer_outputs,
            from_grpc=payload.from_grpc,
            use_binary_outputs=binary,
        )

    def _inputs(self, payload: InferRequest) -> list[np.ndarray]:
        """The request's tensors in the model's input order, each checked: a clear
        ``InvalidInput`` for a missing or unknown name, a wrong datatype, rank or size, or
        inputs whose batch sizes differ."""
        specs = self.model.inputs
        given = {i.name: i for i in payload.inputs}
        missing = [s.name for s in specs if s.name not in given]
        unknown = sorted(set(given) - {s.name for s in specs})
        if missing or unknown:
            raise InvalidInput(
                f"model {self.name!r} takes inputs {[s.name for s in specs]}; "
                + (f"missing {missing}" if missing else f"unknown {unknown}")
            )
        arrays = []
        for spec in specs:
            item = given[spec.name]
            expected = V2_DATATYPES[spec.dtype]
            if item.datatype != expected:
                raise InvalidInput(f"input {spec.name!r} must be {expected}, got {item.datatype}")
            try:
                array = item.as_numpy()
            except Exception as exc:  # data that does not match its declared shape or type
                raise InvalidInput(f"input {spec.name!r}: {exc}") from None
            shape = tuple(array.shape)
            if len(shape) != len(spec.shape) or any(
                d is not None and d != n for d, n in zip(spec.shape, shape)
            ):
                want = [-1 if d is None else d for d in spec.shape]
                raise InvalidInput(f"input {spec.name!r} must have shape {want}, got {list(shape)}")
            if not shape or shape[0] < 1:
                raise InvalidInput(f"input {spec.name!r} has no rows")
            arrays.append(array)
        if len({a.shape[0] for a in arrays}) > 1:
            raise InvalidInput(f"inputs disagree on the batch size: {[list(a.shape) for a in arrays]}")
        return arrays


class ArtifactRepository(ModelRepository):
    """A directory of kerasrt artifacts, one per model (the directory's name is the model's):
    the protocol's repository endpoints load and unload them by name."""

    def __init__(
        self,
        models_dir: str | Path,
        batching: BatchingConfig,
        metrics: ServingMetrics | None,
        device: str,
        warmup: bool = False,
    ):
        super().__init__(str(models_dir))
        self.batching = batching
        self.metrics = metrics
        self.device = device
        self.warmup = warmup

    def load(self, name: str) -> bool:
        return self.load_model(name)

    def load_model(self, name: str) -> bool:
        path = Path(self.models_dir) / name
        if not (path / "manifest.json").is_file():
            raise KerasRTError(f"no kerasrt artifact named {name!r} in {self.models_dir}")
        model = ArtifactModel(name, path, self.batching, self.metrics, self.device, self.warmup)
        model.load()
        self.update(model)
        return model.ready

    def load_models(self) -> None:
        for path in sorted(Path(self.models_dir).iterdir()):
            if (path / "manifest.json").is_file():
                self.load_model(path.name)
