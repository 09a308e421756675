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
from kerasrt.backend import cudnn_conv, stem_conv, tactics
from kerasrt.bench import latency_stats, sample_latencies
from kerasrt.ir.ops import OPS

DEV = torch.device("cuda")


def p50(fn) -> float:
    return latency_stats(sample_latencies(fn, DEV, 5, 20))["p50"]


def probe(batch: int) -> dict:
    model = keras.applications.ResNet50(weights=None, classifier_activation=None)
    x = torch.randn(batch, 224, 224, 3, device=DEV)
    optimized = kerasrt.Converter(model, precision_mode="FP16", batch_size=batch).convert()
    optimized(x)
    whole = p50(lambda: optimized(x))
    graph = optimized.primary_graph()
    nodes = [n for n in graph.nodes if n.op in ("conv", "conv_fused")]
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
        return round(sum(r.get(field, 0) * r["count"] for r in rows), 4)

    summary = {
        "batch": batch,
        "whole_program_ms": whole,
        "conv_layers": len(nodes),
        "unique": len(rows),
        **{
            f"sum_{field}": total(field)
            for field in (
                "aten_conv_only_ms",
                "inductor_estimate_ms",
                "A_first_ms",
                "A_best8_ms",
                "A_best_ms",
                "B_first_ms",
                "B_best_ms",
            )
        },
    }
    print(json.dumps(summary), flush=True)
    return {"summary": summary, "rows": rows}


def plan_times(g, uids, handle, ops) -> list[float]:
    """Device time (CUDA-graph replay) of every listed plan of a cuDNN graph; inf for a plan
    that does not build or run."""
    g.build_plans(cudnn.build_plan_policy.ALL)
    pack = ops.pack(uids)
    times = []
    for i in range(g.get_execution_plan_count()):
        try:
            ws = torch.empty(max(g.get_workspace_size_plan_at_index(i), 1), device=DEV, dtype=torch.uint8)

            def run(i=i, ws=ws):
                cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
                g.execute_plan_at_index(pack, ws, i, handle=handle)

            times.append(round(tactics.device_ms(run), 4))
        except Exception:  # a plan that did not build or run is no candidate
            times.append(float("inf"))
    return times


def run_plan(g, uids, handle, ops, index: int) -> None:
    """Execute plan ``index`` once (its output lands in ``ops.out``)."""
    ws = torch.empty(max(g.get_workspace_size_plan_at_index(index), 1), device=DEV, dtype=torch.uint8)
    g.execute_plan_at_index(ops.pack(uids), ws, index, handle=handle)


def time_plans(n, ops, heuristics: tuple[str, ...], residual_first: bool = True) -> dict:
    """Device time (CUDA-graph replay) of every plan cuDNN lists for one heuristic set."""
    begin = time.perf_counter()
    g, uids, handle = cudnn_conv.build_graph(
        ops, *cudnn_conv.op_arguments(n), heuristics=heuristics, residual_first=residual_first
    )
    times = plan_times(g, uids, handle, ops)
    build_s = time.perf_counter() - begin
    best = min(range(len(times)), key=times.__getitem__) if times else None
    if best is not None:  # the best plan's output against the reference composition
        run_plan(g, uids, handle, ops, best)
        ref = OPS["conv_fused"].impl(*[ops_tensor for ops_tensor in ops_inputs(n, ops)], **conv_attrs(n))
        err = (ops.out.float() - ref.float()).abs().max() / ref.float().abs().max()
        return {
            "build_s": round(build_s, 2),
            "ms": times,
            "best_index": best,
            "n": len(times),
            "err": float(err),
        }
    return {"build_s": round(build_s, 2), "ms": times, "best_index": best, "n": len(times)}


def ops_inputs(n, ops) -> list[torch.Tensor]:
    return [t for t in (ops.x, ops.w, ops.bias, ops.residual) if t is not None]


def conv_attrs(n) -> dict:
    has_bias, has_residual = cudnn_conv.epilogue_inputs(n)
    act = n.attrs.get("activation")
    return {
        **{k: n.attrs[k] for k in ("stride", "padding", "dilation")},
        "groups": n.attrs.get("groups", 1),
        "has_bias": has_bias,
        "has_residual": has_residual,
        "activation": act,
        "activation_attrs": n.attrs.get("activation_attrs"),
    }


