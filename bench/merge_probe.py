"""Time kerasrt's merged convolutions against the two convolutions run apart, each on its own
best kernel as the tactics pick it (cuDNN's best fused plan or the pointwise Triton kernel's
best config), and check their outputs: ``kerasrt::pointwise_pair`` (two chained 1x1
convolutions) and ``kerasrt::dual_conv`` (a 1x1 convolution with the 1x1 projection shortcut
added to it).

    source .whl/activate.sh && python bench/merge_probe.py [BATCH ...]
    source .whl/activate.sh && python bench/merge_probe.py --sweep [BATCH ...]

One JSON line per merge and batch: device us of each (``tactics.device_ms``), the merged
kernel's best config and its largest error against the reference composition. ``--sweep``
times a grid of tile configs (``SWEEP``) instead of ``pointwise_pair.CONFIGS`` and prints
the five fastest per pair of ResNet50's first two stages: where the candidates come from.
"""

from __future__ import annotations

import itertools
import json
import sys

import torch

from kerasrt.backend import cudnn_conv, dual_conv, pointwise_conv, pointwise_pair, tactics

PAIRS = [  # (C, H, W), first (K, residual, activation), second (K, activation), count, model
    ((64, 56, 56), (256, True, "relu"), (64, "relu"), 2, "ResNet50 stage 1"),
    ((128, 28, 28), (512, True, "relu"), (128, "relu"), 3, "ResNet50 stage 2"),
    ((256, 14, 14), (1024, True, "relu"), (256, "relu"), 5, "ResNet50 stage 3"),
    ((144, 56, 56), (24, True, "none"), (144, "clamp"), 1, "MobileNetV2 24-channel blocks"),
    ((192, 28, 28), (32, True, "none"), (192, "clamp"), 2, "MobileNetV2 32-channel blocks"),
]
DUALS = [  # h (C, H), shortcut input x (C, H), output channels, shortcut stride, model
    ((64, 56), (64, 56), 256, 1, "ResNet50 stage 1"),
    ((128, 28), (256, 56), 512, 2, "ResNet50 stage 2"),
    ((256, 14), (512, 28), 1024, 2, "ResNet50 stage 3"),
    ((512, 7), (1024, 14), 2048, 2, "ResNet50 stage 4"),
]
SWEEP = tuple(itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (2, 3, 4)))


def operands(batch: int, pair: tuple) -> tuple:
    """Random operands of ``pair`` at ``batch``: the op's arguments with its two outputs."""
    dev, cl = torch.device("cuda"), torch.channels_last
    (c, h, wd), (k1, has_res, act1), (k2, act2) = pair[:3]
    x = torch.randn((batch, c, h, wd), device=dev).half().contiguous(memory_format=cl)
    w1 = (torch.randn(k1, c, 1, 1, device=dev) / c**0.5).half()
    w2 = (torch.randn(k2, k1, 1, 1, device=dev) / k1**0.5).half()
    b1, b2 = torch.randn(k1, device=dev).half(), torch.randn(k2, device=dev).half()
    y, z = pointwise_pair.empty_outputs(x, w1, w2)
    res = torch.randn_like(y) if has_res else None
    clip1 = [0.0, 6.0] if act1 == "clamp" else []
    clip2 = [0.0, 6.0] if act2 == "clamp" else []
    return x, w1, b1, res, w2, b2, y, z, act1, clip1, act2, clip2


def timed(configs: tuple, args: tuple) -> list[tuple[float, tuple]]:
    """(device us, config) of every config in ``configs`` that compiles and runs, fastest first."""
    timings = []
    for config in configs:
        try:
            ms = tactics.device_ms(lambda config=config: pointwise_pair.launch(config, *args))
        except Exception:  # out of shared memory or registers: not a candidate
            continue
        timings.append((round(ms * 1e3, 2), config))
    return sorted(timings)


