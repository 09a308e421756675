"""Find where kerasrt and Keras first disagree on a model.

Two stages, like a compiler's miscompile bisection:
1. import: the unoptimized IR is evaluated value by value and each Keras layer's output is
   compared with Keras's own; the first layer (in execution order) over tolerance is named.
2. optimize: if the unoptimized graph matches, the optimizer is re-run with a budget of k
   rewrites; bisection finds the first rewrite (rule and layer) that changes the outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kerasrt.frontend import keras_adapter as ka
from kerasrt.frontend.importer import InputSpec, import_model
from kerasrt.ir.graph import Graph, Value, torch_dtype
from kerasrt.ir.ops import OPS
from kerasrt.passes import Budget, optimize
from kerasrt.runtime.program import KerasSource, fallback_runner
from kerasrt.settings import ConversionSettings


@dataclass(frozen=True)
class Divergence:
    """The first place the two disagree: which stage, which layer, and by how much."""

    stage: str  # "import" or "optimize"
    layer: str
    max_abs: float
    scale: float
    detail: str = ""

    def __str__(self) -> str:
        where = f"layer {self.layer!r}" if self.stage == "import" else f"rewrite {self.detail}"
        return (
            f"{self.stage}: {where} is the first to diverge from Keras "
            f"(max abs err {self.max_abs:.3g}, output scale {self.scale:.3g})"
        )


def evaluate(graph: Graph, inputs: Sequence[torch.Tensor], keras: KerasSource) -> dict[int, torch.Tensor]:
    """Every value of ``graph`` on ``inputs`` (reference implementations, CPU), by id."""
    env: dict[int, torch.Tensor] = {id(v): t.to(torch_dtype(v.dtype)) for v, t in zip(graph.inputs, inputs)}
    for value in graph.constants.values():
        env[id(value)] = value.data
    with torch.inference_mode():
        for node in graph.nodes:
            args = [env[id(v)] for v in node.inputs]
            if OPS[node.op].category == "fallback":
                outs = fallback_runner(node, keras, torch.device("cpu"))(*args)
            else:
                outs = [OPS[node.op].impl(*args, **node.attrs)]
            for value, out in zip(node.outputs, outs):
                env[id(value)] = out
    return env


def _error(got: torch.Tensor, ref: np.ndarray) -> tuple[float, float]:
    got64, ref64 = got.detach().cpu().double().numpy(), ref.astype(np.float64)
    if got64.shape != ref64.shape:
        return float("inf"), 0.0
    return float(np.max(np.abs(got64 - ref64), initial=0.0)), float(np.max(np.abs(ref64), initial=0.0))


def _over(err: float, scale: float, rtol: float, atol: float) -> bool:
    return not err <= atol + rtol * scale


def _layer_outputs(graph: Graph) -> dict[str, Value]:
    """The value each top-level layer hands on: the output of its last node."""
    last: dict[str, Value] = {}
    for node in graph.nodes:
        if len(node.outputs) == 1 and "/" not in node.layer:
            last[node.layer] = node.outputs[0]
    return last


def find_divergence(
    model: Any,
    inputs: Sequence[np.ndarray],
    settings: ConversionSettings | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> Divergence | None:
    """The first layer or rewrite where kerasrt leaves Keras's results; None if they agree."""
    settings = settings or ConversionSettings()
    keras_model = ka.load_model(model)
    source = KerasSource(model=keras_model)
    specs = [InputSpec(f"input_{i}", tuple(x.shape), str(x.dtype)) for i, x in enumerate(inputs)]
    tensors = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
    graph = import_model(keras_model, specs, settings.keep_in_keras)

    # stage 1: the imported graph, layer by layer, against Keras
    env = evaluate(graph, tensors, source)
    keras = ka.keras_module()
    layer_values = _layer_outputs(graph)
    names = [n for n in layer_values if _has_single_output(keras_model, n)]
    if names and ka.is_graph_model(keras_model):
        probe = keras.Model(keras_model.inputs, [keras_model.get_layer(n).output for n in names])
        refs = probe(inputs[0] if len(inputs) == 1 else list(inputs), training=False)
        for name, ref in zip(names, refs if isinstance(refs, (list, tuple)) else [refs]):
            err, scale = _error(env[id(layer_values[name])], np.asarray(keras.ops.convert_to_numpy(ref)))
            if _over(err, scale, rtol, atol):
                return Divergence("import", name, err, scale)
    expected = [
        np.asarray(keras.ops.convert_to_numpy(o))
        for o in ka.flatten(keras_model(inputs[0] if len(inputs) == 1 else list(inputs), training=False))
    ]
    for value, ref in zip(graph.outputs, expected):
        err, scale = _error(env[id(value)], ref)
        if _over(err, scale, rtol, atol):
            return Divergence("import", value.producer.layer if value.producer else "?", err, scale)

    # stage 2: bisect the optimizer's rewrites
    def diverges(k: int) -> tuple[bool, Budget, float, float]:
        g = import_model(keras_model, specs, settings.keep_in_keras)
        budget = Budget(k)
        optimize(g, settings.optimization_level, budget=budget)
        values = evaluate(g, tensors, source)
        worst = (0.0, 0.0)
        for value, ref in zip(g.outputs, expected):
            err, scale = _error(values[id(value)], ref)
            if _over(err, scale, rtol, atol):
                return True, budget, err, scale
            worst = max(worst, (err, scale))
        return False, budget, *worst

    total = Budget(10**9)
    optimize(
        import_model(keras_model, specs, settings.keep_in_keras), settings.optimization_level, budget=total
    )
    hi = 10**9 - total.remaining
    bad, budget, err, scale = diverges(hi)
    if not bad:
        return None
    lo = 0  # diverges(0) is False: stage 1 passed
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if diverges(mid)[0]:
            hi = mid
        else:
            lo = mid
    _, budget, err, scale = diverges(hi)
    rule_name, layer = budget.last or ("?", "?")
    return Divergence("optimize", layer, err, scale, detail=f"#{hi} ({rule_name} on layer {layer!r})")


def _has_single_output(model: Any, name: str) -> bool:
    try:
        layer = model.get_layer(name)
        return not isinstance(layer.output, (list, tuple, dict))
    except (ValueError, AttributeError):
        return False


__all__ = ["Divergence", "evaluate", "find_divergence"]
