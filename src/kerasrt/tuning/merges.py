"""Merged convolutions: two neighbouring convolutions of an engine run as one kernel, where a
measurement says that is faster than each on its own best kernel.

Two shapes of neighbours, both from ResNet-style networks, both memory-bound at large
batches because one tensor travels between them through memory:

- "dual": the first block of each ResNet stage adds a 1x1 projection of its input to its
  last 1x1 convolution. After fusion the IR holds one of the two as a ``conv_fused`` node
  (the lead) whose residual is the other's output (the absorbed), read by nothing else:
  ``kerasrt::dual_conv`` computes both products into one accumulator, so that tensor (205 MB
  in ResNet50's first stage at batch 128) is never written nor read back.
- "pair": a bottleneck's 1x1 expansion (the lead) and the next block's 1x1 reduction of its
  output (the absorbed). ``kerasrt::pointwise_pair`` still stores the expansion's output (the
  next residual add reads it) but never reads it back, and writes the reduction's output over
  the expansion's input, which only the expansion reads: no memory is added.
- "dualpair": both at once, where a dual's output is the next block's input: the shortcut
  (the lead), the expansion added to it (``inner``) and the next block's reduction (the
  absorbed), one ``pointwise_pair`` call with the shortcut as its extra product. It is timed
  against the dual plus the reduction, where the dual won.

``choose`` finds the candidates among an engine's nodes (``candidates``), times the merged
kernel's configs against the sum of the two convolutions' chosen kernels (``tactics.choose``
timed those) and keeps the merges that win. Choices are cached with the other tactics.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from kerasrt.backend import cudnn_conv, dual_conv, pointwise_conv, pointwise_pair, tactics
from kerasrt.ir.graph import Node, Value

log = logging.getLogger(__name__)

T = TypeVar("T")
ABSORBED = "merged"
"""The kernel of a convolution whose merge partner's kernel computes it (it emits no op)."""
KINDS = ("dual", "pair", "dualpair")


@dataclass(frozen=True)
class Merge:
    """``lead`` runs the merged kernel of ``kind`` ("dual": ``dual_conv``, which also
    computes ``absorbed``, the lead's residual; "pair": ``pointwise_pair``, which goes on
    into ``absorbed``, the reduction of the lead's output; "dualpair": ``pointwise_pair``
    with ``inner``, the dual's expansion, as its first product and the lead's input as the
    shortcut)."""

    kind: str
    lead: Node
    absorbed: Node
    inner: Node | None = None

    @property
    def others(self) -> tuple[Node, ...]:
        """The nodes the lead's kernel computes besides its own (they emit no op)."""
        return (self.absorbed,) if self.inner is None else (self.inner, self.absorbed)

    @property
    def kernel(self) -> str:
        """The lead's kernel as engines name it: "<kind>:<the others' output names>"."""
        return ":".join([self.kind, *(n.outputs[0].name for n in self.others)])


def parse(kernel: str) -> tuple[str, list[str]] | None:
    """(kind, the others' output names) of a lead's kernel, or None for another kernel."""
    kind, *names = kernel.split(":")
    return (kind, names) if names and kind in KINDS else None


def is_merge_signature(sig: str) -> bool:
    """Whether a tactics signature is a merged kernel's (``dual_conv.signature`` or
    ``pointwise_pair.signature``)."""
    return sig.startswith(tuple(kind + "[" for kind in KINDS))


def _plain_1x1(node: Node) -> bool:
    """A 1x1, unpadded, ungrouped, undilated convolution kerasrt's kernels fuse, over input
    channels ``dual_conv`` takes."""
    if not cudnn_conv.fusable(node) or tuple(node.inputs[1].shape[2:]) != (1, 1):
        return False
    a = node.attrs
    return (
        a.get("groups", 1) == 1
        and list(a["padding"]) == [0, 0]
        and list(a["dilation"]) == [1, 1]
        and node.inputs[0].shape[1] % dual_conv.CHANNEL_MULTIPLE == 0
    )


def _residual(node: Node) -> Value | None:
    return cudnn_conv.epilogue_values(node)[1]


