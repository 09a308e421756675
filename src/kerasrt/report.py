"""The conversion report: what runs in engines, what runs natively or in Keras, and why."""

from __future__ import annotations

from collections import Counter
from typing import Any

from kerasrt.ir.cost import node_flops
from kerasrt.ir.ops import KERNEL
from kerasrt.passes.quantize import CALIBRATION, QUANTIZATION
from kerasrt.runtime.model import OptimizedModel
from kerasrt.tuning.choices import Choice


def make_report(model: OptimizedModel) -> dict[str, Any]:
    """A JSON-safe report of the model's most recently used engine set; before any engine is
    built (sizes unknown until the first call), of its source graph, partitioned as an engine
    build would (with no optimization yet, and FLOPs unknown)."""
    if not model.engine_shapes:
        return _source_report(model)
    key = model.engine_shapes[-1]
    program = model.program(key)
    nodes = program.graph.nodes
    report = _segments_report(model, program.segments, nodes)
    report.update(
        {
            "input_shapes": [list(s) for s in key],
            "optimization": program.graph.meta.get("optimization", {}),
            "precision_lowering": program.graph.meta.get("precision", {}),
            "compiler": model.settings.compiler_for(model.device.type),
            "engines_compiled": {str(i): e.compiler for i, e in program.compiled_engines.items()},
            "cuda_graph": program.graphable,
            "conv_kernels": dict(
                Counter(
                    n.attrs[KERNEL]["kernel"] for s in program.segments for n in s.nodes if KERNEL in n.attrs
                )
            ),
            "merged": dict((program.graph.meta.get("kernels") or {}).get("merged", {})),
            "shape_choices": [
                {"input_shapes": [list(s) for s in k], **v} for k, v in model.shape_choices.items()
            ],
        }
    )
    quantization = program.graph.meta.get(QUANTIZATION)
    if quantization is not None:
        calibration = next((s.meta[CALIBRATION] for s in model.sources if CALIBRATION in s.meta), {})
        report["quantization"] = {
            **quantization,
            "calibration_data": calibration.get("data"),
            "search": calibration.get("search"),
        }
    return report


def _source_report(model: OptimizedModel) -> dict[str, Any]:
    from kerasrt.backend.torch_backend import is_supported
    from kerasrt.compile.partition import partition

    source = model.sources[0]
    segments = partition(source, is_supported, model.settings.minimum_segment_size)
    report = _segments_report(model, segments, source.nodes)
    report["input_shapes"] = [list(v.shape) for v in source.inputs]
    report["note"] = "no engine built yet (input sizes unknown): engines are built at the first call"
    return report


def _flops(nodes: Any) -> int | None:
    try:
        return sum(node_flops(n) for n in nodes)
    except TypeError:  # symbolic sizes
        return None


