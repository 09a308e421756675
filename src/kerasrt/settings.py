"""The one frozen settings object shared by the Python API and the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kerasrt.errors import ConversionError

PRECISION_MODES = ("FP32", "TF32", "FP16", "BF16", "INT8", "FP8")
"""Engine precisions: IEEE float32; float32 with TF32 tensor-core matmuls and convolutions
(CUDA); float16 or bfloat16 with numerically sensitive ops kept in float32; INT8 or FP8
(E4M3) convolutions and dense layers with calibrated scales, the rest in float16."""


PRECISION_RTOL = {"FP32": 1e-4, "TF32": 5e-3, "FP16": 1e-2, "BF16": 5e-2, "INT8": 0.15, "FP8": 0.15}
"""Default tolerance of each precision against Keras FP32: max |error| <= rtol * max |output|.
Measured errors are well inside (H100, keras.applications CNNs and a BERT-base encoder at
FP16: 5e-4 to 3e-3 of the output scale); deep models accumulate more than one rounding.
Quantized engines are judged by accuracy (``max_accuracy_drop``), their bound is loose."""

COMPILERS = ("auto", "inductor", "eager")
CONV_KERNELS = ("auto", "inductor", "cudnn")


@dataclass(frozen=True)
class ConversionSettings:
    """How to convert and run a model; names and defaults follow TF-TRT's TrtGraphConverterV2.

    ``input_shapes`` gives one shape per model input, batch dimension included; ``None``
    means "the model's declared shapes with the batch dimension set to ``batch_size``".

    ``batch_profile``: (min, opt, max) batch sizes one converted model serves, as a TensorRT
    optimization profile: engines are built for ``opt`` and ``max``; a batch in [min, opt] runs
    padded to ``opt``, one in (opt, max] padded to ``max`` (rows are independent at inference,
    the padding is dropped from the outputs); a batch outside [min, max] is refused.

    ``shape_profile``: (min, opt, max) input shapes, one shape per model input in each, as a
    TensorRT optimization profile over every dimension (TF-TRT's dynamic mode): the first
    engine is built for ``opt``; any shapes between ``min`` and ``max`` (each dimension) are
    served, their engines built when first met even with ``allow_build_at_runtime=False``;
    shapes outside need ``allow_build_at_runtime``.

    ``fp32_ops``: in FP16/BF16 engines, the IR op types that compute in float32 (default:
    ``kerasrt.passes.precision.FP32_OPS``: softmax, normalization, reductions, exp/log/pow);
    ``()`` runs everything in the low precision.

    ``compiler``: "inductor" compiles each engine with TorchInductor (Triton, cuDNN, cuBLAS),
    "eager" runs its ops one by one; "auto" is inductor on CUDA and eager on a CPU (where
    compiling costs more than it saves for most uses). ``cuda_graphs``: replay each
    static-shape program on CUDA as one CUDA graph, so small batches are not bound by kernel
    launches. ``autotune``: Inductor times kernel choices per layer shape (max-autotune, as
    TensorRT picks tactics): slower builds, choices cached for the next build.

    ``conv_kernels``: how FP16/BF16 convolutions run on CUDA. "auto" times, per layer shape,
    kerasrt's kernels (a fused cuDNN graph, conv + residual + bias + activation in one
    kernel, needs nvidia-cudnn-frontend; for 1x1 convolutions also a Triton GEMM with that
    epilogue; for depthwise convolutions a Triton kernel with the bias, activation and zero
    padding folded in) against Inductor's convolution + epilogue and keeps the fastest
    (choices cached on disk, see ``kerasrt.backend.tactics``), in
    programs replayed as CUDA graphs (the kernels are launched from Python); "cudnn" takes
    kerasrt's kernels wherever they run; "inductor" never does. ``exclude_kernels``: kernel
    families (``kerasrt.kernels.registry`` names, e.g. "linear_gemm") the tactics never
    consider.

    ``use_dynamic_shape`` (TF-TRT's name): one engine set for every input shape the source
    graph serves, optimized and compiled once with symbolic sizes (Inductor's dynamic
    shapes), instead of one static engine set per exact shape. A new shape then costs a
    CUDA-graph capture (kept for up to ``maximum_cached_engines`` shapes), not a compile;
    kerasrt's own convolution kernels, chosen per exact shape, are not used.
    ``hot_shape_calls`` (with ``use_dynamic_shape``): once one shape has been called this many
    times, a static engine is built for it too and both are timed on its inputs; the faster
    serves that shape from then on (0: never).

    ``calibrator`` (INT8/FP8): how each activation's range is chosen from calibration data:
    "entropy" (INT8's default, TensorRT's), "percentile", "mse" or "max" (FP8's default); see
    ``kerasrt.quantization.calibrators``. ``max_accuracy_drop``: keep the layers whose
    quantization costs most in FP16 until the accuracy lost is at most this
    (``kerasrt.quantization.accuracy``); None quantizes every layer the placement rules allow.
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
    batch_profile: tuple[int, int, int] | None = None
    shape_profile: tuple[tuple[tuple[int, ...], ...], ...] | None = None
    fp32_ops: tuple[str, ...] | None = None
    compiler: str = "auto"
    cuda_graphs: bool = True
    autotune: bool = False
    conv_kernels: str = "auto"
    exclude_kernels: tuple[str, ...] = field(default_factory=tuple)
    use_dynamic_shape: bool = False
    hot_shape_calls: int = 0
    calibrator: str | None = None
    max_accuracy_drop: float | None = None

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
        if self.hot_shape_calls < 0:
            raise ConversionError("hot_shape_calls must be >= 0")
        if self.input_shapes is not None:
            try:
                shapes = tuple(tuple(int(d) for d in s) for s in self.input_shapes)
            except (TypeError, ValueError):
                raise ConversionError(
                    f"input_shapes must be one shape (a tuple of positive integers) per model input, "
                    f"or a dict of them by input name; got {self.input_shapes!r}"
                ) from None
            if any(d < 1 for s in shapes for d in s):
                raise ConversionError(f"input_shapes must be positive integers, got {shapes}")
            object.__setattr__(self, "input_shapes", shapes)
        object.__setattr__(self, "keep_in_keras", tuple(self.keep_in_keras))
        if self.batch_profile is not None:
            profile = tuple(int(b) for b in self.batch_profile)
            if len(profile) != 3 or not 1 <= profile[0] <= profile[1] <= profile[2]:
                raise ConversionError(
                    f"batch_profile must be (min, opt, max) with 1 <= min <= opt <= max, got {profile}"
                )
            object.__setattr__(self, "batch_profile", profile)
            if self.maximum_cached_engines < 2:
                object.__setattr__(self, "maximum_cached_engines", 2)  # the opt and max engines
        if self.shape_profile is not None:
            object.__setattr__(self, "shape_profile", _checked_profile(self.shape_profile))
            if self.batch_profile is not None or self.input_shapes is not None:
                raise ConversionError("give shape_profile alone: its opt shapes are the first engine's")
        if self.fp32_ops is not None:
            from kerasrt.ir.ops import OPS

            object.__setattr__(self, "fp32_ops", tuple(self.fp32_ops))
            unknown = sorted(set(self.fp32_ops) - set(OPS))
            if unknown:
                raise ConversionError(f"fp32_ops names unknown IR op types: {unknown}")
        if self.conv_kernels not in CONV_KERNELS:
            raise ConversionError(
                f"conv_kernels must be one of {', '.join(CONV_KERNELS)}, got {self.conv_kernels!r}"
            )
        object.__setattr__(self, "exclude_kernels", tuple(self.exclude_kernels))
        if self.exclude_kernels:
            from kerasrt.kernels import registry

            names = [f.name for f in registry.families()]
            unknown = sorted(set(self.exclude_kernels) - set(names))
            if unknown:
                raise ConversionError(
                    f"exclude_kernels names no kernel family: {unknown}; kerasrt has {names}"
                )
        self._check_quantization()
        if self.compiler not in COMPILERS:
            raise ConversionError(f"compiler must be one of {', '.join(COMPILERS)}, got {self.compiler!r}")

    def _check_quantization(self) -> None:
        from kerasrt.quantization.calibrators import CALIBRATORS, DEFAULT_CALIBRATOR

        quantized = self.precision_mode in DEFAULT_CALIBRATOR
        if not quantized:
            if self.calibrator is not None or self.max_accuracy_drop is not None:
                raise ConversionError(
                    "calibrator and max_accuracy_drop are for precision_mode INT8 or FP8, "
                    f"not {self.precision_mode}"
                )
            return
        if self.calibrator is None:
            object.__setattr__(self, "calibrator", DEFAULT_CALIBRATOR[self.precision_mode])
        if self.calibrator not in CALIBRATORS:
            raise ConversionError(
                f"calibrator must be one of {', '.join(CALIBRATORS)}, got {self.calibrator!r}"
            )
        if self.calibrator == "entropy" and self.precision_mode == "FP8":
            raise ConversionError(
                "the entropy calibrator is INT8's (128 levels); for FP8 use max, percentile or mse"
            )
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop < 1:
            raise ConversionError(f"max_accuracy_drop must be in [0, 1), got {self.max_accuracy_drop}")

    @property
    def quantized(self) -> bool:
        """Whether this precision quantizes (INT8, FP8): conversion needs calibration data."""
        return self.precision_mode in ("INT8", "FP8")

    def in_profile(self, shapes: tuple[tuple[int, ...], ...]) -> bool:
        """Whether input ``shapes`` lie between the shape profile's min and max."""
        if self.shape_profile is None:
            return False
        low, _, high = self.shape_profile
        return len(shapes) == len(low) and all(
            len(s) == len(lo) and all(a <= d <= b for d, a, b in zip(s, lo, hi))
            for s, lo, hi in zip(shapes, low, high)
        )

    def compiler_for(self, device_type: str) -> str:
        """The engine compiler actually used on a device of ``device_type``."""
        if self.compiler == "auto":
            return "inductor" if device_type == "cuda" else "eager"
        return self.compiler

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


def _checked_profile(profile: object) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """(min, opt, max) shapes per input, each dimension min <= opt <= max, all positive."""
    try:
        low, opt, high = (tuple(tuple(int(d) for d in shape) for shape in shapes) for shapes in profile)
    except (TypeError, ValueError):
        raise ConversionError(
            "shape_profile must be (min_shapes, opt_shapes, max_shapes), one shape per model input in each"
        ) from None
    ranks = [[len(s) for s in shapes] for shapes in (low, opt, high)]
    if ranks[0] != ranks[1] or ranks[1] != ranks[2]:
        raise ConversionError(
            f"shape_profile's min, opt and max shapes differ in count or rank: {low}, {opt}, {high}"
        )
    for lo, mid, hi in zip(low, opt, high):
        if not all(1 <= a <= b <= c for a, b, c in zip(lo, mid, hi)):
            raise ConversionError(
                f"shape_profile needs 1 <= min <= opt <= max in every dimension, got {lo}, {mid}, {hi}"
            )
    return (low, opt, high)