def candidates(nodes: Sequence[Node], outputs: Sequence[Value]) -> list[Merge]:
    """The merges the nodes of one engine (in order; ``outputs`` are read outside it) allow,
    each node in one at most, duals first (they save more):

    - dual: a 1x1 convolution with a residual made by another 1x1 convolution without
      epilogue (no residual, no activation) for it alone, one of the two at stride 1;
    - pair: a 1x1 convolution (``pointwise_conv.eligible``) whose output a second one without
      residual reduces back to the first's input channels (at most
      ``pointwise_pair.MERGE_MAX_CHANNELS``), where that input is made in the engine and read
      by the first alone (the pair writes over it);
    - dualpair: a dual whose output is reduced so, back to its stride-1 expansion's input
      (listed after that dual, which it would replace)."""
    users: dict[int, list[Node]] = {}
    for node in nodes:
        for value in node.inputs:
            users.setdefault(id(value), []).append(node)
    inside = {id(n) for n in nodes}
    escaping = {id(v) for v in outputs}

    def private(value: Value, reader: Node) -> bool:  # made here and read by ``reader`` alone
        return users.get(id(value)) == [reader] and id(value) not in escaping

    taken: set[int] = set()
    found: list[Merge] = []
    for lead in nodes:
        residual = _residual(lead) if _plain_1x1(lead) else None
        other = residual.producer if residual is not None else None
        if other is None or id(other) not in inside or not _plain_1x1(other):
            continue
        if _residual(other) is not None or (other.attrs.get("activation") or "none") != "none":
            continue
        if private(residual, lead) and [1, 1] in (list(lead.attrs["stride"]), list(other.attrs["stride"])):
            found.append(Merge("dual", lead, other))
            taken |= {id(lead), id(other)}

    def reduction(first: Node, output: Value) -> Node | None:  # of ``output``, over first's input
        x = first.inputs[0]
        channels = x.shape[1]
        if not pointwise_conv.eligible(first) or channels > pointwise_pair.MERGE_MAX_CHANNELS:
            return None
        if x.producer is None or id(x.producer) not in inside or not private(x, first):
            return None
        if cudnn_conv.input_channels(channels) != channels:
            return None  # cuDNN would pad it: the engine's tensor is not the plain (pixels x C) one
        for user in users.get(id(output), []):
            if id(user) in taken or not pointwise_conv.eligible(user) or _residual(user) is not None:
                continue
            if user.inputs[0] is output and user.outputs[0].shape == x.shape:
                return user
        return None

    for dual in list(found):
        expansion = dual.absorbed
        if (
            list(expansion.attrs["stride"]) != [1, 1]
            or dual.lead.inputs[0].shape[1] > pointwise_pair.MAX_CHANNELS
        ):
            continue
        user = reduction(expansion, dual.lead.outputs[0])
        if user is not None:
            found.insert(found.index(dual) + 1, Merge("dualpair", dual.lead, user, inner=expansion))
            taken.add(id(user))
    for lead in nodes:
        user = reduction(lead, lead.outputs[0]) if id(lead) not in taken else None
        if user is not None:
            found.append(Merge("pair", lead, user))
            taken |= {id(lead), id(user)}
    return found


def dual_order(lead: Node, absorbed: Node, a: T, b: T) -> tuple[T, T, list[int]]:
    """(the stride-1 convolution's ``a`` or ``b``, the other's, the other's stride): the
    stride-1 convolution is ``dual_conv``'s first product, the other its second."""
    lead_stride = list(lead.attrs["stride"])
    if lead_stride == [1, 1]:
        return a, b, list(absorbed.attrs["stride"])
    return b, a, lead_stride


def dual_bias(lead: Node, absorbed: Node) -> torch.Tensor | None:
    """The summed bias of the two convolutions (added in float32), or None."""
    biases = [b.data for b in (cudnn_conv.epilogue_values(n)[0] for n in (lead, absorbed)) if b is not None]
    if not biases:
        return None
    return sum((b.float() for b in biases[1:]), biases[0].float()).to(biases[0].dtype)


def op_arguments(
    merge: Merge, operands: Callable[[Node], Any], constant: Callable[[torch.Tensor], Any]
) -> tuple:
    """The merged op's arguments in its schema's order (``kerasrt::dual_conv`` or
    ``kerasrt::pointwise_pair``), the one layout both callers share: each convolution's x, w,
    bias and residual as ``operands(node)`` holds them (example tensors to time the kernel,
    the engine's graph values to call the op), and the dual's summed bias made by
    ``constant``."""
    lead, absorbed = merge.lead, merge.absorbed
    *_, act, clip = cudnn_conv.op_arguments(lead)
    summed = dual_bias(lead, merge.inner or absorbed) if merge.kind != "pair" else None
    bias = None if summed is None else constant(summed)
    if merge.kind == "dual":
        first, second, stride = dual_order(lead, absorbed, operands(lead), operands(absorbed))
        return first.x, first.w, second.x, second.w, bias, stride, act, clip
    a = operands(lead)
    if merge.kind == "dualpair":
        e = operands(merge.inner)
        head = (e.x, e.w, a.x, a.w, list(lead.attrs["stride"]), bias, None)
    else:
        head = (a.x, a.w, None, None, [1, 1], a.bias, a.residual)
    b = operands(absorbed)
    *_, act2, clip2 = cudnn_conv.op_arguments(absorbed)
    return (*head, b.w, b.bias, act, clip, act2, clip2)