def _segments_report(model: OptimizedModel, program_segments: Any, nodes: Any) -> dict[str, Any]:
    segments = []
    for seg in program_segments:
        entry: dict[str, Any] = {
            "index": seg.index,
            "kind": seg.kind,
            "ops": dict(Counter(n.op for n in seg.nodes).most_common()),
            "flops": _flops(seg.nodes),
            "layers": sorted({n.layer for n in seg.nodes}),
            "inputs": [{"name": v.name, "type": v.type_str()} for v in seg.inputs],
            "outputs": [{"name": v.name, "type": v.type_str()} for v in seg.outputs],
        }
        if seg.reason:
            entry["reason"] = seg.reason
        segments.append(entry)
    in_engines = sum(len(s.nodes) for s in program_segments if s.kind == "engine")
    flops_total = _flops(nodes)
    flops_engines = _flops([n for s in program_segments if s.kind == "engine" for n in s.nodes])
    native = [s for s in program_segments if s.kind == "native"]
    suggestion = ""
    if native:
        largest = max(len(s.nodes) for s in native)
        suggestion = (
            f"{sum(len(s.nodes) for s in native)} op(s) in {len(native)} run(s) stay out of engines because of "
            f"minimum_segment_size={model.settings.minimum_segment_size}; "
            f"minimum_segment_size={largest} or less would put them in engines"
        )
    fallbacks = [
        {"layer": n.attrs["layer"] or model.name, "reason": n.attrs["reason"]}
        for s in program_segments
        if s.kind == "fallback"
        for n in s.nodes
    ]
    return {
        "model": model.name,
        "precision": model.settings.precision_mode,
        "device": str(model.device),
        "engine_shapes": [[list(s) for s in k] for k in model.engine_shapes],
        "settings": model.settings.to_json(),
        "nodes": len(nodes),
        "nodes_in_engines": in_engines,
        "ops": dict(Counter(n.op for n in nodes).most_common()),
        "layers": len({n.layer for n in nodes}),
        "flops": flops_total,
        "flops_in_engines": flops_engines,
        "segments": segments,
        "fallbacks": fallbacks,
        "suggestion": suggestion,
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as text for people."""
    total = max(report["nodes"], 1)
    kinds = Counter(s["kind"] for s in report["segments"])
    lines = [
        f"kerasrt conversion of {report['model']!r}  precision={report['precision']}  device={report['device']}",
        f"input shapes: {report['input_shapes']}   engines cached for: {report['engine_shapes']}",
        f"{report['nodes']} IR ops from {report['layers']} layers; "
        f"{report['nodes_in_engines']} ({100 * report['nodes_in_engines'] / total:.0f}%) in "
        f"{kinds['engine']} engine(s), {kinds['native']} native segment(s), {kinds['fallback']} Keras fallback(s)",
        f"FLOPs per call: {report['flops'] / 1e6:.1f} M, "
        f"{100 * report['flops_in_engines'] / max(report['flops'], 1):.1f}% in engines"
        if report["flops"] is not None
        else "FLOPs per call: depend on the input sizes",
        "ops: " + ", ".join(f"{op} x{n}" for op, n in report["ops"].items()),
    ]
    if report.get("note"):
        lines.append(report["note"])
    opt = report.get("optimization") or {}
    if opt:
        lines.append(
            f"optimizer (level {opt['level']}): {opt['nodes_before']} -> {opt['nodes_after']} ops; "
            + (", ".join(f"{rule} x{n}" for rule, n in opt["rules"].items()) or "nothing to do")
        )
    low = report.get("precision_lowering") or {}
    if low:
        changes = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in low.get("changes", {}).items())
        lines.append(
            f"precision {low['mode']}: compute in {low['dtype']} ({changes}); in float32: {', '.join(low['fp32_ops'])}"
        )
    if "compiler" in report:
        graph = "replayed as one CUDA graph" if report.get("cuda_graph") else "no CUDA graph"
        lines.append(f"engines: compiler {report['compiler']}, {graph}")
    if report.get("conv_kernels"):
        kernels = ", ".join(f"{n} on {k}" for k, n in sorted(report["conv_kernels"].items()))
        lines.append(f"kernels chosen by timing (tactics): {kernels}")
        merged = report.get("merged") or {}
        if merged:
            lines.append(
                "merged neighbouring convolutions: "
                + ", ".join(f"{n} into {op}" for op, n in sorted(merged.items()))
            )
    for choice in report.get("shape_choices") or []:
        lines.append(
            f"hot input shapes {choice['input_shapes']}: {choice['chosen']} engine "
            f"(static {choice['static_ms']:.3f} ms, dynamic {choice['dynamic_ms']:.3f} ms)"
        )
    lines.extend(_quantization_lines(report.get("quantization")))
    lines.append("")
    for seg in report["segments"]:
        ops = ", ".join(f"{op} x{n}" for op, n in seg["ops"].items())
        ins = ", ".join(f"{v['name']}:{v['type']}" for v in seg["inputs"])
        outs = ", ".join(f"{v['name']}:{v['type']}" for v in seg["outputs"])
        lines.append(f"[{seg['index']}] {seg['kind']:<8} {ops}")
        lines.append(f"      in: {ins}")
        lines.append(f"      out: {outs}")
        if seg["kind"] != "engine":
            layers = ", ".join(seg["layers"][:6]) + (" ..." if len(seg["layers"]) > 6 else "")
            lines.append(f"      layers: {layers}")
        if seg.get("reason"):
            lines.append(f"      why: {seg['reason']}")
    if report.get("suggestion"):
        lines.append("")
        lines.append("suggestion: " + report["suggestion"])
    if report["fallbacks"]:
        lines.append("")
        lines.append("Layers that run in Keras:")
        lines.extend(f"  {f['layer']}: {f['reason']}" for f in report["fallbacks"])
    return "\n".join(lines)


def _quantization_lines(quantization: dict[str, Any] | None) -> list[str]:
    """The quantization summary: calibration, the accuracy search, and every site's decision."""
    if not quantization:
        return []
    sites = quantization["sites"]
    done = [s for s in sites if s["quantized"]]
    data = quantization.get("calibration_data") or {}
    lines = [
        f"quantization {quantization['mode']} ({quantization['dtype']}): {len(done)} of {len(sites)} "
        f"convolution/dense layers quantized; calibrator {quantization['calibrator']} on "
        f"{data.get('samples', '?')} samples in {data.get('batches', '?')} batches"
    ]
    search = quantization.get("search")
    if search:
        lines.append(
            f"accuracy search ({search['metric']}): reference {search['reference']:.4g}, all quantized "
            f"{search['all_quantized']:.4g}, final {search['final']:.4g} (drop {search['drop']:.4g}, "
            f"budget {search['budget']:g}; {search['evaluations']} evaluations)"
        )
    for site in sites:
        what = "quantized" if site["quantized"] else f"kept: {site['reason']}"
        lines.append(f"  {site['layer'] or '(model)'} [{site['op']}]: {what}")
    return lines


def tactics_rows(model: OptimizedModel) -> list[dict[str, Any]]:
    """Every kernel choice of the model's graphs: the node (layer, op, output), the kernel and
    config chosen, and each candidate's timing (``kerasrt inspect --tactics``)."""
    rows = []
    for key, graph in model.graphs.items():
        for node in graph.nodes:
            choice = Choice.of(node)
            if choice is None:
                continue
            rows.append(
                {
                    "input_shapes": [list(s) for s in key],
                    "layer": node.layer,
                    "op": node.op,
                    "output": node.outputs[0].type_str(),
                    "kernel": choice.kernel,
                    "config": choice.config,
                    "timings_ms": {k: ms for k, (_, ms) in sorted(choice.timings.items())},
                }
            )
    return rows


def format_tactics(rows: list[dict[str, Any]]) -> str:
    """``tactics_rows`` as a table for people."""
    if not rows:
        return "no kernel choices: the engines run Inductor's code for every node (or were built on a CPU)"
    lines = [f"{'layer':<28} {'op':<10} {'output':<22} {'kernel':<15} cfg  timings (ms)"]
    for r in rows:
        timed = ", ".join(
            f"{k} {ms:.4f}" if ms is not None else f"{k} did not run" for k, ms in r["timings_ms"].items()
        )
        lines.append(
            f"{r['layer'][:28]:<28} {r['op']:<10} {r['output'][:22]:<22} {r['kernel']:<15} {r['config']:>3}  {timed}"
        )
    return "\n".join(lines)
