"""The kernel registry: every kernel family kerasrt can run an IR node on, in one list.

A family is one module of ``kerasrt.kernels`` that defines ``FAMILY``, a ``KernelFamily``:
which IR ops it implements, when a node is eligible, its configs, the op it launches (a
``kerasrt::`` custom op whose last argument is the config index) and the one layout of that
op's arguments (``arguments``), which the tactics use to time it on example tensors and the
engine to emit it on graph values. The registry finds the families by scanning the package,
so a new family is one new module (and its tests): nothing else lists them.

What Inductor would do with a node is not a family here: it is the engine's default, which
the tactics time against the families (``kerasrt.tuning.tactics``).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from kerasrt.ir.graph import Node, Value


class Operands(Protocol):
    """How ``KernelFamily.arguments`` reads IR values: as example tensors on a device (timing),
    as meta tensors (a call's key), or as values of the fx program being built (the engine)."""

    def __call__(self, value: Value) -> Any:
        """The tensor of ``value`` (an activation or a constant)."""

    def constant(self, prepare: Callable[[torch.Tensor], torch.Tensor], *values: Value) -> Any:
        """``prepare(*the constants' data)``, made once when the engine is built (e.g. a weight
        laid out as the kernel reads it). ``prepare`` is a module-level function: its name
        names the buffer."""

    def apply(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on operands: a PyTorch op the engine runs before the kernel."""


@dataclass(frozen=True)
class View:
    """The engine segment a node is chosen and emitted in: its nodes (in order) and the values
    read outside it. Kernels that fold a neighbour or write over a tensor ask it."""

    nodes: Sequence[Node]
    outputs: Sequence[Value]

    @functools.cached_property
    def _ids(self) -> frozenset[int]:
        return frozenset(id(n) for n in self.nodes)

    @functools.cached_property
    def _escaping(self) -> frozenset[int]:
        return frozenset(id(v) for v in self.outputs)

    def inside(self, node: Node | None) -> bool:
        return node is not None and id(node) in self._ids

    def private(self, value: Value, reader: Node) -> bool:
        """Whether ``value`` is made in this engine and read by ``reader`` alone."""
        return self.inside(value.producer) and value.users == [reader] and id(value) not in self._escaping


def _every_config(config: tuple, args: tuple) -> bool:
    return True


def _one_result(result: Any, args: tuple) -> list[Any]:
    return [result]


@dataclass(frozen=True)
class KernelFamily:
    """One kernel family.

    - ``name``: the family's name, as IR nodes record their choice (``attrs["kernel_choice"]``).
    - ``ops``: the IR ops it implements; ``eligible(node, view)``: whether it runs this node.
    - ``op``: the ``kerasrt::`` op overload, called as ``op(*arguments(node, operands, view),
      config)``; ``results(op_result, args)``: the node's outputs among what the call gives.
    - ``configs``: the configs the tactics time (the op takes an index); ``timed(config,
      args)``: whether one is worth timing on these arguments.
    - ``available(device)``: whether it can run there at all (a CUDA device, Triton, cuDNN).
    - ``tune``: replaces timing each config by an op call, as ``tune(args, prebuilt, time_ms)``
      -> (config, ms) or None (cuDNN lists and builds its plans itself; ``time_ms(fn)`` is
      the tactics' timer);
      ``compile_requests(args, device)``: compile-worker requests whose results reach
      ``tune`` as ``prebuilt``; ``triton``: its configs compile Triton kernels, which the
      tactics compile in worker processes before timing.
    - ``precisions``: the engine precisions (``precision_mode``) whose graphs hold the nodes
      it runs: FP16/BF16 activations, or INT8/FP8 quantized operands.
    """

    name: str
    ops: tuple[str, ...]
    op: Any
    eligible: Callable[[Node, View], bool]
    arguments: Callable[[Node, Operands, View], tuple]
    available: Callable[[torch.device], bool]
    configs: tuple[tuple, ...] = ((),)
    timed: Callable[[tuple, tuple], bool] = _every_config
    results: Callable[[Any, tuple], list[Any]] = _one_result
    tune: Callable[[tuple, dict[int, Any], Callable[[Callable[[], Any]], float]], Any] | None = None
    compile_requests: Callable[[tuple, torch.device], list[Any]] | None = None
    triton: bool = True
    precisions: tuple[str, ...] = ("FP16", "BF16")

    def call(self, args: tuple, config: int) -> Any:
        return self.op(*args, config)


SHARED_MODULES = frozenset({"registry", "op_library", "conv_spec", "triton_kernels"})
"""Modules of ``kerasrt.kernels`` that serve the families and define none (``triton_kernels``
imports Triton, which a machine without a GPU may lack)."""


@functools.cache
def families() -> tuple[KernelFamily, ...]:
    """Every family of the ``kerasrt.kernels`` package, by module name."""
    import kerasrt.kernels as package

    found = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in SHARED_MODULES:
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        family = getattr(module, "FAMILY", None)
        if isinstance(family, KernelFamily):
            found.append(family)
    names = [f.name for f in found]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two kernel families share a name: {names}")
    return tuple(found)


def family(name: str) -> KernelFamily:
    """The family called ``name``; a clear error for a name no family has (e.g. a graph
    saved by another kerasrt)."""
    for candidate in families():
        if candidate.name == name:
            return candidate
    raise KeyError(f"no kernel family {name!r}; kerasrt has {[f.name for f in families()]}")


def for_node(node: Node, view: View, device: torch.device) -> list[KernelFamily]:
    """The families that can run ``node`` in ``view`` on ``device``."""
    return [f for f in families() if node.op in f.ops and f.available(device) and f.eligible(node, view)]


def ops() -> list[Any]:
    """Every family's op overload (Inductor registers them as fallback kernels)."""
    return [f.op for f in families()]
