"""Which Triton depthwise kernel and tile config is fastest per layer shape? Every depthwise
layer shape of MobileNetV2 and EfficientNetB0 (FP16): each config of the pixel-tile kernel
and of the row-tiled kernel, as CUDA-graph replays, against Inductor's way (pad + cuDNN's
depthwise kernel + epilogue) and the layer's memory-traffic floor; outputs checked against
the reference.

    source .whl/activate.sh && python bench/depthwise_probe.py [BATCH ...]
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import torch

import kerasrt
from kerasrt.backend import depthwise_conv, tactics

DEV = torch.device("cuda")


def copy_bandwidth() -> float:
    """Bytes per ms of a large device-to-device copy (read + write counted)."""
    a = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    return 2 * a.numel() / tactics.device_ms(lambda: b.copy_(a))


def layers(name: str, batch: int) -> list[tuple]:
    model = getattr(keras.applications, name)(weights=None, classifier_activation=None)
    conv = kerasrt.Converter(model, precision_mode="FP16", batch_size=batch, conv_kernels="inductor")
    graph = conv.convert().primary_graph()
    seen, found = set(), []
    for n in graph.nodes:
        if not depthwise_conv.eligible(n):
            continue
        x, padding = depthwise_conv.ir_call(n, graph.nodes)
        ops = tactics.depthwise_operands(n, x, padding, DEV)
        sig = tactics.depthwise_signature(n, ops, padding)
        if sig not in seen:
            seen.add(sig)
            found.append((n, ops, padding, sig))
    return found


def probe(batch: int, bandwidth: float) -> list[dict]:
    rows = []
    for name in ("MobileNetV2", "EfficientNetB0"):
        for node, ops, padding, sig in layers(name, batch):
            if os.environ.get("ONLY") and not any(o in sig for o in os.environ["ONLY"].split(";")):
                continue
            stride, act, clip = depthwise_conv.op_arguments(node)
            args = (ops.x, ops.w, ops.bias, ops.out, stride, padding, act, clip)
            ref = depthwise_conv.reference(ops.x, ops.w, ops.bias, stride, padding, act, clip).float()
            scale = ref.abs().max().item()
            floor = (ops.x.numel() + ops.out.numel()) * ops.x.element_size() / bandwidth
            row = {"model": name, "batch": batch, "signature": sig, "floor_ms": round(floor, 5)}
            choice = tactics.measure_depthwise(node, ops, padding, "auto")
            row["inductor_ms"] = choice.inductor_ms
            for label in ("tiles", "rows"):
                configs = [c for c in depthwise_conv.CONFIGS if c[0] == label]
                times, worst = {}, 0.0
                for config in configs:
                    try:
                        times[str(config)] = round(
                            tactics.device_ms(lambda c=config, a=args: depthwise_conv.launch(c, *a)), 5
                        )
                        depthwise_conv.launch(config, *args)
                        worst = max(worst, (ops.out.float() - ref).abs().max().item() / scale)
                    except Exception as exc:
                        times[str(config)] = f"{type(exc).__name__}: {str(exc)[:120]}"
                finite = {k: v for k, v in times.items() if isinstance(v, float)}
                best = min(finite, key=finite.get)
                row[f"{label}_best"] = [best, finite[best]]
                row[f"{label}_err"] = worst
                row[f"{label}_ms"] = times
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_ms")}), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    bandwidth = copy_bandwidth()
    print(json.dumps({"copy_GBps": round(bandwidth / 1e6, 1)}), flush=True)
    results = [probe(int(b), bandwidth) for b in (sys.argv[1:] or [128, 1])]
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "depthwise_probe.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
