"""Convolutions with fused epilogues through cuDNN's graph API (``nvidia-cudnn-frontend``).

One cuDNN graph computes ``act(conv(x, w) + residual + bias)`` in one kernel, where an
Inductor engine runs the convolution, writes its output and reads it back in a Triton
epilogue. ``kerasrt::cudnn_conv`` takes the execution plan's index in cuDNN's heuristic list as
its last argument (the tactics chose it by timing every listed plan); the CUDA kernel builds
that plan on first use per call signature and keeps it (``_PLANS``, a cache of built objects:
the choice itself is the argument). Plans built elsewhere arrive serialized: from compile
workers while timing (conv + bias + SiLU has only runtime-compiled plans, 0.3-0.5 s each to
build) and from an artifact (``install_saved_plans``), so a loading process builds none.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kerasrt.kernels import conv_spec, op_library
from kerasrt.kernels.registry import KernelFamily, Operands, View
from kerasrt.tuning.compile_pool import Request

log = logging.getLogger(__name__)

HEURISTICS = ("A", "FALLBACK")
"""cuDNN heuristic modes whose plan lists, in this order, are the candidate plans."""
GRAPH_VERSION = 5
"""Bumped whenever the cuDNN graph or the plan list changes (plan indices measured for another
are void)."""
MAX_PLANS = 32
"""Plans timed per convolution, at most."""
PLAN_BUILD_BUDGET_S = 2.0
"""Stop trying further plans of one convolution once building them took this long:
precompiled kernels build in milliseconds, runtime-compiled ones (NVRTC) about 0.5 s each."""
RUNTIME_PLANS = 12
"""Plans of a conv + bias + SiLU graph (runtime-compiled only) built in compile workers."""


@functools.cache
def frontend() -> Any:
    """The ``cudnn`` module of nvidia-cudnn-frontend, or None when it is not installed."""
    try:
        import cudnn
    except Exception:  # not installed, or no usable libcudnn: Inductor kernels only
        return None
    return cudnn


SCHEMA = (
    "(Tensor x, Tensor w, Tensor? bias, Tensor? residual, int[] stride, int[] padding, int[] dilation,"
    " str activation, float[] clip, int plan) -> Tensor"
)
"""The op's signature: act(conv2d(x, w) + residual + bias) on cuDNN execution plan ``plan``;
NCHW logical shapes, channels-last output."""


def available(device: torch.device) -> bool:
    """Whether fused cuDNN convolutions can run on ``device``."""
    return device.type == "cuda" and frontend() is not None


def cudnn_version() -> str:
    cudnn = frontend()
    return cudnn.backend_version_string() if cudnn is not None else "none"


@dataclass
class Tensors:
    """The tensors of one call; ``bias`` (K,) is described to cuDNN as (1, K, 1, 1)."""

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


Convolution = tuple[list[int], list[int], list[int], str, list[float]]
"""stride, padding, dilation, activation, clip: the op's arguments after its tensors."""


def call_key(tensors: Tensors, conv: Convolution) -> str:
    """A stable text key of everything a plan depends on, memoized on the same facts as a
    tuple (the op looks its plan up on every call that is not a CUDA-graph replay)."""
    stride, padding, dilation, activation, clip = conv
    x, w, b, r, y = tensors.x, tensors.w, tensors.bias, tensors.residual, tensors.out
    facts = (
        x.dtype, x.shape, x.stride(), w.shape, w.stride(), y.shape, y.stride(),
        None if b is None else b.shape, None if r is None else (r.shape, r.stride()),
        tuple(stride), tuple(padding), tuple(dilation), tuple(clip), activation,
    )  # fmt: skip
    key = _KEYS.get(facts)
    if key is None:
        desc = tensors.described()
        parts = [str(x.dtype).replace("torch.", ""), activation + (str(list(clip)) if clip else "")]
        parts += [list(stride), list(padding), list(dilation)]
        parts += [f"{k}{desc[k][0]}/{desc[k][1]}" for k in sorted(desc)]
        key = _KEYS[facts] = " ".join(map(str, parts))
    return key


