"""Time the split-K Triton kernel's configs (and extra candidates) against cuDNN's fused plans
on ResNet50's convolutions at batch 1, the shapes it exists for.

    source .whl/activate.sh && python bench/splitk_probe.py
    source .whl/activate.sh && TRITON_CACHE_DIR=$(mktemp -d) python bench/splitk_probe.py --compile-cost

One JSON line per convolution: cuDNN's best plan as the tactics search them
(``tactics.fastest_plan``) and each config's device us (``tactics.device_ms``: CUDA-graph
replays of 10 calls).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from kerasrt.backend import cudnn_conv, splitk_conv, tactics

CASES = [  # (N, C, H, W), (K, R, S), stride, padding, residual
    ((1, 512, 7, 7), (512, 3, 3), [1, 1], [1, 1], False),
    ((1, 256, 14, 14), (256, 3, 3), [1, 1], [1, 1], False),
    ((1, 128, 28, 28), (128, 3, 3), [1, 1], [1, 1], False),
    ((1, 64, 56, 56), (64, 3, 3), [1, 1], [1, 1], False),
    ((1, 2048, 7, 7), (512, 1, 1), [1, 1], [0, 0], False),
    ((1, 1024, 14, 14), (256, 1, 1), [1, 1], [0, 0], False),
    ((1, 1024, 14, 14), (2048, 1, 1), [2, 2], [0, 0], True),
]
EXTRA_CONFIGS = (  # timed here only: candidates the tactics dropped (slower on these shapes, H100)
    (64, 64, 64, 1, 4, 3),  # no split: the stage-4 3x3 in 33 us
    (64, 64, 64, 16, 4, 3),
    (64, 128, 64, 4, 4, 3),
    (64, 32, 64, 16, 2, 3),
    (128, 64, 64, 2, 4, 3),
    (32, 64, 64, 16, 4, 3),
    (32, 32, 64, 16, 2, 3),
    (16, 64, 64, 16, 4, 3),
    (64, 64, 128, 8, 4, 3),
    (32, 128, 64, 8, 4, 3),
    (64, 64, 64, 32, 4, 3),
    (32, 64, 64, 8, 4, 2),
    (32, 64, 64, 8, 4, 5),
)


def compile_cost() -> None:
    """Seconds of each config's first call per case (compiling, unless an earlier case's
    kernel serves it), and how many kernels Triton's cache holds afterwards."""
    dev, cl = torch.device("cuda"), torch.channels_last
    for xs, (k, r, s), stride, padding, has_r in CASES:
        x = torch.randn(xs, device=dev).half().contiguous(memory_format=cl)
        w = torch.randn(k, xs[1], r, s, device=dev).half().contiguous(memory_format=cl)
        out = splitk_conv.empty_output(x, w, stride, padding)
        res = torch.randn_like(out) if has_r else None
        firsts = []
        for config in splitk_conv.CONFIGS:
            begin = time.perf_counter()
            splitk_conv.launch(config, x, w, None, res, out, stride, padding, "relu", [])
            torch.cuda.synchronize()
            firsts.append(round(time.perf_counter() - begin, 3))
        cached = sum(
            name.endswith(".cubin")
            for _, _, files in os.walk(os.environ["TRITON_CACHE_DIR"])
            for name in files
        )
        print(
            json.dumps({"x": xs, "w": [k, xs[1], r, s], "first_call_s": firsts, "cubins": cached}), flush=True
        )


def main() -> None:
    dev, cl = torch.device("cuda"), torch.channels_last
    for xs, (k, r, s), stride, padding, has_r in CASES:
        x = torch.randn(xs, device=dev).half().contiguous(memory_format=cl)
        w = (
            (torch.randn(k, xs[1], r, s, device=dev) / (xs[1] * r * s) ** 0.5)
            .half()
            .contiguous(memory_format=cl)
        )
        b = torch.randn(k, device=dev).half()
        out = splitk_conv.empty_output(x, w, stride, padding)
        res = torch.randn_like(out) if has_r else None
        row = {"x": xs, "w": [k, xs[1], r, s], "stride": stride}
        plan = tactics.fastest_plan(
            cudnn_conv.Operands(x, w, b, res, out), stride, padding, [1, 1], "relu", []
        )
        row["cudnn_us"] = plan and round(plan[1] * 1e3, 2)
        args = (x, w, b, res, out, stride, padding, "relu", [])
        for config in splitk_conv.CONFIGS + EXTRA_CONFIGS:
            try:
                ms = tactics.device_ms(lambda config=config, args=args: splitk_conv.launch(config, *args))
                row[str(config)] = round(ms * 1e3, 2)
            except Exception as exc:  # a config that does not compile or run
                row[str(config)] = str(exc)[:60]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    compile_cost() if sys.argv[1:] == ["--compile-cost"] else main()
