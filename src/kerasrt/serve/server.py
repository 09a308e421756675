"""The serving process: KServe's model server (Open Inference Protocol over REST and gRPC, the
binary tensor extension, the model repository extension, Prometheus ``/metrics``) with
kerasrt artifacts as its models; or, with ``ray_replicas``, each artifact a Ray Serve
deployment of that many replicas (one GPU each where there are GPUs) behind the same ingress.

KServe was chosen because it implements the whole protocol (health, metadata, infer, repository;
REST and gRPC; binary tensors) and runs models behind Ray Serve for scale-out, under an
Apache-2.0 licence; kerasrt adds what it lacks for engines: dynamic batching, a bounded queue,
timeouts, and the statuses those need.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kerasrt.errors import KerasRTError
from kerasrt.serve.batcher import BatchingConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """Where and how to serve; the CLI's ``kerasrt serve`` options."""

    http_port: int = 8000
    grpc_port: int = 8001
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    device: str = "auto"
    grace_period_s: int = 30
    ray_replicas: int | None = None
    ray_autoscale: bool = False
    warmup: bool = False


def served_artifacts(target: str | Path) -> list[tuple[str, Path]]:
    """(model name, artifact directory) for ``target``: one artifact (named by its
    directory), or a directory of them; a clear error for anything else."""
    path = Path(target)
    if (path / "manifest.json").is_file():
        return [(path.name, path)]
    if path.is_dir():
        found = [(p.name, p) for p in sorted(path.iterdir()) if (p / "manifest.json").is_file()]
        if found:
            return found
    raise KerasRTError(f"{target} is neither a kerasrt artifact nor a directory of them (no manifest.json)")


def serve(target: str | Path, options: ServeOptions | None = None) -> None:
    """Serve the artifacts of ``target`` until the process is told to stop (SIGTERM/SIGINT:
    requests in flight are answered first)."""
    import kserve
    from kserve import model_server

    from kerasrt.serve.metrics import ServingMetrics
    from kerasrt.serve.model import ArtifactRepository, add_rest_handlers

    options = options or ServeOptions()
    artifacts = served_artifacts(target)
    add_rest_handlers(model_server.app)
    metrics = ServingMetrics()
    single = (Path(target) / "manifest.json").is_file()
    root = Path(target).parent if single else Path(target)
    repository = ArtifactRepository(root, options.batching, metrics, options.device, options.warmup)
    if options.ray_replicas:
        models = ray_models(artifacts, options)
        for model in models:
            repository.update(model)
    else:
        for name, _ in artifacts:
            repository.load_model(name)
        models = list(repository.get_models().values())
    server = kserve.ModelServer(
        http_port=options.http_port,
        grpc_port=options.grpc_port,
        registered_models=repository,
        enable_grpc=True,
        grace_period=options.grace_period_s,
        enable_latency_logging=False,
    )
    server.model_repository_extension = repository_extension(repository)
    log.info(
        "serving %s on http :%d, grpc :%d", [n for n, _ in artifacts], options.http_port, options.grpc_port
    )
    server.start(models)


def repository_extension(repository: Any) -> Any:
    """KServe's model repository extension, whose load and unload return what its gRPC servicer
    reads (KServe's, up to 0.21 at least, return None, and its RepositoryModelLoad/Unload fail with an
    internal error; its REST endpoints ignore the result)."""
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension

    class Extension(ModelRepositoryExtension):
        async def load(self, model_name: str) -> dict[str, Any]:
            await super().load(model_name)
            return {"name": model_name, "load": True}

        async def unload(self, model_name: str) -> dict[str, Any]:
            await super().unload(model_name)
            return {"name": model_name, "unload": True}

    return Extension(repository)


def ray_models(artifacts: Sequence[tuple[str, Path]], options: ServeOptions) -> list[Any]:
    """Each artifact as a Ray Serve deployment of ``options.ray_replicas`` replicas (autoscaled
    between 1 and that on ongoing requests with ``ray_autoscale``), wrapped as KServe models."""
    import ray
    import torch
    from kserve.ray import RayModel
    from ray import serve as ray_serve

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    # KServe's server is the ingress: Ray Serve's own HTTP proxy (port 8000 by default, the
    # port kerasrt serve takes too) must not start
    ray_serve.start(proxy_location="Disabled")
    gpus = 1 if torch.cuda.is_available() else 0
    models = []
    for name, path in artifacts:
        scaling: dict[str, Any] = (
            {
                "autoscaling_config": {
                    "min_replicas": 1,
                    "max_replicas": options.ray_replicas,
                    "target_ongoing_requests": 2 * options.batching.max_batch_size,
                }
            }
            if options.ray_autoscale
            else {"num_replicas": options.ray_replicas}
        )
        deployment = ray_serve.deployment(
            ReplicaModel,
            name=name,
            ray_actor_options={"num_gpus": gpus, "num_cpus": 1},
            # enough requests in each replica at once for its batcher to fill a batch (Ray's
            # default, 5, would cap every engine call at 5 rows)
            max_ongoing_requests=2 * options.batching.max_batch_size,
            **scaling,
        )
        handle = ray_serve.run(
            deployment.bind(name, str(path.resolve()), options.batching, options.device, options.warmup),
            name=name,
            route_prefix=None,
        )
        model = RayModel(name, handle)
        model.load()
        models.append(model)
    return models


class ReplicaModel:
    """One Ray Serve replica: an ``ArtifactModel`` loaded in the replica's process, called by
    KServe's ingress through the deployment handle."""

    def __init__(self, name: str, path: str, batching: BatchingConfig, device: str, warmup: bool = False):
        from kerasrt.serve.model import ArtifactModel

        self.model = ArtifactModel(name, path, batching, None, device, warmup)
        self.model.load()

    async def __call__(self, body: Any, headers: dict[str, str] | None = None) -> Any:
        return await self.model(body, headers)

    def load(self) -> bool:
        return self.model.ready

    def get_input_types(self) -> list[dict[str, Any]]:
        return self.model.get_input_types()

    def get_output_types(self) -> list[dict[str, Any]]:
        return self.model.get_output_types()
