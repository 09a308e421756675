"""Would cuDNN graph-API convolutions with fused epilogues beat the Inductor engines? Per conv
layer of kerasrt's ResNet50 graph: the cuDNN fused graph (conv + bias + residual + ReLU in one
kernel; heuristic's first plan and the best of all plans) against PyTorch's convolution, and
the sum over the network against the whole kerasrt program.

    source .whl/activate.sh && python bench/cudnn_probe.py [BATCH ...]
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections import Counter

os.environ.setdefault("KERAS_BACKEND", "torch")

import cudnn
import keras
import torch

import kerasrt
from kerasrt.backend import cudnn_conv
from kerasrt.bench import latency_stats, sample_latencies
from kerasrt.ir.ops import OPS

DEV = torch.device("cuda")


def p50(fn) -> float:
    return latency_stats(sample_latencies(fn, DEV, 5, 20))["p50"]


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def probe(batch: int) -> dict:
    model = keras.applications.ResNet50(weights=None, classifier_activation=None)
    x = torch.randn(batch, 224, 224, 3, device=DEV)
    optimized = kerasrt.Converter(model, precision_mode="FP16", batch_size=batch).convert()
    optimized(x)
    whole = p50(lambda: optimized(x))
    graph = optimized.primary_graph()
    nodes = [n for n in graph.nodes if n.op == "conv_fused"]
    signature = Counter()
    example = {}
    for n in nodes:
        key = json.dumps(
            [[list(v.shape) for v in n.inputs], {k: v for k, v in n.attrs.items() if k != "activation_attrs"}]
        )
        signature[key] += 1
        example.setdefault(key, n)
    rows = []
    for key, count in signature.items():
        row = {"layer": key, "count": count, **probe_layer(example[key])}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def total(field):
        return sum(r.get(field, r.get("torch_eager_ms", 0)) * r["count"] for r in rows)

    summary = {
        "batch": batch,
        "whole_program_ms": whole,
        "conv_layers": len(nodes),
        "unique": len(rows),
        "sum_torch_eager_ms": total("torch_eager_ms"),
        "sum_aten_conv_only_ms": total("aten_conv_only_ms"),
        "sum_cudnn_first_ms": total("cudnn_first_ms"),
        "sum_cudnn_best_ms": total("cudnn_best_ms"),
    }
    print(json.dumps(summary), flush=True)
    return {"summary": summary, "rows": rows}


def probe_layer(n) -> dict:
    """Time one conv_fused node: PyTorch eager, the bare convolution, cuDNN fused graph plans."""
    attrs = dict(n.attrs)
    if attrs.get("groups", 1) != 1:
        return {"skip": "grouped"}
    ins = [
        channels_last(v.data.to(DEV) if v.is_constant else torch.randn(v.shape, device=DEV).half())
        for v in n.inputs
    ]
    xin, w = ins[0], ins[1]
    b = ins[2] if attrs["has_bias"] else None
    r = ins[2 + int(attrs["has_bias"])] if attrs["has_residual"] else None
    kw = {k: attrs[k] for k in OPS["conv_fused"].attrs if k in attrs}
    ref = OPS["conv_fused"].impl(*ins, **kw)
    t_torch = p50(lambda: OPS["conv_fused"].impl(*ins, **kw))
    t_conv = p50(
        lambda: torch.convolution(
            xin, w, None, attrs["stride"], attrs["padding"], attrs["dilation"], False, [0, 0], 1
        )
    )
    row = {"torch_eager_ms": t_torch, "aten_conv_only_ms": t_conv}
    try:
        begin = time.perf_counter()
        ops = cudnn_conv.Operands(xin, w, b, r, torch.empty_like(ref))
        g, uids, handle = cudnn_conv.build_graph(ops, *cudnn_conv.op_arguments(n))
        g.build_plans(cudnn.build_plan_policy.ALL)
        cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
        row["cudnn_build_s"] = time.perf_counter() - begin
        out, pack = ops.out, ops.pack(uids)
        sizes = [g.get_workspace_size()]
        for i in range(g.get_execution_plan_count()):
            try:
                sizes.append(g.get_workspace_size_plan_at_index(i))
            except Exception:  # a plan that did not build has no size
                pass
        ws = torch.empty(max(*sizes, 1), device=DEV, dtype=torch.uint8)
        times = []
        for i in range(g.get_execution_plan_count()):
            try:
                times.append(p50(functools.partial(g.execute_plan_at_index, pack, ws, i, handle=handle)))
            except Exception as exc:  # a plan that cannot run is skipped
                times.append(float("inf"))
                row.setdefault("plan_errors", []).append(str(exc)[:120])
        g.execute_plan_at_index(pack, ws, 0, handle=handle)
        torch.cuda.synchronize()
        row["cudnn_rel_err"] = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
        row["cudnn_first_ms"] = times[0]
        row["cudnn_best_ms"] = min(times)
        row["plans"] = len(times)
    except Exception as exc:
        row["cudnn_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return row


def kernel_breakdown(fn, label: str) -> dict:
    """GPU time per kernel class over 5 calls of ``fn`` (torch.profiler), and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    kinds: Counter = Counter()
    top: Counter = Counter()
    for e in prof.key_averages():
        us = e.device_time_total / 5 if hasattr(e, "device_time_total") else e.cuda_time_total / 5
        if us <= 0 or e.key.startswith("cudaGraph") or ("Memcpy" in e.key and us == 0):
            continue
        name = e.key.lower()
        kind = (
            "triton"
            if "triton" in name
            else "conv"
            if any(s in name for s in ("conv", "xmma", "implicit", "cudnn", "sm90", "sm80"))
            else "gemm"
            if "gemm" in name or "cutlass" in name
            else "memcpy"
            if "memcpy" in name
            else "other"
        )
        kinds[kind] += us
        top[e.key[:90]] += us
    result = {
        "system": label,
        "per_call_us_by_kind": {k: round(v, 1) for k, v in kinds.items()},
        "top": [(k, round(v, 1)) for k, v in top.most_common(12)],
    }
    print(json.dumps(result), flush=True)
    return result


def breakdown(batch: int) -> list[dict]:
    import torchvision

    torch._inductor.config.freezing = True
    model = keras.applications.ResNet50(weights=None, classifier_activation=None)
    x = torch.randn(batch, 224, 224, 3, device=DEV)
    optimized = kerasrt.Converter(model, precision_mode="FP16", batch_size=batch).convert()
    peer = torchvision.models.resnet50().eval().half().to(DEV, memory_format=torch.channels_last)
    xp = torch.randn(batch, 3, 224, 224, device=DEV).half().to(memory_format=torch.channels_last)
    compiled = torch.compile(peer, mode="reduce-overhead")
    with torch.no_grad():
        return [
            kernel_breakdown(lambda: optimized(x), f"kerasrt b{batch}"),
            kernel_breakdown(lambda: compiled(xp), f"torchvision torch.compile b{batch}"),
        ]


def main() -> None:
    print("cudnn backend", cudnn.backend_version_string(), flush=True)
    batches = [int(b) for b in sys.argv[1:]] or [128, 1]
    results = [probe(b) for b in batches]
    if os.environ.get("BREAKDOWN", "1") == "1":
        results += [breakdown(b) for b in batches]
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "cudnn_probe.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
