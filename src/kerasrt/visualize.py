"""Pictures of a graph: Graphviz DOT text, and a self-contained HTML page with SVG drawings
(no Graphviz needed) of the graph before and after optimization, coloured by segment."""

from __future__ import annotations

import html
from collections.abc import Sequence

from kerasrt.compile.partition import Segment
from kerasrt.ir.graph import Graph, Node

_PALETTE = ["#cfe8ff", "#d7f5d0", "#fff2c2", "#f3d9ff", "#ffe0cc", "#d0f0f0"]
_FALLBACK, _NATIVE = "#ffb3b3", "#e0e0e0"


def _colours(segments: Sequence[Segment] | None) -> dict[int, str]:
    colours: dict[int, str] = {}
    engines = 0
    for seg in segments or []:
        if seg.kind == "engine":
            colour = _PALETTE[engines % len(_PALETTE)]
            engines += 1
        else:
            colour = _FALLBACK if seg.kind == "fallback" else _NATIVE
        for node in seg.nodes:
            colours[id(node)] = colour
    return colours


def _label(node: Node) -> str:
    extra = node.attrs.get("activation") if node.op in ("conv_fused", "linear") else None
    return node.op + (f"+{extra}" if extra else "")


def to_dot(graph: Graph, segments: Sequence[Segment] | None = None, title: str = "graph") -> str:
    """Graphviz DOT text of ``graph`` (render with ``dot -Tsvg``)."""
    colours = _colours(segments)
    lines = [f'digraph "{title}" {{', "  rankdir=TB; node [shape=box, style=filled, fontname=Helvetica];"]
    ids = {id(v): f"in{i}" for i, v in enumerate(graph.inputs)}
    for i, value in enumerate(graph.inputs):
        lines.append(f'  in{i} [label="{value.name}\\n{value.type_str()}", shape=ellipse, fillcolor=white];')
    for i, node in enumerate(graph.nodes):
        name = f"n{i}"
        for out in node.outputs:
            ids[id(out)] = name
        label = f"{_label(node)}\\n{node.outputs[0].type_str()}\\n{node.layer}"
        lines.append(f'  {name} [label="{label}", fillcolor="{colours.get(id(node), "white")}"];')
        for value in node.inputs:
            if id(value) in ids:
                lines.append(f"  {ids[id(value)]} -> {name};")
    lines.append("}")
    return "\n".join(lines)


def to_svg(graph: Graph, segments: Sequence[Segment] | None = None) -> str:
    """An SVG drawing: nodes layered by longest path from the inputs, edges as lines."""
    colours = _colours(segments)
    depth: dict[int, int] = {id(v): 0 for v in graph.inputs}
    rows: dict[int, list[tuple[str, str, str, int]]] = {0: []}
    pos: dict[int, tuple[float, float]] = {}
    box_w, box_h, gap_x, gap_y = 170, 34, 20, 26

    tips: dict[int, str] = {}

    def place(key: int, row: int, label: str, sub: str, colour: str) -> None:
        rows.setdefault(row, []).append((label, sub, colour, key))

    for value in graph.inputs:
        place(id(value), 0, value.name, value.type_str(), "#ffffff")
        tips[id(value)] = f"input {value.name}"
    for node in graph.nodes:
        d = 1 + max((depth.get(id(v), 0) for v in node.inputs if not v.is_constant), default=0)
        for out in node.outputs:
            depth[id(out)] = d
        place(id(node), d, _label(node), node.outputs[0].type_str(), colours.get(id(node), "#ffffff"))
        attrs = ", ".join(f"{k}={v}" for k, v in node.attrs.items() if k != "call")
        tips[id(node)] = f"{node.layer}: {node.op}({attrs})"
    width = max(len(r) for r in rows.values()) * (box_w + gap_x) + gap_x
    height = (max(rows) + 1) * (box_h + gap_y) + gap_y
    boxes: list[str] = []
    for row, items in rows.items():
        offset = (width - len(items) * (box_w + gap_x)) / 2
        for col, (label, sub, colour, key) in enumerate(items):
            x, y = offset + col * (box_w + gap_x) + gap_x / 2, gap_y + row * (box_h + gap_y)
            pos[key] = (x + box_w / 2, y)
            boxes.append(
                f"<g><title>{html.escape(tips.get(key, ''))}</title>"
                f'<rect x="{x:.0f}" y="{y}" width="{box_w}" height="{box_h}" rx="5" fill="{colour}" '
                f'stroke="#555"/><text x="{x + box_w / 2:.0f}" y="{y + 14}" text-anchor="middle" '
                f'font-size="12">{html.escape(label)}</text><text x="{x + box_w / 2:.0f}" y="{y + 28}" '
                f'text-anchor="middle" font-size="10" fill="#444">{html.escape(sub)}</text></g>'
            )
    producer = {id(v): id(v) for v in graph.inputs}
    for node in graph.nodes:
        for out in node.outputs:
            producer[id(out)] = id(node)
    edges = []
    for node in graph.nodes:
        x2, y2 = pos[id(node)]
        for value in node.inputs:
            src = producer.get(id(value))
            if src is None:
                continue
            x1, y1 = pos[src]
            edges.append(f'<line x1="{x1:.0f}" y1="{y1 + box_h}" x2="{x2:.0f}" y2="{y2}" stroke="#999"/>')
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
        f'font-family="Helvetica, Arial, sans-serif">{"".join(edges)}{"".join(boxes)}</svg>'
    )


def to_html(title: str, pictures: Sequence[tuple[str, str]], summary: str) -> str:
    """A static page: the text report, then each (caption, svg) side by side."""
    cells = "".join(
        f'<div class="col"><h2>{html.escape(caption)}</h2>{svg}</div>' for caption, svg in pictures
    )
    legend = (
        f'<span style="background:{_PALETTE[0]}">engine</span> '
        f'<span style="background:{_NATIVE}">native (below minimum_segment_size)</span> '
        f'<span style="background:{_FALLBACK}">Keras fallback</span>'
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:Helvetica,Arial,sans-serif} .row{display:flex;gap:24px;align-items:flex-start}"
        " .col{overflow:auto} pre{background:#f6f6f6;padding:8px} span{padding:2px 6px;border:1px solid #888}"
        f"</style></head><body><h1>{html.escape(title)}</h1><p>{legend}</p>"
        f"<pre>{html.escape(summary)}</pre><div class='row'>{cells}</div></body></html>"
    )