_OUT_SLOT = {"dual": 5, "pair": 9, "dualpair": 9}
"""Where each kind's ``launch`` takes the lead's output buffer among the op's arguments."""


def _arguments(merge: Merge, device: torch.device) -> tuple:
    """The merged kernel's ``launch`` arguments after the config, on example operands on
    ``device`` (the meta device for the signature alone)."""
    examples = {id(n): tactics.example_operands(n, device) for n in (merge.lead, *merge.others)}
    args = op_arguments(merge, lambda node: examples[id(node)], lambda bias: bias.to(device))
    slot = _OUT_SLOT[merge.kind]
    return (*args[:slot], examples[id(merge.lead)].out, *args[slot:])


_OPS = {"dual": dual_conv, "pair": pointwise_pair, "dualpair": pointwise_pair}
"""The module of each kind's op: its CONFIGS, ``signature`` and ``launch``."""


def _signature(merge: Merge) -> str:
    return _OPS[merge.kind].signature(*_arguments(merge, torch.device("meta")))


def _merged_candidates(kind: str, args: tuple) -> tactics.Candidates:
    """A kind's configs, and a launch of one config on ``args`` (``_arguments``)."""
    op = _OPS[kind]
    return {kind: (op.CONFIGS, lambda config: op.launch(config, *args))}


def choose(
    nodes: Sequence[Node],
    outputs: Sequence[Value],
    chosen: Mapping[int, tuple[str, tactics.Choice]],
    device: torch.device,
    progress: Callable[[str], None] | None = None,
) -> dict[int, tuple[str, tactics.Choice, Merge]]:
    """The merges among ``nodes`` that beat their two convolutions' ``chosen`` kernels, by
    the lead's ``id``: (signature, choice, merge). Needs the Triton kernels on ``device``.
    ``progress`` hears of the timing."""
    if not chosen or not (dual_conv.available(device) and pointwise_pair.available(device)):
        return {}  # nothing timed to compare with (conv_kernels="inductor"), or no Triton
    env = tactics.environment(device)
    table = tactics.choice_table(env)
    merged: dict[int, tuple[str, tactics.Choice, Merge]] = {}
    measured = 0
    comparable = []  # (merge, signature)
    for merge in candidates(nodes, outputs):
        times = [chosen.get(id(n)) for n in (merge.lead, *merge.others)]
        if all(t is not None and t[1].ms is not None for t in times):
            comparable.append((merge, _signature(merge)))  # else nothing to compare with
    untimed = {sig: merge for merge, sig in comparable if sig not in table}
    if untimed and progress is not None:
        progress(f"timing merged kernels for {len(untimed)} group(s) of neighbouring convolutions")
    tactics.precompile(
        [
            (functools.partial(_merged_candidates, merge.kind), functools.partial(_arguments, merge, device))
            for merge in untimed.values()
        ],
        device,
    )
    for merge, sig in comparable:
        if merge.kind == "dualpair":  # against the dual it extends, where that won
            dual = merged.get(id(merge.lead))
            if dual is None:
                continue
            apart_ms = dual[1].ms + chosen[id(merge.absorbed)][1].ms
        else:
            apart_ms = sum(chosen[id(n)][1].ms for n in (merge.lead, *merge.others))
        choice = table.get(sig)
        if choice is None:
            args = _arguments(merge, device)
            best = tactics.best_config(*_merged_candidates(merge.kind, args)[merge.kind], merge.lead)
            measured += 1
            apart_ms = round(apart_ms, 5)
            if best is None or best[1] >= apart_ms:
                choice = tactics.Choice("apart", apart_ms=apart_ms, triton_ms=best and round(best[1], 5))
            else:
                choice = tactics.Choice(
                    "triton", triton_ms=round(best[1], 5), config=best[0], apart_ms=apart_ms
                )
            table[sig] = choice
        if choice.kernel == "triton":
            tactics.select(sig, choice)
            merged[id(merge.lead)] = (sig, choice, merge)  # a dualpair replaces its dual
    if measured:
        log.info("timed %d merged convolution candidate(s)", measured)
        tactics.persist(env)
    return merged
