"""Merged convolutions: two neighbouring convolutions of an engine run as one kernel, where a
measurement says that is faster than each on its own best kernel.

Two shapes of neighbours, both from ResNet-style networks, both memory-bound at large
batches because one tensor travels between them through memory:

- "dual": a 1x1 convolution whose residual is another 1x1 convolution's output and nothing
  else's (a projection shortcut and a bottleneck's expansion, added). ``kerasrt::dual_conv``
  computes both products into one accumulator; the residual is never written.
- "pair": a 1x1 convolution whose output feeds another 1x1 convolution (a bottleneck's
  expansion and the next block's reduction). ``kerasrt::pointwise_pair`` still stores the
  first output (other layers read it) but never reads it back.

``choose`` finds the candidates among an engine's nodes (``candidates``), times each merged
kernel's configs against the sum of the two convolutions' chosen kernels (``tactics.choose``
timed those) and keeps the merges that win. Choices are cached with the other tactics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from kerasrt.backend import cudnn_conv, dual_conv, pointwise_conv, pointwise_pair, tactics
from kerasrt.ir.graph import Node, Value

log = logging.getLogger(__name__)

T = TypeVar("T")
ABSORBED = "merged"
"""The kernel of a convolution another's merged kernel runs (it emits no op of its own)."""


@dataclass(frozen=True)
class Merge:
    """``lead`` runs a merged kernel (``kind`` "dual" or "pair") that also computes ``absorbed``."""

    kind: str
    lead: Node
    absorbed: Node

    @property
    def kernel(self) -> str:
        """The lead's kernel as engines name it: "<kind>:<absorbed output's name>"."""
        return f"{self.kind}:{self.absorbed.outputs[0].name}"


def parse(kernel: str) -> tuple[str, str] | None:
    """(kind, absorbed output's name) of a merged kernel's name, or None for another kernel."""
    kind, _, name = kernel.partition(":")
    return (kind, name) if name and kind in ("dual", "pair") else None


def is_merge_signature(sig: str) -> bool:
    """Whether a tactics signature is a merged kernel's (its choice is kept, or not)."""
    return sig.startswith(("dual[", "pair["))


def _plain_1x1(node: Node) -> bool:
    """A 1x1, unpadded, ungrouped, undilated convolution kerasrt's kernels fuse."""
    if not cudnn_conv.fusable(node) or tuple(node.inputs[1].shape[2:]) != (1, 1):
        return False
    a = node.attrs
    return a.get("groups", 1) == 1 and list(a["padding"]) == [0, 0] and list(a["dilation"]) == [1, 1]


def _residual(node: Node) -> Value | None:
    has_bias, has_residual = cudnn_conv.epilogue_inputs(node)
    return node.inputs[2 + int(has_bias)] if has_residual else None


def _epilogue_free(node: Node) -> bool:
    return _residual(node) is None and (node.attrs.get("activation") or "none") == "none"


def candidates(nodes: Sequence[Node], outputs: Sequence[Value]) -> list[Merge]:
    """The merges the nodes of one engine (in order, ``outputs`` read outside it) allow. Each
    node is in one merge at most; duals come first (they save more)."""
    users: dict[int, list[Node]] = {}
    for node in nodes:
        for value in node.inputs:
            users.setdefault(id(value), []).append(node)
    inside = {id(n) for n in nodes}
    escaping = {id(v) for v in outputs}
    taken: set[int] = set()
    found: list[Merge] = []
    for lead in nodes:
        residual = _residual(lead) if _plain_1x1(lead) else None
        other = residual.producer if residual is not None else None
        if other is None or id(other) not in inside or not _plain_1x1(other) or not _epilogue_free(other):
            continue
        if users.get(id(residual)) != [lead] or id(residual) in escaping:
            continue
        strides = (list(lead.attrs["stride"]), list(other.attrs["stride"]))
        channels = (lead.inputs[0].shape[1], other.inputs[0].shape[1])
        if [1, 1] in strides and all(c % dual_conv.CHANNEL_MULTIPLE == 0 for c in channels):
            found.append(Merge("dual", lead, other))
            taken |= {id(lead), id(other)}
    for lead in nodes:
        if id(lead) in taken or not pointwise_conv.eligible(lead):
            continue
        for user in users.get(id(lead.outputs[0]), []):
            if id(user) in taken or not pointwise_conv.eligible(user) or _residual(user) is not None:
                continue
            inner = max(lead.inputs[0].shape[1], user.outputs[0].shape[1])
            unpadded = cudnn_conv.input_channels(lead.inputs[0].shape[1]) == lead.inputs[0].shape[1]
            if user.inputs[0] is lead.outputs[0] and inner <= pointwise_pair.MERGE_MAX_CHANNELS and unpadded:
                found.append(Merge("pair", lead, user))
                taken |= {id(lead), id(user)}
                break
    return found


