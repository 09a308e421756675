"""The accuracy-aware search: keep the layers whose quantization costs most in floating point
until the accuracy lost is within a budget (OpenVINO's ``quantize_with_accuracy_control``).

The metric is the user's (``eval_fn(model) -> float``, higher is better, on their validation
data) or, without one, ``agreement``: how often the quantized model's top-1 class agrees with
the FP32 model's on the calibration data (for outputs that are not class scores, one minus
the largest error relative to the output's scale). The reference is the same model with no
layer quantized, so the budget measures what quantization costs.

1. Evaluate the fully quantized model; if it is within the budget, stop.
2. Rank the sites: for each, the metric with only that site kept in floating point.
3. Keep sites in that order (most recovered first), re-evaluating, until within the budget.
   Keeping every site gives the reference itself, so the budget is always met.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Metric = Callable[[dict[str, str]], float]
"""The metric of the model with the sites of a ``keep`` dict (site key -> reason) kept."""


def search(
    metric: Metric, site_keys: Sequence[str], budget: float, progress: Callable[[str], None] | None = None
) -> tuple[dict[str, str], dict[str, Any]]:
    """(the sites to keep with their reasons, a JSON-safe record of the search)."""
    say = progress or (lambda message: None)
    reference = metric({k: "reference" for k in site_keys})
    current = metric({})
    record: dict[str, Any] = {
        "budget": budget,
        "reference": reference,
        "all_quantized": current,
        "ranking": [],
        "evaluations": 2,
    }
    say(f"accuracy search: reference {reference:.4g}, fully quantized {current:.4g} (budget {budget:g})")
    keep: dict[str, str] = {}
    if reference - current > budget:
        gains = []
        for i, key in enumerate(site_keys):
            say(f"accuracy search: ranking layer {i + 1}/{len(site_keys)}")
            gains.append((metric({key: "ranking"}) - current, i, key))
        gains.sort(key=lambda g: (-g[0], g[1]))
        record["ranking"] = [{"site": key, "recovered": gain} for gain, _, key in gains]
        record["evaluations"] += len(gains)
        for gain, _, key in gains:
            keep[key] = f"kept in FP16 by the accuracy search (keeping it alone recovered {gain:.3g})"
            current = metric(keep)
            record["evaluations"] += 1
            say(f"accuracy search: {len(keep)} layer(s) kept, metric {current:.4g}")
            if reference - current <= budget:
                break
    record["final"] = current
    record["drop"] = reference - current
    return keep, record


def agreement(
    outputs: Sequence[Sequence[torch.Tensor]], references: Sequence[Sequence[torch.Tensor]]
) -> float:
    """The default metric over batches: per model output, the fraction of rows whose top-1
    class matches the reference's (outputs whose last dimension holds scores), else one minus
    the largest error relative to the reference's largest magnitude; the worst output counts."""
    scores = []
    for k in range(len(references[0])):
        ys = [torch.as_tensor(o[k]).float().cpu() for o in outputs]
        rs = [torch.as_tensor(r[k]).float().cpu() for r in references]
        if rs[0].dim() >= 2 and rs[0].shape[-1] > 1:
            matches = sum(int((y.argmax(-1) == r.argmax(-1)).sum()) for y, r in zip(ys, rs))
            scores.append(matches / sum(r.argmax(-1).numel() for r in rs))
        else:
            error = max(float((y - r).abs().max()) for y, r in zip(ys, rs))
            scale = max(float(r.abs().max()) for r in rs) or 1.0
            scores.append(1.0 - min(error / scale, 1.0))
    return min(scores)
