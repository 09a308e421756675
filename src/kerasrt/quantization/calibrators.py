"""Calibrators: the range (amax) of an activation tensor, chosen from statistics of the values
it took on calibration data, that its quantization scale maps onto the quantized dtype.

A ``RangeObserver`` keeps the largest magnitude seen and a histogram of magnitudes, which
grows its range by merging bin pairs when a larger value arrives (so calibration makes one
pass over the data, as TensorRT's histogram calibrators do). The calibrators read it:

- ``max``: the largest magnitude: nothing clips, rare outliers waste resolution.
- ``percentile``: the magnitude below which ``PERCENTILE`` % of the values lie.
- ``entropy``: TensorRT's (and TF-TRT's default) KL-divergence calibrator: the clipping
  threshold whose 128-level quantized histogram is closest to the clipped reference
  histogram (INT8 only; its levels are INT8's). Data with no more distinct magnitudes than
  that (pixel levels) is not clipped.
- ``mse``: the threshold with the least squared error of quantizing the observed values (the
  histogram's bin centres, rounded by the real quantizer: INT8's uniform steps or FP8's
  floating-point ones).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from kerasrt.ir.ops import QUANTIZED_RANGE, dequantize, quantize

BINS = 2048
PERCENTILE = 99.99
CALIBRATORS = ("max", "percentile", "entropy", "mse")
DEFAULT_CALIBRATOR = {"INT8": "entropy", "FP8": "max"}
"""TensorRT's defaults: its INT8 entropy calibrator, and max for FP8 (whose range is wide and
whose steps grow with the magnitude, so clipping rarely pays)."""


class RangeObserver:
    """Magnitude statistics of one tensor over calibration batches: the largest magnitude and
    a histogram of the nonzero |x| over [0, edge) in ``BINS`` bins, ``edge`` doubled as needed.

    Exact zeros (half of a ReLU's outputs) are counted apart: every scale represents them
    exactly, so they say nothing about the range, and in the histogram their spike would
    dominate the entropy calibrator's comparison (NVIDIA's calibrators skip them the same way)."""

    def __init__(self) -> None:
        self.amax = 0.0
        self.edge = 0.0
        self.hist = np.zeros(BINS, dtype=np.float64)
        self.count = 0
        self.zeros = 0

    def update(self, x: torch.Tensor) -> None:
        magnitude = x.detach().abs().to(torch.float32).flatten()
        if magnitude.numel() == 0:
            return
        top = float(magnitude.max())
        if not np.isfinite(top):
            raise ValueError("the tensor holds NaN or Inf")
        self.amax = max(self.amax, top)
        self.count += magnitude.numel()
        nonzero = magnitude[magnitude > 0]
        self.zeros += magnitude.numel() - nonzero.numel()
        magnitude = nonzero
        if top == 0.0:
            return
        if self.edge == 0.0:
            self.edge = top * (1 + 1e-6)
        while top >= self.edge:  # merge bin pairs into the lower half: the range doubles
            self.hist = np.concatenate([self.hist.reshape(-1, 2).sum(axis=1), np.zeros(BINS // 2)])
            self.edge *= 2
        counts = torch.histc(magnitude, bins=BINS, min=0.0, max=self.edge)
        self.hist += counts.cpu().numpy().astype(np.float64)

    @property
    def width(self) -> float:
        return self.edge / BINS


def calibrate_amax(observer: RangeObserver, calibrator: str, dtype: str) -> float:
    """The range ``calibrator`` chooses from ``observer``'s statistics, for quantizing to
    ``dtype`` ("int8" or "float8_e4m3fn"); 0.0 for a tensor that was always zero."""
    if observer.amax == 0.0 or calibrator == "max":
        return observer.amax
    method = _METHODS.get(calibrator)
    if method is None:
        raise ValueError(f"no calibrator {calibrator!r}; kerasrt has {', '.join(CALIBRATORS)}")
    return min(method(observer, dtype), observer.amax)


def _percentile(observer: RangeObserver, dtype: str) -> float:
    cdf = np.cumsum(observer.hist) / observer.hist.sum()
    index = int(np.searchsorted(cdf, PERCENTILE / 100.0))
    return (index + 1) * observer.width


def _mse(observer: RangeObserver, dtype: str) -> float:
    hist = observer.hist
    used = int(np.nonzero(hist)[0][-1]) + 1
    centres = torch.from_numpy((np.arange(used) + 0.5) * observer.width).to(torch.float32)
    counts = torch.from_numpy(hist[:used])
    candidates = np.unique(np.linspace(max(used // 16, 1), used, 256).astype(int))
    amaxes = torch.from_numpy(candidates * observer.width).to(torch.float32)
    scales = amaxes[:, None] / QUANTIZED_RANGE[dtype]
    rounded = dequantize(quantize(centres[None, :], scales, axis=0, dtype=dtype), scales, axis=0)
    errors = ((rounded - centres[None, :]).double() ** 2 * counts[None, :]).sum(dim=1)
    return float(amaxes[int(torch.argmin(errors))])


def _entropy(observer: RangeObserver, dtype: str) -> float:
    if dtype != "int8":
        raise ValueError("the entropy calibrator is INT8's (128 levels); for FP8 use max, percentile or mse")
    levels = 128
    hist = observer.hist
    if np.count_nonzero(hist) <= levels:
        # few distinct values (an image's pixel levels): KL would pick a threshold at one of
        # them that clips everything above it (the clipped histogram is then one spike, equal
        # to its quantized self); the grid has room for every value, so clip nothing
        return observer.amax
    used = int(np.nonzero(hist)[0][-1]) + 1
    best, best_kl = used, np.inf
    for stop in range(levels, used + 1, max((used - levels) // 256, 1)):
        reference = hist[:stop].copy()
        reference[-1] += hist[stop:].sum()  # clipped values land in the last bin
        groups = np.minimum((np.arange(stop) * levels) // stop, levels - 1)
        nonzero = hist[:stop] > 0
        mass = np.bincount(groups, weights=hist[:stop], minlength=levels)
        support = np.bincount(groups, weights=nonzero.astype(np.float64), minlength=levels)
        expanded = np.where(nonzero, mass[groups] / np.maximum(support[groups], 1), 0.0)
        kl = _kl(reference, expanded)
        if kl < best_kl:
            best, best_kl = stop, kl
    return best * observer.width


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of two unnormalized histograms; bins where q is empty but p is not get a
    small mass (TensorRT smooths the same way), so a threshold that drops values is penalized
    rather than undefined."""
    p = p / p.sum()
    q = q / q.sum()
    eps = 1e-8
    q = np.where((q == 0) & (p > 0), eps, q)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


_METHODS: dict[str, Callable[[RangeObserver, str], float]] = {
    "percentile": _percentile,
    "entropy": _entropy,
    "mse": _mse,
}


def weight_scales(weight: torch.Tensor, axis: int | None, dtype: str) -> torch.Tensor:
    """Symmetric scales of a weight: per index of ``axis`` (per-channel) or one for the whole
    tensor, each its largest magnitude over the quantized range (1 where all are zero)."""
    w = weight.detach().to(torch.float32).abs()
    if axis is None:
        amax = w.max()
    else:
        amax = w.movedim(axis, 0).reshape(w.shape[axis], -1).amax(dim=1)
    return torch.where(amax > 0, amax / QUANTIZED_RANGE[dtype], torch.ones_like(amax))
