"""Time ``kerasrt::dual_conv`` (a 1x1 convolution with the 1x1 projection shortcut added to
it, one GEMM) against the two convolutions run apart, each on its own best kernel as the
tactics pick it (cuDNN's best fused plan or, at stride 1, the pointwise Triton kernel's best
config), on ResNet50's four projection blocks, and check its output.

    source .whl/activate.sh && python bench/merge_probe.py [BATCH ...]

One JSON line per block and batch: device us of each (``tactics.device_ms``), the merged
kernel's best config and its largest error against the reference composition. (The chained
1x1 pair, ``kerasrt::pointwise_pair``, was probed by this script at commit 34ac7bc; since the
sixteenth round its end-to-end gain is measured with ``bench/batch_scaling.py`` and its
numerics checked by ``bench/gpu_checks.py --only pair``.)
"""

from __future__ import annotations

import json
import sys

import torch

from kerasrt.backend import cudnn_conv, dual_conv, pointwise_conv, tactics

DUALS = [  # h (C, H), shortcut input x (C, H), output channels, shortcut stride, model
    ((64, 56), (64, 56), 256, 1, "ResNet50 stage 1"),
    ((128, 28), (256, 56), 512, 2, "ResNet50 stage 2"),
    ((256, 14), (512, 28), 1024, 2, "ResNet50 stage 3"),
    ((512, 7), (1024, 14), 2048, 2, "ResNet50 stage 4"),
]


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


def main(batches: list[int]) -> None:
    dev, cl = torch.device("cuda"), torch.channels_last
    for batch in batches:
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
                (
                    round(
                        tactics.device_ms(lambda cfg=cfg, args=args: dual_conv.launch(cfg, *args)) * 1e3, 2
                    ),
                    cfg,
                )
                for cfg in dual_conv.CONFIGS
            ]
            us, config = min(timings)
            dual_conv.launch(config, *args)
            ref = dual_conv.reference(
                h.float(), w.float(), x.float(), ws.float(), b.float(), [s, s], "relu", []
            )
            row = {"model": model, "batch": batch, "apart_us": round(apart * 1e3, 2)}
            row |= {"dual_us": us, "dual_config": config, "saved_us": round(apart * 1e3 - us, 1)}
            row |= {
                "max_err": round((out.float() - ref).abs().max().item(), 5),
                "out_scale": round(ref.abs().max().item(), 3),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main([int(b) for b in sys.argv[1:]] or [128, 1])