def dual_order(lead: Node, absorbed: Node, a: T, b: T) -> tuple[T, T, list[int]]:
    """(the stride-1 convolution's ``a`` or ``b``, the other's, the other's stride): a dual
    merge's stride-1 convolution is ``dual_conv``'s first product, the other its second."""
    lead_stride = list(lead.attrs["stride"])
    if lead_stride == [1, 1]:
        return a, b, list(absorbed.attrs["stride"])
    return b, a, lead_stride


def dual_bias(lead: Node, absorbed: Node) -> torch.Tensor | None:
    """The summed bias of a dual merge's two convolutions (added in float32), or None."""
    biases = [n.inputs[2].data for n in (lead, absorbed) if cudnn_conv.epilogue_inputs(n)[0]]
    if not biases:
        return None
    return sum((b.float() for b in biases[1:]), biases[0].float()).to(biases[0].dtype)


def _call(merge: Merge, device: torch.device) -> tuple[str, tuple, Callable[[tuple, tuple], None]]:
    """(signature, arguments, launch(config, arguments)) of the merged kernel of ``merge`` on
    example operands on ``device`` (the meta device for the signature alone)."""
    a = tactics.example_operands(merge.lead, device)
    b = tactics.example_operands(merge.absorbed, device)
    if merge.kind == "dual":
        first, second, stride = dual_order(merge.lead, merge.absorbed, a, b)
        bias = dual_bias(merge.lead, merge.absorbed)
        *_, act, clip = cudnn_conv.op_arguments(merge.lead)
        bias = bias.to(device) if bias is not None else None
        args = (first.x, first.w, second.x, second.w, bias, a.out, stride, act, clip)
        return dual_conv.signature(*args), (dual_conv.CONFIGS, args), dual_conv.launch
    *_, act1, clip1 = cudnn_conv.op_arguments(merge.lead)
    *_, act2, clip2 = cudnn_conv.op_arguments(merge.absorbed)
    args = (a.x, a.w, a.bias, a.residual, b.w, b.bias, a.out, b.out, act1, clip1, act2, clip2)
    return pointwise_pair.signature(*args), (pointwise_pair.CONFIGS, args), pointwise_pair.launch


def choose(
    nodes: Sequence[Node],
    outputs: Sequence[Value],
    chosen: Mapping[int, tuple[str, tactics.Choice]],
    device: torch.device,
) -> dict[int, tuple[str, tactics.Choice, Merge]]:
    """The merges among ``nodes`` that beat their two convolutions' ``chosen`` kernels, by
    the lead's ``id``: (signature, choice, merge). Needs the Triton kernels on ``device``."""
    if not (dual_conv.available(device) and pointwise_pair.available(device)):
        return {}
    env = tactics.environment(device)
    table = tactics.choice_table(env)
    merged: dict[int, tuple[str, tactics.Choice, Merge]] = {}
    measured = 0
    for merge in candidates(nodes, outputs):
        parts = [chosen.get(id(n)) for n in (merge.lead, merge.absorbed)]
        apart = [p[1].ms for p in parts if p is not None]
        if len(apart) < 2 or None in apart:
            continue  # a part without a timed kernel: nothing to compare with
        sig = _call(merge, torch.device("meta"))[0]
        choice = table.get(sig)
        if choice is None:
            _, (configs, args), launch = _call(merge, device)
            best = tactics.best_config(
                configs, lambda cfg, args=args, launch=launch: launch(cfg, *args), merge.lead
            )
            measured += 1
            apart_ms = round(sum(apart), 5)
            if best is None or best[1] >= apart_ms:
                choice = tactics.Choice("apart", apart_ms=apart_ms, triton_ms=best and round(best[1], 5))
            else:
                choice = tactics.Choice(
                    "triton", triton_ms=round(best[1], 5), config=best[0], apart_ms=apart_ms
                )
            table[sig] = choice
        if choice.kernel == "triton":
            tactics.select(sig, choice)
            merged[id(merge.lead)] = (sig, choice, merge)
    if measured:
        log.info("timed %d merged convolution candidate(s)", measured)
        tactics.persist(env)
    return merged