_KEYS: dict[tuple, str] = {}  # a memo of call_key's texts


class Plan:
    """One built cuDNN graph with its execution plan; ``serialized``: the blob it was
    deserialized from, if it was."""

    def __init__(
        self, graph: Any, uids: dict[str, Any], workspace: int, handle: Any, serialized: str | None = None
    ):
        self.graph, self.uids, self.workspace, self.handle = graph, uids, workspace, handle
        self.serialized = serialized

    def run(self, tensors: Tensors) -> None:
        cudnn = frontend()
        cudnn.set_stream(self.handle, torch.cuda.current_stream().cuda_stream)
        workspace = torch.empty(max(self.workspace, 1), dtype=torch.uint8, device=tensors.x.device)
        self.graph.execute(tensors.pack(self.uids), workspace, handle=self.handle)


_PLANS: dict[tuple[str, int], Plan | None] = {}
"""Built plans by (call key, plan index): a cache of cuDNN objects (None: cuDNN cannot run it)."""


def _output(x, w, bias, residual, stride, padding, dilation, activation, clip):
    return conv_spec.empty_output(x, w, stride, padding, dilation)


def _reference(x, w, bias, residual, stride, padding, dilation, activation, clip):
    return conv_spec.reference(x, w, bias, residual, stride, padding, dilation, activation, clip)


def _runs(x, *args) -> bool:
    return x.dtype in conv_spec.FUSED_DTYPES and frontend() is not None


def _launch(plan, out, x, w, bias, residual, *conv) -> None:
    tensors = Tensors(x, w, bias, residual, out)
    built = plan_for(tensors, conv, plan)
    if built is None:  # cuDNN cannot run this plan: the same math, unfused
        out.copy_(_reference(x, w, bias, residual, *conv))
    else:
        built.run(tensors)


OP = op_library.define_kernel("cudnn_conv", SCHEMA, _output, _reference, _launch, _runs, inlinable=False)


@functools.cache
def _handle(device_index: int) -> Any:
    with torch.cuda.device(device_index):
        return frontend().create_handle()


def build_graph(
    tensors: Tensors, conv: Convolution, heuristics: Sequence[str] = HEURISTICS
) -> tuple[Any, dict[str, Any], Any]:
    """The cuDNN graph of the fused conv with its execution plans listed (not built), in the
    order of the ``heuristics`` modes' lists.

    The residual is added before the bias: conv -> add(residual) -> add(bias) -> act is the
    pattern cuDNN's precompiled fused kernels take (the legacy ConvBiasActivation with z); the
    other order gets only runtime-compiled kernels, slower to run and to build."""
    stride, padding, dilation, activation, clip = conv
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
    if "R" in desc:
        y = g.add(name="residual", a=y, b=operand("R"))
    if "B" in desc:
        y = g.bias(name="bias", input=y, bias=operand("B"))
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


def plan_for(tensors: Tensors, conv: Convolution, index: int) -> Plan | None:
    """The built plan ``index`` for this call's signature (cached), or None if cuDNN cannot
    run it."""
    key = (call_key(tensors, conv), index)
    if key in _PLANS:
        return _PLANS[key]
    plan = None
    try:
        g, uids, handle = build_graph(tensors, conv)
        g.build_plan_at_index(index)
        plan = Plan(g, uids, g.get_workspace_size(), handle)
    except Exception as exc:  # unsupported layout or engine: run unfused instead
        log.warning(
            "cuDNN cannot run plan %d of the convolution %s (%s); running it unfused", index, key[0], exc
        )
    _PLANS[key] = plan
    return plan


# -- serialized plans: built in compile workers, saved with artifacts ----------------------------


def plan_description(tensors: Tensors, conv: Convolution) -> str:
    """JSON of everything ``build_graph`` needs from a call, for a process that has none of
    its tensors: the operands as cuDNN sees them, dtype, CUDA device index, conv arguments."""
    return json.dumps(
        {
            "dtype": str(tensors.x.dtype).replace("torch.", ""),
            "device": tensors.x.device.index or 0,
            "operands": tensors.described(),
            "conv": [list(a) if isinstance(a, (list, tuple)) else a for a in conv],
        },
        sort_keys=True,
    )