def residual_variants(batch: int) -> list[dict]:
    """For each residual conv of ResNet50: the bare conv, cuDNN graphs with the residual added
    after or before the bias (all plans), PyTorch's cudnn_convolution_add_relu, and the
    memory-traffic floor of the fused kernel at the measured copy bandwidth."""
    model = keras.applications.ResNet50(weights=None, classifier_activation=None)
    graph = kerasrt.Converter(model, precision_mode="FP16", batch_size=batch, conv_kernels="inductor")
    graph = graph.convert().primary_graph()
    seen, rows = set(), []
    big = torch.empty(256 * 2**20, device=DEV, dtype=torch.uint8)
    copy_gbs = 2 * big.numel() / tactics.device_ms(lambda: big.clone()) / 1e6
    for n in graph.nodes:
        if n.op != "conv_fused" or not n.attrs.get("has_residual") or not tactics.eligible(n):
            continue
        key = json.dumps([list(v.shape) for v in n.inputs] + [n.attrs["stride"]])
        if key in seen:
            continue
        seen.add(key)
        ops = tactics.example_operands(n, DEV)
        stride, padding, dilation, act, _ = cudnn_conv.op_arguments(n)
        nbytes = sum(t.numel() * t.element_size() for t in (ops.x, ops.w, ops.residual, ops.out))
        row = {
            "layer": key,
            "floor_ms": nbytes / copy_gbs / 1e6,
            "aten_conv_only_ms": tactics.device_ms(
                functools.partial(
                    torch.convolution, ops.x, ops.w, None, stride, padding, dilation, False, [0, 0], 1
                )
            ),
        }
        if act == "relu":
            try:
                row["aten_cudnn_add_relu_ms"] = tactics.device_ms(
                    functools.partial(
                        torch.cudnn_convolution_add_relu,
                        *(ops.x, ops.w, ops.residual, 1.0, ops.bias, stride, padding, dilation, 1),
                    )
                )
            except Exception as exc:
                row["aten_cudnn_add_relu_ms"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        for label, first in (("bias_first", False), ("residual_first", True)):
            try:
                plans = time_plans(n, ops, ("A", "FALLBACK"), residual_first=first)
                row[label] = {k: plans[k] for k in ("best_index", "n", "build_s", "err") if k in plans}
                row[label]["first3_ms"] = min(plans["ms"][:3])
                row[label]["best_ms"] = min(plans["ms"])
            except Exception as exc:
                row[label] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def probe_layer(n) -> dict:
    """One conv_fused node: the bare convolution, Inductor's estimate, and every cuDNN plan of
    heuristic lists A (+ fallback) and B."""
    attrs = dict(n.attrs)
    if not tactics.eligible(n):
        return {"skip": "not eligible"}
    ops = tactics.example_operands(n, DEV)
    stride, padding, dilation, _, _ = cudnn_conv.op_arguments(n)
    row = {
        "aten_conv_only_ms": tactics.device_ms(
            lambda: torch.convolution(ops.x, ops.w, None, stride, padding, dilation, False, [0, 0], 1)
        ),
        "inductor_estimate_ms": tactics.inductor_estimate_ms(n, ops),
        "residual": attrs.get("has_residual", False),
    }
    for label, heuristics in (("A", ("A", "FALLBACK")), ("B", ("B",))):
        try:
            plans = time_plans(n, ops, heuristics)
        except Exception as exc:
            row[label] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        finite = [t for t in plans["ms"] if t != float("inf")]
        row[label] = plans
        if finite:
            row[f"{label}_first_ms"] = plans["ms"][0]
            row[f"{label}_best8_ms"] = min(plans["ms"][: tactics.MAX_PLANS])
            row[f"{label}_best_ms"] = min(finite)
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
    launches = 0
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
        launches += e.count
    result = {
        "system": label,
        "per_call_us_by_kind": {k: round(v, 1) for k, v in kinds.items()},
        "top": [(k, round(v, 1)) for k, v in top.most_common(40)],
        "launches_per_call": launches / 5,
    }
    print(json.dumps(result), flush=True)
    return result


PEERS = {"ResNet50": "resnet50", "MobileNetV2": "mobilenet_v2", "EfficientNetB0": "efficientnet_b0"}


def breakdown(batch: int, name: str = "ResNet50") -> list[dict]:
    """Kernel profile of kerasrt's program and of torchvision's model under torch.compile."""
    import torchvision

    torch._inductor.config.freezing = True
    model = getattr(keras.applications, name)(weights=None, classifier_activation=None)
    x = torch.randn(batch, 224, 224, 3, device=DEV)
    optimized = kerasrt.Converter(model, precision_mode="FP16", batch_size=batch).convert()
    peer = getattr(torchvision.models, PEERS[name])().eval().half()
    peer = peer.to(DEV, memory_format=torch.channels_last)
    xp = torch.randn(batch, 3, 224, 224, device=DEV).half().to(memory_format=torch.channels_last)
    compiled = torch.compile(peer, mode="reduce-overhead")
    with torch.no_grad():
        return [
            kernel_breakdown(lambda: optimized(x), f"kerasrt {name} b{batch}"),
            kernel_breakdown(lambda: compiled(xp), f"torchvision torch.compile {name} b{batch}"),
        ]


def grouped_variants(batch: int) -> list[dict]:
    """Can cuDNN's graph API fuse depthwise convolutions (MobileNetV2, EfficientNetB0) with
    their bias and activation, and is it faster than PyTorch's depthwise conv + an epilogue?"""
    rows = []
    for name in ("MobileNetV2", "EfficientNetB0"):
        model = getattr(keras.applications, name)(weights=None, classifier_activation=None)
        conv = kerasrt.Converter(model, precision_mode="FP16", batch_size=batch, conv_kernels="inductor")
        graph = conv.convert().primary_graph()
        seen = set()
        for n in graph.nodes:
            if n.op not in ("conv", "conv_fused") or n.attrs.get("groups", 1) == 1:
                continue
            key = json.dumps(
                [[list(v.shape) for v in n.inputs], n.attrs["stride"], n.attrs.get("activation")]
            )
            if key in seen:
                continue
            seen.add(key)
            ops = tactics.example_operands(n, DEV)
            stride, padding, dilation, _, _ = cudnn_conv.op_arguments(n)
            groups = n.attrs["groups"]
            conv_only = functools.partial(
                torch.convolution, ops.x, ops.w, None, stride, padding, dilation, False, [0, 0], groups
            )
            row = {"model": name, "layer": key, "aten_conv_only_ms": tactics.device_ms(conv_only)}
            try:
                plans = time_plans(n, ops, ("A", "FALLBACK"))
                row.update({k: plans[k] for k in ("best_index", "n", "build_s") if k in plans})
                row["cudnn_best_ms"] = min(plans["ms"])
                row["cudnn_first_ms"] = plans["ms"][0]
            except Exception as exc:
                row["cudnn"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def space_to_depth_weight(w: torch.Tensor) -> torch.Tensor:
    """A (K, C, 7, 7) stride-2 weight as the (K, 4C, 4, 4) stride-1 weight over a 2x2
    space-to-depth input (channel order dy, dx, c)."""
    k, c = w.shape[:2]
    w8 = torch.nn.functional.pad(w, [0, 1, 0, 1])  # (K, C, 8, 8)
    w8 = w8.reshape(k, c, 4, 2, 4, 2).permute(0, 3, 5, 1, 2, 4)  # K, dy, dx, C, a, b
    return w8.reshape(k, 4 * c, 4, 4).contiguous(memory_format=torch.channels_last)


def stem_variants(batch: int) -> dict:
    """ResNet50's stem (7x7/2 conv + bias + ReLU on a 3-channel image padded to 4) as cuDNN
    runs it now, against a 2x2 space-to-depth form (4x4/1 conv on 16 channels); each with
    the Inductor kernel that prepares its input from the float32 NHWC image."""
    torch.manual_seed(0)
    img = torch.randn(batch, 224, 224, 3, device=DEV)
    w3 = torch.randn(64, 3, 7, 7, device=DEV).half() * 0.1
    bias = torch.randn(64, device=DEV).half()
    w4 = cudnn_conv.op_weight(w3)

    def prep_direct(x):
        x = x.half().permute(0, 3, 1, 2)
        return torch.nn.functional.pad(x, [0, 0, 0, 0, 0, 1]).contiguous(memory_format=torch.channels_last)

    def prep_s2d(x):
        x = torch.nn.functional.pad(x.half(), [0, 1, 3, 3, 3, 3])  # N, 230, 230, 4
        n = x.shape[0]
        x = x.reshape(n, 115, 2, 115, 2, 4).permute(0, 1, 3, 2, 4, 5).reshape(n, 115, 115, 16)
        return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

    row = {"batch": batch}
    direct, y_direct = stem_variant(img, prep_direct, w4, bias, [2, 2], [3, 3])
    s2d, y_s2d = stem_variant(img, prep_s2d, space_to_depth_weight(w4), bias, [1, 1], [0, 0])
    row.update({f"direct_{k}": v for k, v in direct.items()})
    row.update({f"s2d_{k}": v for k, v in s2d.items()})
    row["s2d_vs_direct_err"] = float(
        (y_s2d.float() - y_direct.float()).abs().max() / y_direct.float().abs().max()
    )
    print(json.dumps(row), flush=True)
    return row


def stem_variant(img, prep, w, bias, stride, padding) -> tuple[dict, torch.Tensor]:
    """Timings of one stem form: its input preparation (compiled), the bare convolution,
    every cuDNN plan of the fused conv + bias + ReLU and the Triton stem kernel's best config;
    and the best plan's output."""
    compiled = torch.compile(prep)
    x = compiled(img)
    row = {"prep_ms": tactics.device_ms(lambda: compiled(img)), "x": [list(x.shape), list(x.stride())]}
    row["aten_ms"] = tactics.device_ms(
        lambda: torch.convolution(x, w, None, stride, padding, [1, 1], False, [0, 0], 1)
    )
    ops = cudnn_conv.Operands(x, w, bias, None, cudnn_conv.empty_output(x, w, stride, padding, [1, 1]))
    g, uids, handle = cudnn_conv.build_graph(ops, stride, padding, [1, 1], "relu", [])
    times = plan_times(g, uids, handle, ops)
    best = min(range(len(times)), key=times.__getitem__)
    run_plan(g, uids, handle, ops, best)
    row.update({"plans_ms": times, "best_ms": times[best]})
    out = torch.empty_like(ops.out)
    triton = tactics.best_config(
        stem_conv.CONFIGS,
        lambda config: stem_conv.launch(config, x, w, bias, out, stride, padding, "relu", []),
        "stem",
    )
    row["triton_best_ms"] = triton and triton[1]
    return row, ops.out


def save(name: str, results: list) -> None:
    """Write ``results`` to $OUT/name when $OUT is set (the GPU machine's result folder)."""
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            json.dump(results, f, indent=1)


def main() -> None:
    print("cudnn backend", cudnn.backend_version_string(), flush=True)
    batches = [int(b) for b in sys.argv[1:]] or [128, 1]
    if os.environ.get("BREAKDOWN_ONLY"):  # MODEL:BATCH,...
        specs = [spec.split(":") for spec in os.environ["BREAKDOWN_ONLY"].split(",")]
        save("breakdown.json", [breakdown(int(b), name) for name, b in specs])
    elif os.environ.get("STEM_ONLY") == "1":
        save("stem_variants.json", [stem_variants(b) for b in batches])
    elif os.environ.get("GROUPED_ONLY") == "1":
        save("grouped_variants.json", [grouped_variants(b) for b in batches])
    elif os.environ.get("RESIDUAL_ONLY") == "1":
        save("residual_variants.json", [residual_variants(b) for b in batches])
    else:
        results = [probe(b) for b in batches]
        if os.environ.get("BREAKDOWN", "1") == "1":
            results += [breakdown(b) for b in batches]
        save("cudnn_probe.json", results)


if __name__ == "__main__":
    main()
