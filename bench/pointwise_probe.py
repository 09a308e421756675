"""Does the Triton pointwise (1x1 conv) kernel beat cuDNN's fused graphs and Inductor? Every
1x1 stride-1 convolution shape of ResNet50, MobileNetV2 and EfficientNetB0 (FP16): each
Triton config, cuDNN's best plan, Inductor's estimate and the traffic floor, as CUDA-graph
replays; the Triton output checked against the reference; sums weighted by layer count.

    source .whl/activate.sh && python bench/pointwise_probe.py [MODEL:BATCH ...]
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import torch

import kerasrt
from kerasrt.backend import cudnn_conv, pointwise_conv, tactics

sys.path.insert(0, os.path.dirname(__file__))
from depthwise_probe import DEV, copy_bandwidth  # the same traffic floor for both probes


def probe(name: str, batch: int, bandwidth: float) -> dict:
    model = getattr(keras.applications, name)(weights=None, classifier_activation=None)
    conv = kerasrt.Converter(model, precision_mode="FP16", batch_size=batch, conv_kernels="inductor")
    graph = conv.convert().primary_graph()
    count: Counter = Counter()
    example = {}
    for n in graph.nodes:
        if pointwise_conv.eligible(n):
            ops = tactics.example_operands(n, torch.device("meta"))
            sig = cudnn_conv.signature(ops, *cudnn_conv.op_arguments(n))
            count[sig] += 1
            example.setdefault(sig, n)
    rows = []
    for sig, n in example.items():
        ops = tactics.example_operands(n, DEV)
        act, clip = cudnn_conv.op_arguments(n)[3:]
        ref = pointwise_conv.reference(ops.x, ops.w, ops.bias, ops.residual, act, clip).float()
        traffic = ops.x.numel() + ops.out.numel() + (ops.residual.numel() if ops.residual is not None else 0)
        row = {"model": name, "batch": batch, "signature": sig, "count": count[sig]}
        row["floor_ms"] = round(traffic * ops.x.element_size() / bandwidth, 5)
        row["inductor_ms"] = round(tactics.inductor_estimate_ms(n, ops), 5)
        found = tactics.measure_cudnn(n, ops)
        row["cudnn_ms"] = round(found[1], 5) if found else None
        times = {}
        by_name = {str(c): c for c in pointwise_conv.CONFIGS}
        for config in pointwise_conv.CONFIGS:
            args = (ops.x, ops.w, ops.bias, ops.residual, ops.out, act, clip)
            try:
                times[str(config)] = round(
                    tactics.device_ms(lambda c=config, a=args: pointwise_conv.launch(c, *a)), 5
                )
            except Exception as exc:
                times[str(config)] = f"{type(exc).__name__}: {str(exc)[:160]}"
        finite = {k: v for k, v in times.items() if isinstance(v, float)}
        best = min(finite, key=finite.get)
        pointwise_conv.launch(by_name[best], ops.x, ops.w, ops.bias, ops.residual, ops.out, act, clip)
        row["triton_best"] = [best, finite[best]]
        row["triton_err"] = (ops.out.float() - ref).abs().max().item() / ref.abs().max().item()
        row["triton_ms"] = times
        print(json.dumps({k: v for k, v in row.items() if k != "triton_ms"}), flush=True)
        rows.append(row)

    def total(get) -> float:
        return round(sum(get(r) * r["count"] for r in rows), 4)

    summary = {
        "model": name,
        "batch": batch,
        "layers": sum(count.values()),
        "floor_ms": total(lambda r: r["floor_ms"]),
        "inductor_ms": total(lambda r: r["inductor_ms"]),
        "cudnn_or_inductor_ms": total(lambda r: min(r["cudnn_ms"] or 1e9, r["inductor_ms"])),
        "triton_ms": total(lambda r: r["triton_best"][1]),
        "best_of_all_ms": total(lambda r: min(r["cudnn_ms"] or 1e9, r["inductor_ms"], r["triton_best"][1])),
    }
    print(json.dumps(summary), flush=True)
    return {"summary": summary, "rows": rows}


def main() -> None:
    bandwidth = copy_bandwidth()
    specs = sys.argv[1:] or ["MobileNetV2:128", "EfficientNetB0:128", "ResNet50:128", "MobileNetV2:1"]
    results = []
    for spec in specs:
        name, _, batch = spec.partition(":")
        results.append(probe(name, int(batch or 128), bandwidth))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "pointwise_probe.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