def serialized_plan(description: str, index: int) -> str:
    """Build plan ``index`` of the graph of a described call and return it serialized. Run in
    compile workers."""
    d = json.loads(description)
    device = torch.device("cuda", d["device"])
    dtype = getattr(torch, d["dtype"])
    made = {
        name: torch.empty_strided(shape, strides, dtype=dtype, device=device)
        for name, (shape, strides) in d["operands"].items()
    }
    tensors = Tensors(made["X"], made["W"], made.get("B"), made.get("R"), made["Y"])
    graph, _, _ = build_graph(tensors, tuple(d["conv"]))
    graph.build_plan_at_index(index)
    return serialized_graph(graph)


def serialized_graph(graph: Any) -> str:
    """cuDNN's serialization of a graph with its plan built, as base64 text (for JSON)."""
    return base64.b64encode(bytes(graph.serialize())).decode("ascii")


def deserialized_plan(blob: str, uids: dict[str, int], device: torch.device) -> Plan:
    """A serialized plan, ready to run here. ``uids``: the graph's tensor uids by operand name
    (the same in every process that builds the graph)."""
    handle = _handle(device.index or 0)
    graph = frontend().pygraph(handle=handle)
    graph.deserialize(base64.b64decode(blob))
    return Plan(graph, dict(uids), graph.get_workspace_size(), handle, serialized=blob)


def uid_numbers(uids: dict[str, Any]) -> dict[str, int]:
    """{operand: uid} of a graph's tensors (cuDNN tensor objects, or their uids already)."""
    return {name: uid if isinstance(uid, int) else uid.get_uid() for name, uid in uids.items()}


def serialized_plans(calls: Iterable[tuple[str, int]]) -> list[dict[str, Any]]:
    """The built plans of ``calls`` ((call key, plan index)) that cuDNN serializes, as
    [{"key", "plan", "uids", "blob"}]: a loading process deserializes one in milliseconds."""
    saved = []
    for key, index in calls:
        plan = _PLANS.get((key, index))
        if plan is None:
            continue
        blob = plan.serialized
        if blob is None:
            try:
                blob = serialized_graph(plan.graph)
            except Exception as exc:  # built again when loaded
                log.debug("cuDNN does not serialize the plan of %s (%s)", key, exc)
                continue
        saved.append({"key": key, "plan": index, "uids": uid_numbers(plan.uids), "blob": blob})
    return saved


def install_saved_plans(saved: Iterable[dict[str, Any]], device: torch.device) -> int:
    """Deserialize saved plans (``serialized_plans``) into the plan cache; returns how many
    loaded. A plan that does not load is built where it is first called instead."""
    loaded = 0
    for entry in saved:
        key = (entry["key"], int(entry["plan"]))
        if key in _PLANS:
            continue
        try:
            _PLANS[key] = deserialized_plan(entry["blob"], entry["uids"], device)
            loaded += 1
        except Exception as exc:  # e.g. a damaged blob: built at the first call instead
            log.warning("the saved cuDNN plan of %s does not load (%s); building it", entry["key"], exc)
    return loaded


# -- the family ----------------------------------------------------------------------------------


def eligible(node: Any, view: View) -> bool:
    """A fusable, ungrouped 2-D convolution."""
    return conv_spec.fusable(node) and node.attrs.get("groups", 1) == 1


def arguments(node: Any, read: Operands, view: View) -> tuple:
    """(x, w, bias, residual, stride, padding, dilation, activation, clip): input channels
    padded to ``conv_spec.input_channels`` (a pad Inductor fuses into x's producer), the
    weight padded and channels-last once at build time."""
    bias, residual = conv_spec.epilogue_values(node)
    x = read.apply(conv_spec.pad_channels, read(node.inputs[0]))
    w = read.constant(conv_spec.channels_last_weight, node.inputs[1])
    return (
        x, w, conv_spec.optional(read, bias), conv_spec.optional(read, residual),
        *conv_spec.geometry(node), *conv_spec.activation_of(node),
    )  # fmt: skip


