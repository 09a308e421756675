"""Which config each of kerasrt's Triton kernels runs, by call signature.

The depthwise and pointwise ops look their config up here at run time; the tactics set it
after timing (``kerasrt.backend.tactics``). The ops' signatures never collide (a depthwise
key starts with "depthwise", a pointwise key is the cuDNN graph key of its convolution), so
one table serves both.
"""

from __future__ import annotations

_CHOSEN: dict[str, int] = {}


def choose(key: str, index: int) -> None:
    """Run config ``index`` (of the op's ``CONFIGS``) for calls with signature ``key``."""
    _CHOSEN[key] = index


def chosen(key: str) -> int:
    """The config index for signature ``key``: the tactics' choice, else the first config."""
    return _CHOSEN.get(key, 0)
