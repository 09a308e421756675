"""Exception types: every failure a user can cause surfaces as a KerasRTError subclass."""

from __future__ import annotations


class KerasRTError(Exception):
    """Base class of all errors kerasrt raises on purpose."""


class ModelLoadError(KerasRTError):
    """The model file is missing, truncated, corrupt, or not a Keras model."""


class UnknownLayerError(ModelLoadError):
    """The model uses a custom layer that was not passed in ``custom_objects``."""


class ConversionError(KerasRTError):
    """The model could not be converted (e.g. an input shape is unknown)."""


class InputSignatureError(KerasRTError):
    """An inference input has the wrong count, rank, shape or dtype."""


class EngineNotBuiltError(KerasRTError):
    """An input shape has no engine and ``allow_build_at_runtime`` is False."""


class ArtifactError(KerasRTError):
    """A saved kerasrt artifact is missing, incomplete or from an unknown format."""


class IRError(KerasRTError):
    """The IR graph breaks one of its invariants (raised by ``verify``)."""


class SymbolicImportError(ConversionError):
    """The model cannot be imported with sizes unknown until run time (a layer needs them);
    an import at concrete input shapes may still work."""
