"""kerasrt's custom operators (``kerasrt::cudnn_conv`` and its kin) in PyTorch's dispatcher.

Each kernel family defines its op with ``define_kernel``: a typed signature (the schema),
the empty output, the reference math (the op's kernel on every device but CUDA, and its
definition), and the CUDA launch of one config. The config is the op's last argument, an
index into the family's configs: the engine passes the one the tactics chose, recorded on the
IR node, so no table is consulted at call time.

Registered as plain ``torch.library.Library`` kernels rather than with
``torch.library.custom_op``: custom_op wraps every kernel in ``torch._disable_dynamo``, whose
first call imports torch._dynamo (with sympy, ~800 modules). A process that only loads an
artifact and runs it never needs dynamo, and that import was a second of its first inference
(several seconds where Python has no bytecode cache).

An op whose CUDA kernel is a Triton program can also be *inlined* into an AOTInductor package:
within ``inlining_kernels()``, tracing it on CUDA decomposes it (a rule for
``FunctionalTensorMode``, as ``torch.library.triton_op`` registers) into its PyTorch ops and
its kernel launches, traced through ``torch.library.wrap_triton``. Inductor then compiles
the kernels into the package, which calls them directly: a process that loads it compiles
nothing (called as an opaque op, each kernel was compiled by Triton on its first call in
every new process: seconds on a machine that never built the model). Inductor's just-in-time
engines keep the ops opaque: the tactics compiled those kernels in the building process
already, and compiling them again inside the engine would add to every build.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

_LIBRARY = torch.library.Library("kerasrt", "FRAGMENT")  # kept alive: it owns the registrations

_STATE = threading.local()
# .inlining: export wants kernels inlined; .tracing: inside a decomposition; .precompiling:
# launches compile their kernel without running it


def define(
    name: str,
    schema: str,
    *,
    default: Callable,
    cuda: Callable,
    fake: Callable,
    inlinable: bool = False,
) -> Any:
    """Define ``kerasrt::<name>`` with ``schema`` (TorchScript's schema language, e.g. ``"(Tensor
    x, int config) -> Tensor"``; ``Tensor(a!) x`` marks an argument the op writes into, whose
    memory graphs compiled by Inductor then reuse) and kernels: ``cuda`` for CUDA tensors,
    ``default`` (the op's math in PyTorch ops) for every other device, ``fake`` (the output's
    shape, dtype, layout) for tracing. ``inlinable``: ``cuda`` is made of PyTorch ops and
    ``launchable`` Triton kernels, and is traced in the op's place within
    ``inlining_kernels()``. Returns the op's overload."""
    _LIBRARY.define(name + schema)
    _register(name, default, cuda, fake, inlinable)
    return getattr(torch.ops.kerasrt, name).default


def define_kernel(
    name: str,
    schema: str,
    output: Callable[..., torch.Tensor],
    reference: Callable[..., torch.Tensor],
    launch: Callable[..., None],
    runs: Callable[..., bool],
    inlinable: bool = True,
) -> Any:
    """Define ``kerasrt::<name>`` (``define``) whose last argument is ``int config``, and
    return its overload. ``output(*args)``: the empty output (channels-last);
    ``reference(*args)``: the math in PyTorch ops; ``launch(config, out, *args)``: the CUDA
    kernel writing ``out``; ``runs(*args)``: whether it takes these operands (else CUDA
    computes the reference too). ``args`` are the op's arguments without the config."""

    def default(*args: Any) -> torch.Tensor:
        out = output(*args[:-1])
        out.copy_(reference(*args[:-1]))
        return out

    def fake(*args: Any) -> torch.Tensor:
        return output(*args[:-1])

    def cuda(*args: Any) -> torch.Tensor:
        *operands, config = args
        if not runs(*operands):
            return default(*args)
        out = output(*operands)
        launch(config, out, *operands)
        return out

    return define(name, schema, default=default, cuda=cuda, fake=fake, inlinable=inlinable)


def _register(name: str, default: Callable, cuda: Callable, fake: Callable, inlinable: bool) -> None:
    _LIBRARY.impl(name, default, "CompositeExplicitAutograd")
    _LIBRARY.impl(name, cuda, "CUDA")
    torch.library.register_fake(f"kerasrt::{name}", fake, lib=_LIBRARY)
    if inlinable:
        torch.library.register_torch_dispatch(
            f"kerasrt::{name}", FunctionalTensorMode, _decomposition(cuda), lib=_LIBRARY
        )


def _decomposition(cuda: Callable) -> Callable:
    """The ``FunctionalTensorMode`` rule of an inlinable op: within ``inlining_kernels()`` and
    on CUDA, trace ``cuda`` itself (its Triton launches become ``wrap_triton`` calls);
    otherwise keep the op whole."""

    def rule(mode: Any, op: Any, types: Any, args: tuple, kwargs: dict) -> Any:
        on_device = any(isinstance(a, torch.Tensor) and kernels_device(a.device) for a in args)
        if not (on_device and getattr(_STATE, "inlining", False)):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode, _switch("tracing"):
            return cuda(*args, **kwargs)

    return rule


def kernels_device(device: torch.device) -> bool:
    """Whether an op on ``device`` runs kerasrt's own (Triton) kernels, which inlining traces."""
    return device.type == "cuda"


@contextlib.contextmanager
def _switch(name: str) -> Iterator[None]:
    previous = getattr(_STATE, name, False)
    setattr(_STATE, name, True)
    try:
        yield
    finally:
        setattr(_STATE, name, previous)


def inlining_kernels() -> contextlib.AbstractContextManager[None]:
    """Within: tracing an inlinable op on CUDA traces its kernels in its place."""
    return _switch("inlining")


def tracing() -> bool:
    """Whether an op's CUDA kernel is being traced into a graph, not run on real tensors."""
    return getattr(_STATE, "tracing", False)


def precompiling() -> contextlib.AbstractContextManager[None]:
    """Within (in this thread): a ``launchable`` kernel launch is Triton's warm-up for its
    arguments, and runs nothing. ``tactics.precompile`` launches the candidates so, for
    ``compile_pool.collect`` to record what each would compile (or, with an older Triton, to
    compile them in threads)."""
    return _switch("precompiling")


class _Precompile:
    """``kernel[grid](*args, **kwargs)`` that runs nothing (Triton's ``warmup``)."""

    def __init__(self, kernel: Any):
        self.kernel = kernel

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        return lambda *args, **kwargs: self.kernel.warmup(*args, grid=grid, **kwargs)


def launchable(kernel: Any) -> Any:
    """``kernel`` (a Triton JIT function) as an op's CUDA kernel launches it: itself on real
    tensors, ``torch.library.wrap_triton(kernel)`` when traced, so Inductor sees the launch;
    within ``precompiling()``, a launch that compiles only."""
    if tracing():
        return torch.library.wrap_triton(kernel)
    return _Precompile(kernel) if getattr(_STATE, "precompiling", False) else kernel


def dot_block(n: int) -> int:
    """A Triton tile side covering ``n``: the least power of two >= ``n``, at least 16 (the
    least side of a ``tl.dot`` operand)."""
    return max(16, 1 << (n - 1).bit_length())


@functools.cache
def triton_kernels() -> ModuleType | None:
    """The module of kerasrt's Triton kernels, or None when Triton is not installed."""
    try:
        from kerasrt.kernels import triton_kernels as kernels
    except ImportError:
        return None
    return kernels
