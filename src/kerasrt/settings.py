"""The one frozen settings object shared by the Python API and the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kerasrt.errors import ConversionError

PRECISION_MODES = ("FP32",)
"""Precision modes this version builds. FP16/BF16/TF32 engines come with GPU engine work."""


@dataclass(frozen=True)
class ConversionSettings:
    """How to convert and run a model; names and defaults follow TF-TRT's TrtGraphConverterV2.

    ``input_shapes`` gives one shape per model input, batch dimension included; ``None``
    means "the model's declared shapes with the batch dimension set to ``batch_size``".
    """

    precision_mode: str = "FP32"
    minimum_segment_size: int = 3
    maximum_cached_engines: int = 1
    allow_build_at_runtime: bool = True
    batch_size: int = 1
    input_shapes: tuple[tuple[int, ...], ...] | None = None
    keep_in_keras: tuple[str, ...] = field(default_factory=tuple)
    optimization_level: int = 2
    outputs: tuple[str, ...] | None = None  # a subset of model outputs (names or positions)

    def __post_init__(self) -> None:
        mode = self.precision_mode.upper()
        if mode not in PRECISION_MODES:
            raise ConversionError(
                f"precision_mode {self.precision_mode!r} is not supported; "
                f"this version builds {', '.join(PRECISION_MODES)} engines"
            )
        object.__setattr__(self, "precision_mode", mode)
        if self.minimum_segment_size < 1:
            raise ConversionError("minimum_segment_size must be >= 1")
        if self.maximum_cached_engines < 1:
            raise ConversionError("maximum_cached_engines must be >= 1")
        if self.optimization_level not in (0, 1, 2):
            raise ConversionError(f"optimization_level must be 0, 1 or 2, got {self.optimization_level}")
        if self.batch_size < 1:
            raise ConversionError("batch_size must be >= 1")
        if self.input_shapes is not None:
            shapes = tuple(tuple(int(d) for d in s) for s in self.input_shapes)
            if any(d < 1 for s in shapes for d in s):
                raise ConversionError(f"input_shapes must be positive integers, got {shapes}")
            object.__setattr__(self, "input_shapes", shapes)
        object.__setattr__(self, "keep_in_keras", tuple(self.keep_in_keras))

    def to_json(self) -> dict:
        """A JSON-safe dict (for the artifact manifest)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ConversionSettings:
        """Inverse of ``to_json``; ignores keys a newer version may have added."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if kwargs.get("input_shapes") is not None:
            kwargs["input_shapes"] = tuple(tuple(s) for s in kwargs["input_shapes"])
        kwargs["keep_in_keras"] = tuple(kwargs.get("keep_in_keras", ()))
        if kwargs.get("outputs") is not None:
            kwargs["outputs"] = tuple(kwargs["outputs"])
        return cls(**kwargs)
