"""kerasrt: convert trained Keras 3 models into optimized engines (TF-TRT, rebuilt for Keras 3)."""

from __future__ import annotations

__version__ = "0.1.0"

from kerasrt.errors import (
    ArtifactError,
    ConversionError,
    EngineNotBuiltError,
    InputSignatureError,
    KerasRTError,
    ModelLoadError,
    UnknownLayerError,
)
from kerasrt.settings import ConversionSettings


def __getattr__(name: str):  # lazy: importing kerasrt must not import Keras
    if name == "Converter":
        from kerasrt.converter import Converter

        return Converter
    if name == "load":
        from kerasrt.runtime.artifact import load

        return load
    if name == "OptimizedModel":
        from kerasrt.runtime import OptimizedModel

        return OptimizedModel
    raise AttributeError(f"module 'kerasrt' has no attribute {name!r}")


__all__ = [
    "ArtifactError",
    "ConversionError",
    "ConversionSettings",
    "Converter",
    "EngineNotBuiltError",
    "InputSignatureError",
    "KerasRTError",
    "ModelLoadError",
    "OptimizedModel",
    "UnknownLayerError",
    "load",
]
