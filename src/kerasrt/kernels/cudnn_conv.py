"""Convolutions with fused epilogues through cuDNN's graph API (``nvidia-cudnn-frontend``).

One cuDNN graph computes ``act(conv(x, w) + bias + residual)`` in one kernel, where an
Inductor engine runs the convolution, writes its output, and reads it back in a Triton
epilogue: at batch 128 those epilogue passes are close to half of ResNet50's GPU time.

``kerasrt::cudnn_conv`` is a torch custom op, so Inductor calls it like any extern kernel and
AOTInductor packages call it through the dispatcher (importing kerasrt.runtime registers it). Its
CUDA kernel runs cuDNN execution plans, one per input signature, built on first use with
the plan index ``choose_plan`` set (the tactic measured at build time, see
``kerasrt.backend.tactics``) or else cuDNN's first heuristic choice. Its CPU kernel is the
reference composition, the op's definition.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kerasrt.backend import op_library

log = logging.getLogger(__name__)

ACTIVATIONS = ("none", "relu", "clamp", "silu")
"""Epilogue activations cuDNN applies in the kernel; "clamp" takes ``clip`` = [lo, hi]
(ReLU6 is clamp [0, 6])."""
FUSED_DTYPES = (torch.float16, torch.bfloat16)
HEURISTICS = ("A", "FALLBACK")
"""cuDNN heuristic modes whose plan lists, in this order, are the candidate plans."""
GRAPH_VERSION = 5
"""Bumped whenever the cuDNN graph or the plan selection changes (plan indices measured for
another are void)."""


def epilogue_constants(activation: str, clip: Sequence[float]) -> dict[str, Any]:
    """The constexpr arguments of kerasrt's Triton kernels' epilogue (``triton_kernels``):
    the activation's code and the clamp bounds (zero unless it clamps)."""
    lo, hi = (clip[0], clip[1]) if activation == "clamp" else (0.0, 0.0)
    return {"ACT": ACTIVATIONS.index(activation), "LO": lo, "HI": hi}


def epilogue_inputs(node: Any) -> tuple[bool, bool]:
    """(has bias, has residual) of an IR conv or conv_fused node: the operands after x and w."""
    if node.op == "conv":
        return len(node.inputs) > 2, False
    return node.attrs.get("has_bias", True), node.attrs.get("has_residual", False)


def epilogue_values(node: Any) -> tuple[Any, Any]:
    """(bias, residual): the IR values of an IR conv or conv_fused node's epilogue operands,
    None for each it lacks (``epilogue_inputs``)."""
    has_bias, has_residual = epilogue_inputs(node)
    bias = node.inputs[2] if has_bias else None
    return bias, node.inputs[2 + int(has_bias)] if has_residual else None


def fusable(node: Any) -> bool:
    """Whether an IR conv or conv_fused node suits kerasrt's fused kernels at all (each kernel's
    ``eligible`` adds its own shape rules): a 2-D convolution, an activation they fuse (a clamp
    with both bounds), constant weight and bias, FP16/BF16 activations."""
    if node.op not in ("conv", "conv_fused") or len(node.inputs[1].shape) != 4:
        return False
    act = node.attrs.get("activation") or "none"
    bounds = node.attrs.get("activation_attrs") or {}
    if act not in ACTIVATIONS or (act == "clamp" and None in (bounds.get("min"), bounds.get("max"))):
        return False
    has_bias, _ = epilogue_inputs(node)
    constants = node.inputs[1].is_constant and (not has_bias or node.inputs[2].is_constant)
    return constants and node.inputs[0].dtype in ("float16", "bfloat16")


def op_arguments(node: Any) -> tuple[list[int], list[int], list[int], str, list[float]]:
    """stride, padding, dilation, activation and clip of an IR conv or conv_fused node, as the
    op takes them."""
    a = node.attrs
    act = a.get("activation") or "none"
    clip: list[float] = []
    if act == "clamp":
        bounds = a.get("activation_attrs") or {}
        clip = [float(bounds["min"]), float(bounds["max"])]
    return list(a["stride"]), list(a["padding"]), list(a["dilation"]), act, clip


