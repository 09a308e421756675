"""Time the Triton stem kernel's configs against cuDNN's fused plans on image stems (FP16, the
image padded to 4 channels as the engine passes it), per batch.

    source .whl/activate.sh && python bench/stem_probe.py [BATCH ...]

(An earlier version of the kernel also read the float32 RGB image directly, skipping the
engine's cast-and-pad pass; on an H100 at batch 128 that took ResNet50's stem 0.604 ms against
0.277 ms on the padded FP16 image, and was dropped.)
"""

from __future__ import annotations

import json
import sys

import torch

from kerasrt.backend import cudnn_conv, stem_conv, tactics

STEMS = {  # name: (H, W, K, R, stride, padding, activation, clip)
    "ResNet50 7x7/2": (224, 224, 64, 7, [2, 2], [3, 3], "relu", []),
    "MobileNetV2 3x3/2": (225, 225, 32, 3, [2, 2], [0, 0], "clamp", [0.0, 6.0]),
}
EXTRA_CONFIGS = ((256, 64, 8, 3), (64, 64, 2, 2), (128, 64, 4, 3), (512, 64, 8, 2))


def cudnn_ms(ops: cudnn_conv.Operands, stride, padding, act, clip) -> float | None:
    """The fastest of cuDNN's first 8 plans for the fused stem, device ms."""
    g, uids, handle = cudnn_conv.build_graph(ops, stride, padding, [1, 1], act, clip)
    pack, best = ops.pack(uids), None
    for index in range(min(8, g.get_execution_plan_count())):
        try:
            g.build_plan_at_index(index)
            ws = torch.empty(max(g.get_workspace_size(), 1), dtype=torch.uint8, device=ops.x.device)

            def run(index: int = index, ws: torch.Tensor = ws) -> None:
                cudnn_conv.frontend().set_stream(handle, torch.cuda.current_stream().cuda_stream)
                g.execute_plan_at_index(pack, ws, index, handle=handle)

            ms = tactics.device_ms(run)
        except Exception:  # a plan that does not build or run
            continue
        best = ms if best is None else min(best, ms)
    return best


def probe(batch: int) -> None:
    dev, cl = torch.device("cuda"), torch.channels_last
    for name, (h, wd, k, r, stride, padding, act, clip) in STEMS.items():
        w = (torch.randn(k, 4, r, r, device=dev) / (3 * r * r) ** 0.5).half()
        w[:, 3:] = 0
        w = w.contiguous(memory_format=cl)
        b = torch.randn(k, device=dev).half()
        image = torch.randn(batch, 3, h, wd, device=dev).contiguous(memory_format=cl)
        padded = torch.nn.functional.pad(image.half(), [0, 0, 0, 0, 0, 1]).contiguous(memory_format=cl)
        out = stem_conv.empty_output(padded, w, stride, padding)
        row: dict = {"stem": name, "batch": batch}
        row["cudnn_ms"] = cudnn_ms(cudnn_conv.Operands(padded, w, b, None, out), stride, padding, act, clip)
        forms = {
            "fp32 rgb": image,
            "fp16 rgb": image.half().contiguous(memory_format=cl),
            "fp16 rgb+0": padded,
        }
        for form, x in forms.items():
            timings = {}
            for config in stem_conv.CONFIGS + EXTRA_CONFIGS:

                def run(config: tuple = config, x: torch.Tensor = x) -> None:
                    stem_conv.launch(config, x, w, b, out, stride, padding, act, clip)  # noqa: B023 (timed now)

                try:
                    timings[str(config)] = round(tactics.device_ms(run), 4)
                except Exception as exc:  # a config that does not compile
                    timings[str(config)] = str(exc)[:80]
            numeric = {c: t for c, t in timings.items() if isinstance(t, float)}
            row[form] = min(numeric.items(), key=lambda kv: kv[1]) if numeric else timings
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    for batch in map(int, sys.argv[1:] or ["128", "1"]):
        probe(batch)