def call_key_of(args: tuple) -> str:
    """The op's call key for ``arguments`` made of tensors (meta ones will do)."""
    return call_key(*_split(args))


def _split(args: tuple) -> tuple[Tensors, Convolution]:
    x, w, bias, residual, *conv = args
    out = conv_spec.empty_output(x, w, *conv[:3])
    return Tensors(x, w, bias, residual, out), tuple(conv)


def tune(args: tuple, prebuilt: dict[int, Any], time_ms: Callable[[Callable[[], Any]], float]) -> Any:
    """(plan index, ms) of the fastest of cuDNN's listed plans for this call (up to
    ``MAX_PLANS``, within ``PLAN_BUILD_BUDGET_S`` of building), or None. ``prebuilt``: plans
    serialized by compile workers, by index; when any of them runs, those are the
    candidates and nothing is built here. The winner stays built in the plan cache."""
    tensors, conv = _split(args)
    try:
        g, uids, handle = build_graph(tensors, conv)
    except Exception as exc:  # cuDNN has no engine for this graph
        log.info("cuDNN cannot fuse %s: %s", call_key(tensors, conv), exc)
        return None
    key = call_key(tensors, conv)
    candidates: dict[int, Plan] = {}
    for index, blob in sorted((prebuilt or {}).items()):
        try:
            candidates[index] = deserialized_plan(blob, uid_numbers(uids), tensors.x.device)
        except Exception as exc:  # a plan that does not load is no candidate
            log.debug("cuDNN plan %d of %s (built in a worker) failed: %s", index, key, exc)
    best: tuple[int, float] | None = None
    for index, plan in candidates.items():
        try:
            ms = time_ms(functools.partial(plan.run, tensors))
        except Exception as exc:
            log.debug("cuDNN plan %d of %s failed: %s", index, key, exc)
            continue
        if best is None or ms < best[1]:
            best = (index, ms)
    if best is not None:
        _PLANS[(key, best[0])] = candidates[best[0]]
        return best
    pack = tensors.pack(uids)
    building = 0.0
    for index in range(min(MAX_PLANS, g.get_execution_plan_count())):
        if best is not None and building > PLAN_BUILD_BUDGET_S:
            break
        try:
            begin = time.perf_counter()
            g.build_plan_at_index(index)
            building += time.perf_counter() - begin
            workspace = torch.empty(
                max(g.get_workspace_size(), 1), dtype=torch.uint8, device=tensors.x.device
            )

            def run(index: int = index, workspace: torch.Tensor = workspace) -> None:
                frontend().set_stream(handle, torch.cuda.current_stream().cuda_stream)
                g.execute_plan_at_index(pack, workspace, index, handle=handle)

            ms = time_ms(run)
        except Exception as exc:  # a plan that does not build or run is no candidate
            log.debug("cuDNN plan %d of %s failed: %s", index, key, exc)
            continue
        if best is None or ms < best[1]:
            best = (index, ms)
    if best is not None:
        g.build_plan_at_index(best[0])
        _PLANS[(key, best[0])] = Plan(g, uids, g.get_workspace_size(), handle)
    return best


def compile_requests(args: tuple, device: torch.device) -> list[Request]:
    """Worker requests for the first ``RUNTIME_PLANS`` plans of a conv + bias + SiLU graph
    (cuDNN compiles those at run time); none for other graphs."""
    if args[7] != "silu":
        return []
    tensors, conv = _split(args)
    description = plan_description(tensors, conv)
    function = f"{__name__}:serialized_plan"
    return [Request(function, (description, i), here=False, gpu=True) for i in range(RUNTIME_PLANS)]


FAMILY = KernelFamily(
    "cudnn_conv",
    conv_spec.CONV_OPS,
    OP,
    eligible,
    arguments,
    available,
    configs=(),
    tune=tune,
    compile_requests=compile_requests,
    triton=False,
)