def input_channels(c: int) -> int:
    """Input channels as kerasrt's cuDNN convolutions take them: at least 4. cuDNN's FP16
    kernels read channels in groups of 4 and would pad an RGB image itself, in an extra
    kernel per call (63 us of ResNet50's 3 ms at batch 128 on an H200); padded in the engine,
    the zero channel is written by the kernel that produces the input anyway."""
    return max(c, 4)


def op_weight(w: torch.Tensor) -> torch.Tensor:
    """A conv weight as the op takes it: input channels padded (``input_channels``) with
    zeros, channels-last."""
    extra = input_channels(w.shape[1]) - w.shape[1]
    if extra:
        w = torch.nn.functional.pad(w, [0, 0, 0, 0, 0, extra])
    return w.contiguous(memory_format=torch.channels_last)


def output_shape(
    x: Sequence[int], w: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> list[int]:
    """N, K, H', W' of a 2-D convolution."""
    spatial = [
        (x[2 + i] + 2 * padding[i] - dilation[i] * (w[2 + i] - 1) - 1) // stride[i] + 1 for i in range(2)
    ]
    return [x[0], w[0], *spatial]


def empty_output(
    x: torch.Tensor, w: torch.Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> torch.Tensor:
    """The op's output, uninitialized: channels-last, x's dtype and device."""
    return empty_channels_last(output_shape(x.shape, w.shape, stride, padding, dilation), x)


def empty_channels_last(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """An uninitialized channels-last tensor of NCHW ``shape``, ``like``'s dtype and device.

    Made as an NHWC buffer seen through a permutation: Inductor lowers
    ``torch.empty(memory_format=channels_last)`` with contiguous strides, so a traced Triton
    kernel writing an op's output got a copy of the uninitialized buffer first (one more
    kernel per op), and an ``empty_strided`` output was not always written in place."""
    n, c, h, w = shape
    return torch.empty((n, h, w, c), dtype=like.dtype, device=like.device).permute(0, 3, 1, 2)


def reference(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    clip: Sequence[float],
) -> torch.Tensor:
    """What the op computes, in PyTorch ops (rounded to the input dtype after the conv, as an
    unfused program would)."""
    y = torch.convolution(x, w, bias, list(stride), list(padding), list(dilation), False, [0, 0], 1)
    if residual is not None:
        y = y + residual
    return activate(y, activation, clip)


def activate(y: torch.Tensor, activation: str, clip: Sequence[float]) -> torch.Tensor:
    """An epilogue activation of kerasrt's kernels ("none", "relu", "clamp" to ``clip``,
    "silu"), in PyTorch ops."""
    if activation == "relu":
        return torch.relu(y)
    if activation == "silu":
        return torch.nn.functional.silu(y)
    if activation == "clamp":
        return torch.clamp(y, clip[0], clip[1])
    if activation != "none":
        raise ValueError(f"kerasrt's fused kernels have no activation {activation!r}")
    return y


def cudnn_conv(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    activation: str,
    clip: list[float],
) -> torch.Tensor:
    """act(conv2d(x, w) + bias + residual), NCHW logical shapes, channels-last output: the op's
    kernel on every device but CUDA (there, ``_cuda`` runs a cuDNN graph)."""
    out = empty_output(x, w, stride, padding, dilation)
    out.copy_(reference(x, w, bias, residual, stride, padding, dilation, activation, clip))
    return out


def _fake(x, w, bias, residual, stride, padding, dilation, activation, clip):
    return empty_output(x, w, stride, padding, dilation)


def _cuda(x, w, bias, residual, stride, padding, dilation, activation, clip):
    out = empty_output(x, w, stride, padding, dilation)
    tensors = Operands(x, w, bias, residual, out)
    fusable = x.dtype in FUSED_DTYPES
    plan = plan_for(tensors, stride, padding, dilation, activation, clip) if fusable else None
    if plan is None:  # cuDNN cannot fuse this signature: the same math, unfused
        out.copy_(reference(x, w, bias, residual, stride, padding, dilation, activation, clip))
    else:
        plan.run(tensors)
    return out


op_library.define(cudnn_conv, cuda=_cuda, fake=_fake)


# -- cuDNN graphs --------------------------------------------------------------------------------


@functools.cache
def frontend() -> Any:
    """The ``cudnn`` module of nvidia-cudnn-frontend, or None when it is not installed."""
    try:
        import cudnn
    except Exception:  # not installed, or no usable libcudnn: Inductor kernels only
        return None
    return cudnn


def available(device: torch.device) -> bool:
    """Whether fused cuDNN convolutions can run on ``device``."""
    return device.type == "cuda" and frontend() is not None


def cudnn_version() -> str:
    cudnn = frontend()
    return cudnn.backend_version_string() if cudnn is not None else "none"


@dataclass
class Operands:
    """The tensors of one call; ``bias`` may be (K,) and is described to cuDNN as (1, K, 1, 1)."""

    x: torch.Tensor
    w: torch.Tensor
    bias: torch.Tensor | None
    residual: torch.Tensor | None
    out: torch.Tensor

    def pack(self, uids: dict[str, Any]) -> dict[Any, torch.Tensor]:
        """The variant pack of a cuDNN graph whose operand tensors are ``uids`` (by name)."""
        data = {"X": self.x, "W": self.w, "B": self.bias, "R": self.residual, "Y": self.out}
        return {uid: data[name] for name, uid in uids.items()}

    def described(self) -> dict[str, tuple[list[int], list[int]]]:
        """(dims, strides) per operand as cuDNN sees them."""
        desc = {
            name: (list(t.shape), list(t.stride()))
            for name, t in (("X", self.x), ("W", self.w), ("R", self.residual), ("Y", self.out))
            if t is not None
        }
        if self.bias is not None:
            k = self.bias.numel()
            desc["B"] = ([1, k, 1, 1], [k, 1, k, k])
        return desc


def signature(
    tensors: Operands,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    clip: Sequence[float],
) -> str:
    """A stable text key of everything a cuDNN plan depends on. Memoized on the same facts as a
    tuple: ops look their plan or config up by this key on every call that is not a CUDA-graph
    replay, and building the text took 15 us on a CPU core against 2.5 us for the tuple."""

    def describe() -> str:
        desc = tensors.described()
        parts = [str(tensors.x.dtype).replace("torch.", ""), activation + (str(list(clip)) if clip else "")]
        parts += [list(stride), list(padding), list(dilation)]
        parts += [f"{k}{desc[k][0]}/{desc[k][1]}" for k in sorted(desc)]
        return " ".join(map(str, parts))

    x, w, b, r, y = tensors.x, tensors.w, tensors.bias, tensors.residual, tensors.out
    facts = (
        x.dtype, x.shape, x.stride(), w.shape, w.stride(), y.shape, y.stride(),
        None if b is None else b.shape, None if r is None else (r.shape, r.stride()),
        tuple(stride), tuple(padding), tuple(dilation), tuple(clip), activation,
    )  # fmt: skip
    return memo_key(facts, describe)


_KEYS: dict[tuple, str] = {}


def memo_key(facts: tuple, build: Callable[[], str]) -> str:
    """``build()``, the text key of a call, memoized on ``facts``: a tuple of everything the
    text says (its operands' dtypes, shapes and strides, its attributes)."""
    key = _KEYS.get(facts)
    if key is None:
        key = _KEYS[facts] = build()
    return key


class Plan:
    """One built cuDNN graph with its selected execution plan; ``serialized``: the blob it was
    deserialized from, if it was (``deserialized_plan``)."""

    def __init__(
        self, graph: Any, uids: dict[str, Any], workspace: int, handle: Any, serialized: str | None = None
    ):
        self.graph, self.uids, self.workspace, self.handle = graph, uids, workspace, handle
        self.serialized = serialized

    def run(self, tensors: Operands) -> None:
        cudnn = frontend()
        cudnn.set_stream(self.handle, torch.cuda.current_stream().cuda_stream)
        workspace = torch.empty(max(self.workspace, 1), dtype=torch.uint8, device=tensors.x.device)
        self.graph.execute(tensors.pack(self.uids), workspace, handle=self.handle)


_PLANS: dict[str, Plan | None] = {}
_CHOSEN: dict[str, int] = {}
_SAVED: dict[str, dict[str, Any]] = {}  # signature -> a saved plan (``serialized_plans``), unbuilt


def choose_plan(key: str, index: int) -> None:
    """Use execution plan ``index`` (of cuDNN's heuristic list) for signature ``key``."""
    if _CHOSEN.get(key) != index:
        _CHOSEN[key] = index
        _PLANS.pop(key, None)


def adopt_plan(key: str, index: int, plan: Plan) -> None:
    """Use ``plan`` (built while timing, plan ``index``) for signature ``key``."""
    _CHOSEN[key] = index
    _PLANS[key] = plan


@functools.cache
def _handle(device_index: int) -> Any:
    with torch.cuda.device(device_index):
        return frontend().create_handle()


def build_graph(
    tensors: Operands,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    clip: Sequence[float],
    heuristics: Sequence[str] = HEURISTICS,
    residual_first: bool = True,
) -> tuple[Any, dict[str, Any], Any]:
    """The cuDNN graph of the fused conv with its execution plans listed (not built), in the
    order of the ``heuristics`` modes' lists.

    The residual is added before the bias: conv -> add(residual) -> add(bias) -> act is the
    pattern cuDNN's precompiled fused kernels take (the legacy ConvBiasActivation with z);
    the other order gets only runtime-compiled kernels, which on an H200 at ResNet50 batch
    128 ran 1.1-1.4x slower and took seconds to build (``bench/cudnn_probe.py``)."""
    cudnn = frontend()
    handle = _handle(tensors.x.device.index or 0)
    io = cudnn.data_type.HALF if tensors.x.dtype == torch.float16 else cudnn.data_type.BFLOAT16
    g = cudnn.pygraph(
        io_data_type=io,
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=handle,
    )
    desc = tensors.described()
    uids = {}

    def operand(name: str) -> Any:
        dims, strides = desc[name]
        uids[name] = g.tensor(name=name, dim=dims, stride=strides, data_type=io)
        return uids[name]

    y = g.conv_fprop(
        image=operand("X"),
        weight=operand("W"),
        padding=list(padding),
        stride=list(stride),
        dilation=list(dilation),
    )
    order = ("R", "B") if residual_first else ("B", "R")
    for name in order:
        if name == "B" and "B" in desc:
            y = g.bias(name="bias", input=y, bias=operand("B"))
        elif name == "R" and "R" in desc:
            y = g.add(name="residual", a=y, b=operand("R"))
    if activation == "relu":
        y = g.relu(name="relu", input=y)
    elif activation == "clamp":
        y = g.relu(name="clamp", input=y, lower_clip=clip[0], upper_clip=clip[1])
    elif activation == "silu":
        y = g.swish(name="silu", input=y)
    dims, strides = desc["Y"]
    y.set_output(True).set_data_type(io).set_dim(dims).set_stride(strides)
    uids["Y"] = y
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([getattr(cudnn.heur_mode, mode) for mode in heuristics])
    g.check_support()
    return g, uids, handle


# -- plans built in other processes (``compile_pool``) ------------------------------------------


def plan_description(
    tensors: Operands,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    clip: Sequence[float],
    device: torch.device | None = None,
) -> str:
    """JSON of everything ``build_graph`` needs from a call, for a process that has none of
    its tensors: the operands as cuDNN sees them (``Operands.described``), dtype, CUDA device
    index (``device``, or the tensors'), conv arguments."""
    return json.dumps(
        {
            "dtype": str(tensors.x.dtype).replace("torch.", ""),
            "device": (device or tensors.x.device).index or 0,
            "operands": tensors.described(),
            "conv": [list(stride), list(padding), list(dilation), activation, list(clip)],
        },
        sort_keys=True,
    )


def serialized_plan(description: str, index: int) -> str:
    """Build execution plan ``index`` of the graph of a described call (``plan_description``)
    and return it serialized (``serialized_graph``). Run in compile workers: cuDNN compiles
    the plans of conv + bias + SiLU at run time, 0.3-0.5 s each."""
    d = json.loads(description)
    graph, _, _ = build_graph(described_operands(d, torch.device("cuda", d["device"])), *d["conv"])
    graph.build_plan_at_index(index)
    return serialized_graph(graph)


def serialized_graph(graph: Any) -> str:
    """cuDNN's serialization of a graph with its plan built, as base64 text (for JSON)."""
    return base64.b64encode(bytes(graph.serialize())).decode("ascii")


def described_operands(description: dict[str, Any], device: torch.device) -> Operands:
    """Empty operands on ``device`` that cuDNN sees as the described ones (the bias made
    (1, K, 1, 1), which is how ``Operands.described`` gives it)."""
    dtype = getattr(torch, description["dtype"])
    made = {
        name: torch.empty_strided(shape, strides, dtype=dtype, device=device)
        for name, (shape, strides) in description["operands"].items()
    }
    return Operands(made["X"], made["W"], made.get("B"), made.get("R"), made["Y"])


def deserialized_plan(blob: str, uids: dict[str, int], device: torch.device) -> Plan:
    """The plan a worker serialized (``serialized_plan``), ready to run here. ``uids``: the
    graph's tensor uids by operand name (the same in every process that builds the graph)."""
    handle = _handle(device.index or 0)
    graph = frontend().pygraph(handle=handle)
    graph.deserialize(base64.b64decode(blob))
    return Plan(graph, dict(uids), graph.get_workspace_size(), handle, serialized=blob)


# -- plans saved with an artifact -------------------------------------------------------------


def serialized_plans(keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The built plans of the signatures ``keys`` that cuDNN serializes, as {key: {"plan":
    index, "uids": {operand: uid}, "blob": base64}}. A loading process deserializes one in
    about 4 ms, where building a runtime-compiled plan (conv + bias + SiLU) takes 0.3-0.5 s:
    EfficientNetB0's first inference after ``kerasrt.load`` took 1.3 s instead of 4.7 s."""
    saved = {}
    for key in keys:
        plan = _PLANS.get(key)
        if plan is None:
            continue
        blob = plan.serialized
        if blob is None:
            try:
                blob = serialized_graph(plan.graph)
            except Exception as exc:  # built again when loaded
                log.debug("cuDNN does not serialize the plan of %s (%s)", key, exc)
                continue
        saved[key] = {"plan": _CHOSEN.get(key, 0), "uids": uid_numbers(plan.uids), "blob": blob}
    return saved


def uid_numbers(uids: dict[str, Any]) -> dict[str, int]:
    """{operand: uid} of a graph's tensors (cuDNN tensor objects, or their uids already, as a
    deserialized plan holds them): what a serialized plan is run with."""
    return {name: uid if isinstance(uid, int) else uid.get_uid() for name, uid in uids.items()}


def offer_saved_plans(plans: dict[str, dict[str, Any]]) -> None:
    """Let ``plan_for`` deserialize these plans (``serialized_plans``) instead of building
    them, each while its signature's chosen plan index is still the one saved."""
    _SAVED.update(plans)


def _saved_plan(key: str, device: torch.device) -> Plan | None:
    saved = _SAVED.get(key)
    if saved is None or saved.get("plan") != _CHOSEN.get(key, 0):
        return None
    try:
        return deserialized_plan(saved["blob"], saved["uids"], device)
    except Exception as exc:  # e.g. a damaged blob: built here instead
        log.warning("the saved cuDNN plan of %s does not load (%s); building it", key, exc)
        return None


def plan_for(
    tensors: Operands,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    clip: Sequence[float],
) -> Plan | None:
    """The built plan for this call's signature (cached), or None if cuDNN cannot run it."""
    key = signature(tensors, stride, padding, dilation, activation, clip)
    if key in _PLANS:
        return _PLANS[key]
    plan = None
    if frontend() is None:
        log.warning("nvidia-cudnn-frontend is not installed: fused convolutions run unfused")
        _PLANS[key] = None
        return None
    plan = _saved_plan(key, tensors.x.device)
    if plan is None:
        try:
            g, uids, handle = build_graph(tensors, stride, padding, dilation, activation, clip)
            g.build_plan_at_index(_CHOSEN.get(key, 0))
            plan = Plan(g, uids, g.get_workspace_size(), handle)
        except Exception as exc:  # unsupported layout or engine: run unfused instead
            log.warning("cuDNN cannot fuse the convolution %s (%s); running it unfused", key, exc)
    _PLANS[key] = plan
    return plan
