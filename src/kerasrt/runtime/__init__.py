"""Running converted models: programs of engines and fallback layers (``program``), the model
users call (``model``), and the saved artifact (``artifact``)."""

from kerasrt.runtime.model import OptimizedModel

__all__ = ["OptimizedModel"]
