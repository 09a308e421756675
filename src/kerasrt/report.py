"""The conversion report: what runs in engines, what runs natively or in Keras, and why."""

from __future__ import annotations

from collections import Counter
from typing import Any

from kerasrt.runtime import OptimizedModel


def make_report(model: OptimizedModel) -> dict[str, Any]:
    """A JSON-safe report of the model's most recently used engine set."""
    key = model.engine_shapes[-1]
    program = model.program(key)
    nodes = program.graph.nodes
    segments = []
    for seg in program.segments:
        entry: dict[str, Any] = {
            "index": seg.index,
            "kind": seg.kind,
            "ops": dict(Counter(n.op for n in seg.nodes).most_common()),
            "layers": sorted({n.layer for n in seg.nodes}),
            "inputs": [{"name": v.name, "type": v.type_str()} for v in seg.inputs],
            "outputs": [{"name": v.name, "type": v.type_str()} for v in seg.outputs],
        }
        if seg.reason:
            entry["reason"] = seg.reason
        segments.append(entry)
    in_engines = sum(len(s.nodes) for s in program.segments if s.kind == "engine")
    fallbacks = [
        {"layer": n.attrs["layer"] or model.name, "reason": n.attrs["reason"]}
        for s in program.segments
        if s.kind == "fallback"
        for n in s.nodes
    ]
    return {
        "model": model.name,
        "precision": model.settings.precision_mode,
        "device": str(model.device),
        "input_shapes": [list(s) for s in key],
        "engine_shapes": [[list(s) for s in k] for k in model.engine_shapes],
        "settings": model.settings.to_json(),
        "nodes": len(nodes),
        "nodes_in_engines": in_engines,
        "ops": dict(Counter(n.op for n in nodes).most_common()),
        "layers": len({n.layer for n in nodes}),
        "segments": segments,
        "fallbacks": fallbacks,
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
        "ops: " + ", ".join(f"{op} x{n}" for op, n in report["ops"].items()),
        "",
    ]
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
    if report["fallbacks"]:
        lines.append("")
        lines.append("Layers that run in Keras:")
        lines.extend(f"  {f['layer']}: {f['reason']}" for f in report["fallbacks"])
    return "\n".join(lines)
