"""Running converted models: programs of engines and fallback layers (``program``), the model
users call (``model``), and the saved artifact (``artifact``)."""

from kerasrt.runtime.model import OptimizedModel
from kerasrt.runtime.program import (
    CompiledEngines,
    CudaGraphRunner,
    KerasSource,
    Program,
    Progress,
    ShapeKey,
    TensorSpec,
    resolve_device,
    with_batch,
)

__all__ = [
    "CompiledEngines",
    "CudaGraphRunner",
    "KerasSource",
    "OptimizedModel",
    "Program",
    "Progress",
    "ShapeKey",
    "TensorSpec",
    "resolve_device",
    "with_batch",
]
