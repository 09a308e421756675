"""kerasrt's custom operators (``kerasrt::cudnn_conv`` and its kin) in PyTorch's dispatcher.

Registered as plain ``torch.library.Library`` kernels rather than with
``torch.library.custom_op``: custom_op wraps every kernel in ``torch._disable_dynamo``, whose
first call imports torch._dynamo (with sympy, ~800 modules). A process that only loads an
artifact and runs it never needs dynamo, and that import was a second of its first inference
(several seconds where Python has no bytecode cache).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LIBRARY = torch.library.Library("kerasrt", "FRAGMENT")  # kept alive: it owns the registrations
NAMES: list[str] = []
"""The names of the ops defined so far (``torch.ops.kerasrt.<name>``)."""


def define(default: Callable, *, cuda: Callable, fake: Callable) -> None:
    """Define ``kerasrt::<default's name>``, its schema inferred from ``default``'s type hints
    (as custom_op does), with kernels: ``cuda`` for CUDA tensors, ``default`` (the op's math in
    PyTorch ops) for every other device, ``fake`` (the output's shape, dtype, layout) for
    tracing."""
    name = default.__name__
    _LIBRARY.define(name + torch.library.infer_schema(default, mutates_args=()))
    _LIBRARY.impl(name, default, "CompositeExplicitAutograd")
    _LIBRARY.impl(name, cuda, "CUDA")
    torch.library.register_fake(f"kerasrt::{name}", fake, lib=_LIBRARY)
    NAMES.append(name)
