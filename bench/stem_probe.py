"""Time the Triton stem kernel's configs against cuDNN's fused plans (the best as the tactics
search them, ``tactics.fastest_plan``) on image stems (FP16, the image padded to 4 channels as
the engine passes it), per batch.

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
        plan = tactics.fastest_plan(
            cudnn_conv.Operands(padded, w, b, None, out), stride, padding, [1, 1], act, clip
        )
        row["cudnn_ms"] = plan and plan[1]
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