def best_single(x, w, b, res, out, act, clip, stride=(1, 1)) -> float:
    """Device ms of the faster of cuDNN's best fused plan and (stride 1) the pointwise kernel's
    best config."""
    found = tactics.fastest_plan(cudnn_conv.Operands(x, w, b, res, out), stride, [0, 0], [1, 1], act, clip)
    triton = None
    if tuple(stride) == (1, 1):
        triton = tactics.best_config(
            pointwise_conv.CONFIGS,
            lambda cfg: pointwise_conv.launch(cfg, x, w, b, res, out, act, clip),
            "probe",
        )
    return min(ms for ms in (found and found[1], triton and triton[1]) if ms is not None)


def duals(batch: int) -> None:
    """``dual_conv`` against the shortcut and the expansion (with the shortcut as residual) apart."""
    dev, cl = torch.device("cuda"), torch.channels_last
    for (c1, size), (c2, size2), k, s, model in DUALS:
        h = torch.randn((batch, c1, size, size), device=dev).half().contiguous(memory_format=cl)
        x = torch.randn((batch, c2, size2, size2), device=dev).half().contiguous(memory_format=cl)
        w = (torch.randn(k, c1, 1, 1, device=dev) / c1**0.5).half()
        ws = (torch.randn(k, c2, 1, 1, device=dev) / c2**0.5).half()
        b = torch.randn(k, device=dev).half()
        out = pointwise_conv.empty_output(h, w)
        shortcut = torch.empty_like(out)
        apart = best_single(x, ws, b, None, shortcut, "none", [], stride=(s, s))
        apart += best_single(h, w, b, shortcut, out, "relu", [])
        args = (h, w, x, ws, b, out, [s, s], "relu", [])
        timings = [
            (round(tactics.device_ms(lambda cfg=cfg, args=args: dual_conv.launch(cfg, *args)) * 1e3, 2), cfg)
            for cfg in dual_conv.CONFIGS
        ]
        us, config = min(timings)
        dual_conv.launch(config, *args)
        ref = dual_conv.reference(h.float(), w.float(), x.float(), ws.float(), b.float(), [s, s], "relu", [])
        row = {"merge": "dual", "model": model, "batch": batch, "apart_us": round(apart * 1e3, 2)}
        row |= {"dual_us": us, "dual_config": config, "saved_us": round(apart * 1e3 - us, 1)}
        row |= {
            "max_err": round((out.float() - ref).abs().max().item(), 5),
            "out_scale": round(ref.abs().max().item(), 3),
        }
        print(json.dumps(row), flush=True)


def sweep(batches: list[int]) -> None:
    """The five fastest ``SWEEP`` configs per pair of ResNet50's stages 1 and 2 and batch."""
    for batch in batches:
        for pair in PAIRS[:2]:
            print(
                json.dumps(
                    {"model": pair[4], "batch": batch, "fastest_us": timed(SWEEP, operands(batch, pair))[:5]}
                )
            )


def main(batches: list[int]) -> None:
    for batch in batches:
        duals(batch)
        for pair in PAIRS:
            args = operands(batch, pair)
            x, w1, b1, res, w2, b2, y, z, act1, clip1, act2, clip2 = args
            apart = best_single(x, w1, b1, res, y, act1, clip1) + best_single(y, w2, b2, None, z, act2, clip2)
            row = {
                "merge": "pair",
                "model": pair[4],
                "batch": batch,
                "count": pair[3],
                "x": list(x.shape),
                "k1": w1.shape[0],
            }
            row["apart_us"] = round(apart * 1e3, 2)
            timings = timed(pointwise_pair.CONFIGS, args)
            if not timings:
                row["pair"] = "no config ran"
            else:
                us, config = timings[0]
                pointwise_pair.launch(config, *args)
                as_float = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
                ry, rz = pointwise_pair.reference(*as_float[:6], *as_float[8:])
                row["pair_us"], row["pair_config"] = us, config
                row["saved_us_per_network"] = round((apart * 1e3 - us) * pair[3], 1)
                row["max_err"] = [round((t.float() - r).abs().max().item(), 5) for t, r in ((y, ry), (z, rz))]
                row["out_scale"] = round(rz.abs().max().item(), 3)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    run = sweep if args[:1] == ["--sweep"] else main
    run([int(b) for b in args if b != "--sweep"] or [128, 1])
