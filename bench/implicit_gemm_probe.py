"""Time what could run ResNet50's convolutions at a large batch, per layer, against each
layer's floor: cuDNN's fused plans as the tactics search them (heuristic modes A and
FALLBACK, 32 plans), cuDNN's plans with mode B added (up to 96), kerasrt's pointwise Triton
kernel (1x1, stride 1) and its implicit-GEMM Triton kernel (``splitk_conv`` run unsplit with
large tiles, ``LARGE_TILES``).

    source .whl/activate.sh && python bench/implicit_gemm_probe.py [BATCH]

One JSON line per convolution shape (device us, ``tactics.device_ms``), then a summary: the
network's convolution time (each shape times its count) with the tactics' current
candidates and with every candidate timed here.
"""

from __future__ import annotations

import json
import sys

import torch

from kerasrt.backend import cudnn_conv, pointwise_conv, splitk_conv, tactics

PEAK_FLOPS = 989e12  # H100 SXM dense FP16 tensor-core peak
PEAK_BYTES = 3.35e12  # H100 SXM HBM3 bandwidth
LAYERS = [  # (C, H, W), (K, R, S), stride, residual, activation, count: Keras ResNet50 (v1)
    ((64, 56, 56), (64, 1, 1), 1, False, "relu", 1),
    ((64, 56, 56), (256, 1, 1), 1, False, "none", 1),
    ((64, 56, 56), (64, 3, 3), 1, False, "relu", 3),
    ((64, 56, 56), (256, 1, 1), 1, True, "relu", 3),
    ((256, 56, 56), (64, 1, 1), 1, False, "relu", 2),
    ((256, 56, 56), (128, 1, 1), 2, False, "relu", 1),
    ((256, 56, 56), (512, 1, 1), 2, False, "none", 1),
    ((128, 28, 28), (128, 3, 3), 1, False, "relu", 4),
    ((128, 28, 28), (512, 1, 1), 1, True, "relu", 4),
    ((512, 28, 28), (128, 1, 1), 1, False, "relu", 3),
    ((512, 28, 28), (256, 1, 1), 2, False, "relu", 1),
    ((512, 28, 28), (1024, 1, 1), 2, False, "none", 1),
    ((256, 14, 14), (256, 3, 3), 1, False, "relu", 6),
    ((256, 14, 14), (1024, 1, 1), 1, True, "relu", 6),
    ((1024, 14, 14), (256, 1, 1), 1, False, "relu", 5),
    ((1024, 14, 14), (512, 1, 1), 2, False, "relu", 1),
    ((1024, 14, 14), (2048, 1, 1), 2, False, "none", 1),
    ((512, 7, 7), (512, 3, 3), 1, False, "relu", 3),
    ((512, 7, 7), (2048, 1, 1), 1, True, "relu", 3),
    ((2048, 7, 7), (512, 1, 1), 1, False, "relu", 2),
]
LARGE_TILES = (  # (pixels, channels, reduction step, split, warps, stages)
    (128, 64, 64, 1, 4, 3),
    (128, 64, 64, 1, 4, 4),
    (256, 64, 64, 1, 8, 3),
    (128, 128, 64, 1, 8, 3),
    (128, 128, 64, 1, 4, 4),
    (128, 128, 32, 1, 4, 4),
    (64, 128, 64, 1, 4, 4),
    (128, 256, 64, 1, 8, 3),
    (256, 128, 64, 1, 8, 3),
)


def floor_us(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, residual: bool) -> dict[str, float]:
    """The layer's compute floor and memory floor (read x, w and the residual once, write out)."""
    _, c, r, s = w.shape
    flops = 2 * out.numel() * c * r * s
    moved = (x.numel() + w.numel() + out.numel() * (2 if residual else 1)) * x.element_size()
    return {
        "compute_floor_us": round(flops / PEAK_FLOPS * 1e6, 2),
        "memory_floor_us": round(moved / PEAK_BYTES * 1e6, 2),
    }


def timed(configs: tuple, run) -> tuple[tuple | None, float | None]:
    """(fastest config, its device us) of ``configs``."""
    best = tactics.best_config(configs, run, "probe")
    return (configs[best[0]], round(best[1] * 1e3, 2)) if best else (None, None)


def main(batch: int) -> None:
    dev, cl = torch.device("cuda"), torch.channels_last
    totals = {"current": 0.0, "with_all": 0.0, "cudnn_af": 0.0}
    for (c, h, wd), (k, r, s), stride, has_res, act, count in LAYERS:
        x = torch.randn((batch, c, h, wd), device=dev).half().contiguous(memory_format=cl)
        w = (torch.randn(k, c, r, s, device=dev) / (c * r * s) ** 0.5).half().contiguous(memory_format=cl)
        b = torch.randn(k, device=dev).half()
        strides, padding = [stride, stride], [r // 2, s // 2]
        out = splitk_conv.empty_output(x, w, strides, padding)
        res = torch.randn_like(out) if has_res else None
        ops = cudnn_conv.Operands(x, w, b, res, out)
        row: dict = {"x": [batch, c, h, wd], "w": [k, c, r, s], "stride": stride, "act": act, "count": count}
        row.update(floor_us(x, w, out, has_res))
        af = tactics.fastest_plan(ops, strides, padding, [1, 1], act, [])
        row["cudnn_af_us"] = af and round(af[1] * 1e3, 2)
        abf = tactics.fastest_plan(
            ops,
            strides,
            padding,
            [1, 1],
            act,
            [],
            heuristics=("A", "B", "FALLBACK"),
            max_plans=96,
            build_budget_s=5.0,
        )
        row["cudnn_abf_us"] = abf and round(abf[1] * 1e3, 2)
        current = [v for v in (row["cudnn_af_us"],) if v is not None]
        if (r, s, stride) == (1, 1, 1):
            config, us = timed(
                pointwise_conv.CONFIGS,
                lambda cfg, a=(x, w, b, res, out, act): pointwise_conv.launch(cfg, *a, []),
            )
            row["pointwise"] = [config, us]
            current += [us] if us is not None else []
        config, us = timed(
            LARGE_TILES,
            lambda cfg, a=(x, w, b, res, out, strides, padding, act): splitk_conv.launch(cfg, *a, []),
        )
        row["implicit_gemm"] = [config, us]
        candidates = current + [v for v in (row["cudnn_abf_us"], us) if v is not None]
        totals["current"] += count * min(current)
        totals["with_all"] += count * min(candidates)
        totals["cudnn_af"] += count * (row["cudnn_af_us"] or 0.0)
        print(json.dumps(row), flush=True)
    print(json.dumps({"batch": batch, "total_us": {k: round(v, 1) for k, v in totals.items()}}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 128)
