"""Graph <-> JSON plus a dict of tensors (for the artifact and the import subprocess)."""

from __future__ import annotations

from typing import Any

import torch

from kerasrt.errors import ArtifactError
from kerasrt.ir.graph import Graph, Node, Value


def _type(value: Value) -> dict[str, Any]:
    return {"name": value.name, "shape": list(value.shape), "dtype": value.dtype}


def graph_to_json(graph: Graph) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A JSON-safe description of ``graph`` and its constant tensors, keyed by name."""
    data = {
        "inputs": [_type(v) for v in graph.inputs],
        "outputs": [v.name for v in graph.outputs],
        "meta": graph.meta,
        "constants": [_type(v) for v in graph.constants.values()],
        "nodes": [
            {
                "op": n.op,
                "inputs": [v.name for v in n.inputs],
                "outputs": [_type(v) for v in n.outputs],
                "attrs": n.attrs,
                "layer": n.layer,
            }
            for n in graph.nodes
        ],
    }
    return data, {v.name: v.data for v in graph.constants.values()}


def graph_from_json(data: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Graph:
    """Inverse of ``graph_to_json``; raises ArtifactError on anything inconsistent."""
    graph = Graph()
    values: dict[str, Value] = {}

    def define(value: Value) -> Value:
        if value.name in values:
            raise ArtifactError(f"value {value.name!r} is defined twice in the stored graph")
        graph._names.add(value.name)
        values[value.name] = value
        return value

    try:
        for spec in data["inputs"]:
            graph.inputs.append(define(Value(spec["name"], spec["shape"], spec["dtype"])))
        for spec in data["constants"]:
            tensor = tensors.get(spec["name"])
            if tensor is None:
                raise ArtifactError(f"weight {spec['name']!r} is missing from the weights file")
            value = define(Value(spec["name"], spec["shape"], spec["dtype"], data=tensor))
            graph.constants[value.name] = value
        for spec in data["nodes"]:
            inputs = [values[name] for name in spec["inputs"]]
            node = Node(spec["op"], inputs, [], dict(spec["attrs"]), spec.get("layer", ""))
            for out in spec["outputs"]:
                value = define(Value(out["name"], out["shape"], out["dtype"]))
                value.producer = node
                node.outputs.append(value)
            for value in inputs:
                value.users.append(node)
            graph.nodes.append(node)
        graph.outputs = [values[name] for name in data["outputs"]]
        graph.meta = dict(data.get("meta", {}))
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"the stored graph is malformed ({type(exc).__name__}: {exc})") from None
    return graph
