"""Kernel choices: what a node runs on and the timings that decided it, as the IR records them
(``attrs["kernel_choice"]``), and the per-machine cache of timings by node key.

A choice is derived from timings: per candidate kernel (a family of ``kerasrt.kernels`` or
"inductor", what the engine does by default), its best config and that config's device ms.
The cache keeps the timings, not the choice, so a build that considers one more candidate
(``conv_kernels="auto"`` after ``"cudnn"``) times only that one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kerasrt import cache
from kerasrt.ir.graph import Node, Value
from kerasrt.ir.ops import KERNEL
from kerasrt.kernels.registry import View

log = logging.getLogger(__name__)

INDUCTOR = "inductor"
"""The kernel name of "what Inductor compiles from the IR op" (no kerasrt kernel)."""
Timings = dict[str, tuple[int, float | None]]
"""kernel -> (best config, its device ms); ms None: no config of it ran (not timed again)."""


@dataclass(frozen=True)
class Choice:
    """A node's kernel (a family name or ``INDUCTOR``), its config, and every timing made."""

    kernel: str
    config: int = 0
    timings: Timings = field(default_factory=dict)

    @property
    def ms(self) -> float | None:
        timed = self.timings.get(self.kernel)
        return None if timed is None else timed[1]

    @classmethod
    def fastest(cls, timings: Timings, among: Iterable[str]) -> Choice:
        """The fastest of the kernels ``among`` that were timed (``INDUCTOR`` when none was)."""
        timed = {k: timings[k] for k in among if k in timings and timings[k][1] is not None}
        if not timed:
            return cls(INDUCTOR, 0, dict(timings))
        kernel = min(timed, key=lambda k: timed[k][1])
        return cls(kernel, timed[kernel][0], dict(timings))

    def attr(self) -> dict[str, Any]:
        """The JSON form nodes carry as ``attrs["kernel_choice"]``."""
        return {
            "kernel": self.kernel,
            "config": self.config,
            "timings": {k: [c, ms] for k, (c, ms) in sorted(self.timings.items())},
        }

    @classmethod
    def of(cls, node: Node) -> Choice | None:
        """The choice recorded on ``node``, or None."""
        data = node.attrs.get(KERNEL)
        if not data:
            return None
        timings = {k: (int(c), _ms(ms)) for k, (c, ms) in data.get("timings", {}).items()}
        return cls(str(data["kernel"]), int(data.get("config", 0)), timings)


def _ms(ms: Any) -> float | None:
    return None if ms is None else float(ms)


def node_key(node: Node, view: View) -> str:
    """What a kernel's speed on ``node`` depends on: its op, attributes (but its kernel), its
    inputs' shapes, dtypes and constness, and any zero pad inside the engine that a kernel
    may fold into it. Made from the IR alone, so a graph's choices can be matched to the
    cache without making a tensor."""

    def value(v: Value) -> list[Any]:
        described: list[Any] = [list(v.shape), v.dtype, v.is_constant]
        pad = v.producer
        if view.inside(pad) and pad.op == "pad":
            described.append({"pad": pad.attrs})
        return described

    attrs = {k: a for k, a in node.attrs.items() if k != KERNEL}
    return json.dumps([node.op, attrs, [value(v) for v in node.inputs]], sort_keys=True, default=str)


def environment_key(env: dict[str, str]) -> str:
    return hashlib.sha1(json.dumps(env, sort_keys=True).encode()).hexdigest()[:12]


class TimingCache:
    """Timings measured in ``environment`` by node key, read from and written to
    ``tactics-<environment hash>.json`` in kerasrt's cache folder: a second build on the same
    machine times nothing. One object per build; ``persist`` writes it back."""

    VERSION = 5
    """Bumped whenever keys or timings change meaning (older files are ignored)."""

    def __init__(self, environment: dict[str, str]):
        self.environment = dict(environment)
        self.name = f"tactics-{environment_key(self.environment)}.json"
        self.timings: dict[str, Timings] = {}
        stored = cache.read_json(self.name)
        if isinstance(stored, dict) and stored.get("environment") == self.environment:
            try:
                if stored.get("version") == self.VERSION:
                    self.timings = {
                        key: {k: (int(c), _ms(ms)) for k, (c, ms) in timed.items()}
                        for key, timed in stored["timings"].items()
                    }
            except (TypeError, ValueError, KeyError, AttributeError) as exc:
                log.warning("ignoring a tactics cache of another format (%s)", exc)
        self.changed = False

    def get(self, key: str) -> Timings:
        return self.timings.get(key, {})

    def add(self, key: str, kernel: str, config: int, ms: float | None) -> None:
        """Record ``kernel``'s best config and time on ``key`` (ms None: none of it ran)."""
        self.timings.setdefault(key, {})[kernel] = (config, None if ms is None else round(ms, 5))
        self.changed = True

    def persist(self) -> None:
        if self.changed:
            document = {
                "version": self.VERSION,
                "environment": self.environment,
                "timings": {k: {n: list(t) for n, t in v.items()} for k, v in self.timings.items()},
            }
            cache.write_json(self.name, document)
            self.changed = False
