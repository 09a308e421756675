"""Kernel tactics: per convolution, one of kerasrt's kernels or Inductor's, chosen by timing
both on the device, as TensorRT times its tactics; choices cached on disk by environment.

For each eligible ``conv`` or ``conv_fused`` node (2-D, ungrouped, FP16/BF16; no activation,
ReLU, SiLU or a two-sided clamp such as ReLU6) the candidates are cuDNN's execution plans
(up to ``MAX_PLANS``) for conv + residual + bias + activation in one kernel, against what
Inductor runs: the same convolution followed by one memory-bound epilogue pass (timed as the
bare convolution plus an elementwise pass of the same traffic); 1x1 stride-1 convolutions
also have the pointwise Triton kernel's tile shapes (``pointwise_conv.CONFIGS``), which win
where cuDNN only has runtime-compiled kernels (ReLU6, SiLU), image stems (few input
channels) the stem Triton kernel's (``stem_conv.CONFIGS``), and convolutions over 16k input
channels the split-K Triton kernel's (``splitk_conv.CONFIGS``), which wins where the output
has too few tiles to fill the GPU (late layers at batch 1). For each depthwise conv the
candidates are the Triton kernel's tile shapes (``depthwise_conv.CONFIGS``), against the
zero padding materialized, cuDNN's depthwise conv and an epilogue pass. Times are device
times of CUDA-graph replays (the programs that use these kernels replay as CUDA graphs), so
host overhead does not decide. A choice is keyed by the operands' shapes, strides and
attributes and by the environment (GPU, torch, Triton, cuDNN, graph and candidate versions), and kept in
``tactics-<env>.json`` under ``kerasrt.cache.cache_dir()``: a second build on the same
machine measures nothing. Artifacts carry the choices of their engines (``remember``).
After these per-convolution choices, ``merges`` times merged kernels for neighbouring
convolutions against the sum of the two chosen kernels, and keeps its choices in the same
table.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from kerasrt import cache
from kerasrt.backend import (
    compile_pool,
    cudnn_conv,
    depthwise_conv,
    op_library,
    pointwise_conv,
    splitk_conv,
    stem_conv,
    triton_configs,
)
from kerasrt.backend.aoti import engine_environment
from kerasrt.errors import ConversionError
from kerasrt.ir.graph import Node, Value, torch_dtype

log = logging.getLogger(__name__)

MAX_PLANS = 32  # cuDNN plans timed per convolution, at most
CANDIDATES_VERSION = 4
"""Bumped whenever the candidate kernels or config lists change (indices measured for
another set are void)."""
RUNTIME_PLANS = 12
"""cuDNN plans of a conv + bias + SiLU graph built in compile workers (cuDNN compiles each at
run time, about 0.3 s; the fastest was among the first 6 in EfficientNetB0's)."""
PLAN_BUILD_BUDGET_S = 2.0
"""Stop trying further plans of one convolution once building its plans took this long:
precompiled kernels build in milliseconds, runtime-compiled ones (NVRTC) ~0.5 s each."""


@dataclass
class Choice:
    """The kernel for one convolution signature: "cudnn", "triton" (the depthwise Triton kernel,
    or for other convolutions the pointwise or stem one: ``triton_kernel``), "splitk" (the
    split-K Triton kernel) or "inductor"; with what the timing found: the best cuDNN plan
    (index in cuDNN's list, its workspace) and the best config of each Triton kernel (index in
    its ``CONFIGS``), whichever kernel won. A merged pair of convolutions (``merges``) has
    "triton" (its merged kernel, ``config``) or "apart", with ``apart_ms`` the two
    convolutions' own kernels' time."""

    kernel: str
    plan: int = 0
    cudnn_ms: float | None = None
    inductor_ms: float | None = None
    workspace_bytes: int = 0
    triton_ms: float | None = None
    config: int = 0
    splitk_ms: float | None = None
    splitk_config: int = 0
    apart_ms: float | None = None

    @property
    def ms(self) -> float | None:
        """The device ms of the chosen kernel, where it was timed."""
        timed = {
            "cudnn": self.cudnn_ms,
            "triton": self.triton_ms,
            "splitk": self.splitk_ms,
            "inductor": self.inductor_ms,
            "apart": self.apart_ms,
        }
        return timed.get(self.kernel)

    def own_kernel(self) -> Choice:
        """This choice with the faster of kerasrt's own kernels (``conv_kernels="cudnn"``)."""
        timed = (("cudnn", self.cudnn_ms), ("triton", self.triton_ms), ("splitk", self.splitk_ms))
        own = {k: ms for k, ms in timed if ms is not None}
        if not own:
            return self
        return replace(self, kernel=min(own, key=own.__getitem__))


def environment(device: torch.device) -> dict[str, str]:
    """What tactic choices are valid for: the engine environment plus the cuDNN version."""
    return {
        **engine_environment(device),
        "cudnn": cudnn_conv.cudnn_version(),
        "cudnn_graph": str(cudnn_conv.GRAPH_VERSION),
        "candidates": str(CANDIDATES_VERSION),
    }


def _env_key(env: dict[str, str]) -> str:
    return hashlib.sha1(json.dumps(env, sort_keys=True).encode()).hexdigest()[:12]


_TABLES: dict[str, dict[str, Choice]] = {}  # env key -> signature -> choice


def choice_table(env: dict[str, str]) -> dict[str, Choice]:
    """The choices measured for ``env`` (signature -> choice), read from the cache once."""
    key = _env_key(env)
    if key not in _TABLES:
        stored = cache.read_json(f"tactics-{key}.json")
        table: dict[str, Choice] = {}
        if isinstance(stored, dict) and stored.get("environment") == env:
            try:
                table = {sig: Choice(**c) for sig, c in stored["choices"].items()}
            except (TypeError, KeyError, AttributeError) as exc:
                log.warning("ignoring a tactic cache of another format (%s)", exc)
        _TABLES[key] = table
    return _TABLES[key]


def persist(env: dict[str, str]) -> None:
    """Write ``env``'s choices to the cache (atomically)."""
    data = {"environment": env, "choices": {s: asdict(c) for s, c in choice_table(env).items()}}
    cache.write_json(f"tactics-{_env_key(env)}.json", data)


def remember(choices: dict[str, dict], env: dict[str, str]) -> None:
    """Adopt choices made on an identical environment (an artifact's: its compiled engines
    were built with them, so they win over this machine's cache)."""
    table = choice_table(env)
    for sig, data in choices.items():
        table[sig] = Choice(**data)


def adopt(choices: dict[str, Choice]) -> None:
    """Run the convolutions of engines built earlier with the plans they were timed with."""
    for sig, choice in choices.items():
        select(sig, choice)


def select(sig: str, choice: Choice) -> None:
    """Make the op of ``choice.kernel`` run its plan/config for ``sig``."""
    if choice.kernel == "cudnn":
        cudnn_conv.choose_plan(sig, choice.plan)
    elif choice.kernel == "triton":  # a depthwise, pointwise or stem kernel, by its key
        triton_configs.choose(sig, choice.config)
    elif choice.kernel == "splitk":
        triton_configs.choose(sig, choice.splitk_config)


# -- which nodes ----------------------------------------------------------------------------------


def eligible(node: Node) -> bool:
    """Whether ``node`` is a convolution cuDNN can fuse with its epilogue."""
    return cudnn_conv.fusable(node) and node.attrs.get("groups", 1) == 1


def example_operands(node: Node, device: torch.device) -> cudnn_conv.Operands:
    """Operands shaped and laid out as the engine passes them (channels-last activations)."""
    cl = torch.channels_last
    dtype = torch_dtype(node.inputs[0].dtype)
    bias_value, residual_value = cudnn_conv.epilogue_values(node)
    n, c, h, wd = node.inputs[0].shape
    x = torch.randn((n, cudnn_conv.input_channels(c), h, wd), device=device, dtype=dtype)
    x = x.contiguous(memory_format=cl)
    w = cudnn_conv.op_weight(node.inputs[1].data.to(device))
    bias = bias_value.data.to(device) if bias_value is not None else None
    residual = None
    if residual_value is not None:
        residual = torch.randn(residual_value.shape, device=device, dtype=dtype).contiguous(memory_format=cl)
    stride, padding, dilation, _, _ = cudnn_conv.op_arguments(node)
    return cudnn_conv.Operands(x, w, bias, residual, cudnn_conv.empty_output(x, w, stride, padding, dilation))


# -- timing --------------------------------------------------------------------------------------


def device_ms(fn: Callable[[], object], repeat: int = 10, replays: int = 5) -> float:
    """Device time of one ``fn()`` call: ``repeat`` calls captured in a CUDA graph, replayed,
    timed with CUDA events; the best of ``replays``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            fn()
    graph.replay()
    best = float("inf")
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / repeat)
    return best


def inductor_estimate_ms(node: Node, ops: cudnn_conv.Operands) -> float:
    """The bare convolution plus, when there is an epilogue, one elementwise pass with its
    memory traffic (read the conv output and the residual, write the result)."""
    stride, padding, dilation, act, _ = cudnn_conv.op_arguments(node)
    epilogue = ops.bias is not None or ops.residual is not None or act != "none"
    z = torch.empty_like(ops.out)
    other = ops.residual if ops.residual is not None else ops.out[:1]

    def run() -> None:
        y = cudnn_conv.reference(ops.x, ops.w, None, None, stride, padding, dilation, "none", [])
        if epilogue:
            torch.add(y, other, out=z)

    return device_ms(run)


def best_config(
    configs: Sequence[tuple], run: Callable[[tuple], None], what: object
) -> tuple[int, float] | None:
    """(index, device ms) of the fastest of ``configs`` run as ``run(config)``, or None when
    none compiles and runs."""
    best: tuple[int, float] | None = None
    for index, config in enumerate(configs):
        try:
            ms = device_ms(lambda config=config: run(config))
        except Exception as exc:  # a config that does not compile or run is no candidate
            log.debug("Triton config %s of %s failed: %s", config, what, exc)
            continue
        if best is None or ms < best[1]:
            best = (index, ms)
    return best


def measure_cudnn(
    node: Node, ops: cudnn_conv.Operands, prebuilt: dict[int, str] | None = None
) -> tuple[int, float, cudnn_conv.Plan] | None:
    """(best plan index, its time, the built plan) of the fused cuDNN graph of ``node`` on
    ``ops`` (``fastest_plan``; ``prebuilt``: plans built in workers), or None."""
    return fastest_plan(ops, *cudnn_conv.op_arguments(node), what=node, prebuilt=prebuilt)


def fastest_plan(
    ops: cudnn_conv.Operands,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    activation: str,
    clip: Sequence[float],
    what: object = "a convolution",
    heuristics: Sequence[str] = cudnn_conv.HEURISTICS,
    max_plans: int = MAX_PLANS,
    build_budget_s: float = PLAN_BUILD_BUDGET_S,
    prebuilt: dict[int, str] | None = None,
) -> tuple[int, float, cudnn_conv.Plan] | None:
    """(best plan index, its time, the built plan) over cuDNN's listed plans for the fused
    convolution (up to ``max_plans``, within ``build_budget_s`` of building), or None.
    ``prebuilt``: plans serialized by compile workers, by index; when any of them runs,
    those are the candidates and nothing is built here."""
    try:
        g, uids, handle = cudnn_conv.build_graph(
            ops, stride, padding, dilation, activation, clip, heuristics=heuristics
        )
    except Exception as exc:  # cuDNN has no engine for this graph
        log.info("cuDNN cannot fuse %s: %s", what, exc)
        return None
    if prebuilt:
        found = _fastest_prebuilt(ops, cudnn_conv.uid_numbers(uids), prebuilt, what)
        if found is not None:
            return found
    pack = ops.pack(uids)
    frontend = cudnn_conv.frontend()
    best: tuple[int, float] | None = None
    building = 0.0
    for index in range(min(max_plans, g.get_execution_plan_count())):
        if best is not None and building > build_budget_s:
            break
        try:
            begin = time.perf_counter()
            g.build_plan_at_index(index)
            building += time.perf_counter() - begin
            workspace = torch.empty(max(g.get_workspace_size(), 1), dtype=torch.uint8, device=ops.x.device)

            def run(index: int = index, workspace: torch.Tensor = workspace) -> None:
                frontend.set_stream(handle, torch.cuda.current_stream().cuda_stream)
                g.execute_plan_at_index(pack, workspace, index, handle=handle)

            ms = device_ms(run)
        except Exception as exc:  # a plan that does not build or run is not a candidate
            log.debug("cuDNN plan %d of %s failed: %s", index, what, exc)
            continue
        if best is None or ms < best[1]:
            best = (index, ms)
    if best is None:
        return None
    g.build_plan_at_index(best[0])
    return best[0], best[1], cudnn_conv.Plan(g, uids, g.get_workspace_size(), handle)


def _fastest_prebuilt(
    ops: cudnn_conv.Operands, uids: dict[str, int], prebuilt: dict[int, str], what: object
) -> tuple[int, float, cudnn_conv.Plan] | None:
    """``fastest_plan`` over plans that workers built and serialized."""
    best: tuple[int, float, cudnn_conv.Plan] | None = None
    for index, blob in sorted(prebuilt.items()):
        try:
            plan = cudnn_conv.deserialized_plan(blob, uids, ops.x.device)
            ms = device_ms(functools.partial(plan.run, ops))
        except Exception as exc:  # a plan that does not load or run is not a candidate
            log.debug("cuDNN plan %d of %s (built in a worker) failed: %s", index, what, exc)
            continue
        if best is None or ms < best[1]:
            best = (index, ms, plan)
    return best


def depthwise_operands(node: Node, x: Value, padding: list[int], device: torch.device) -> cudnn_conv.Operands:
    """Operands of a depthwise op call as the engine makes it (``x`` may be a folded pad's input)."""
    dtype = torch_dtype(node.inputs[0].dtype)
    xt = torch.randn(x.shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = node.inputs[1].data.to(device).contiguous()
    bias = node.inputs[2].data.to(device) if len(node.inputs) > 2 else None
    stride, _, _ = depthwise_conv.op_arguments(node)
    return cudnn_conv.Operands(xt, w, bias, None, depthwise_conv.empty_output(xt, w, stride, padding))


def depthwise_signature(node: Node, ops: cudnn_conv.Operands, padding: list[int]) -> str:
    """The key of a depthwise op call, as the op computes it at run time."""
    stride, act, clip = depthwise_conv.op_arguments(node)
    return depthwise_conv.signature(ops.x, ops.w, ops.bias, stride, padding, act, clip)


def depthwise_candidates(node: Node, ops: cudnn_conv.Operands, padding: list[int]) -> Candidates:
    """The depthwise Triton kernel's configs, and a launch of one config on ``ops``."""
    stride, act, clip = depthwise_conv.op_arguments(node)

    def launch(config: tuple) -> None:
        depthwise_conv.launch(config, ops.x, ops.w, ops.bias, ops.out, stride, padding, act, clip)

    return {"triton": (depthwise_conv.CONFIGS, launch)}


def measure_depthwise(node: Node, ops: cudnn_conv.Operands, padding: list[int], mode: str) -> Choice:
    """The fastest Triton tile config and, in "auto", Inductor's way: materialize the zero
    padding, cuDNN's depthwise conv, one epilogue pass (bias + activation)."""
    stride, _, _ = depthwise_conv.op_arguments(node)
    best = best_config(*depthwise_candidates(node, ops, padding)["triton"], node)
    top, bottom, left, right = padding
    symmetric = top == bottom and left == right
    z = torch.empty_like(ops.out)

    def unfused() -> None:
        x = ops.x if symmetric else torch.nn.functional.pad(ops.x, [left, right, top, bottom])
        pad = [top, left] if symmetric else [0, 0]
        y = torch.convolution(x, ops.w, None, stride, pad, [1, 1], False, [0, 0], ops.x.shape[1])
        torch.add(y, ops.out, out=z)

    inductor_ms = round(device_ms(unfused), 5) if mode == "auto" else None
    if best is None:
        return Choice("inductor", inductor_ms=inductor_ms)
    faster = inductor_ms is None or best[1] < inductor_ms
    return Choice(
        "triton" if faster else "inductor",
        inductor_ms=inductor_ms,
        triton_ms=round(best[1], 5),
        config=best[0],
    )


# -- choosing -------------------------------------------------------------------------------------


def choose(
    nodes: Sequence[Node],
    device: torch.device,
    mode: str,
    progress: Callable[[str], None] | None = None,
) -> dict[int, tuple[str, Choice]]:
    """Kernel choices for the eligible convolutions among ``nodes``, by ``id(node)``:
    (signature, choice). "inductor" chooses nothing; "cudnn" takes kerasrt's kernels (fused
    cuDNN graphs, the Triton pointwise and depthwise kernels; the faster of two) wherever
    they run; "auto" times them against Inductor's way and takes the fastest. ``progress``
    hears of the compiling and timing, which takes minutes for some models' first build."""
    if mode == "inductor":
        return {}
    convs = [n for n in nodes if eligible(n)]
    depthwise = [n for n in nodes if depthwise_conv.eligible(n)] if depthwise_conv.available(device) else []
    if convs and not cudnn_conv.available(device):
        if mode == "cudnn":
            raise ConversionError(
                "conv_kernels='cudnn' needs a CUDA device and the nvidia-cudnn-frontend package "
                "(pip install 'kerasrt[cuda]')"
            )
        # without cuDNN graphs many convolutions still have kerasrt's Triton kernels
        convs = [n for n in convs if triton_kernel(n, device) is not None or splitk_eligible(n, device)]
    if not (convs or depthwise):
        return {}
    env = environment(device)
    table = choice_table(env)
    entries = [_conv_entry(node, device, mode) for node in convs]
    entries += [_depthwise_entry(node, nodes, device, mode) for node in depthwise]
    stale = {e.sig: e for e in entries if e.stale(table.get(e.sig))}
    say = progress or (lambda _message: None)
    if stale:
        say(f"compiling kernel candidates for {len(stale)} convolution shape(s)")
    plans = {
        sig: _plan_requests(e.node, device) for sig, e in stale.items() if _runtime_compiled(e.node, device)
    }
    built = precompile(
        [(e.candidates, e.operands) for e in stale.values()], device, [r for rs in plans.values() for r in rs]
    )
    chosen: dict[int, tuple[str, Choice]] = {}
    timed = 0
    for e in entries:
        choice = table.get(e.sig)
        if e.stale(choice):
            timed += 1
            say(f"timing kernels for convolution shape {timed} of {len(stale)}")
            prebuilt = {i: built[r] for i, r in enumerate(plans.get(e.sig, ())) if built.get(r)}
            choice = table[e.sig] = e.measure(e.operands(), prebuilt)
        if mode == "cudnn":
            choice = choice.own_kernel()
        select(e.sig, choice)
        chosen[id(e.node)] = (e.sig, choice)
    if stale:
        log.info("timed kernel tactics for %d convolution(s)", len(stale))
        persist(env)
    return chosen


@dataclass(frozen=True)
class _Entry:
    """An eligible convolution as ``choose`` handles it: its signature (the table's key), its
    operands made on the device (only when there is timing to do), its timing (given the
    cuDNN plans workers built for it, by index), its Triton candidates, and whether a
    cached choice (None: none) must be timed (again)."""

    node: Node
    sig: str
    operands: Callable[[], cudnn_conv.Operands]
    measure: Callable[[cudnn_conv.Operands, dict[int, str]], Choice]
    candidates: Callable[[cudnn_conv.Operands], Candidates]
    stale: Callable[[Choice | None], bool]


def _conv_entry(node: Node, device: torch.device, mode: str) -> _Entry:
    sig = cudnn_conv.signature(example_operands(node, torch.device("meta")), *cudnn_conv.op_arguments(node))
    return _Entry(
        node,
        sig,
        functools.partial(example_operands, node, device),
        functools.partial(_measure, node, sig=sig, mode=mode),
        functools.partial(triton_candidates, node),
        # "auto" also needs Inductor's estimate, which a choice made in "cudnn" mode lacks
        lambda c: c is None or (mode == "auto" and c.inductor_ms is None and c.cudnn_ms is not None),
    )


def _depthwise_entry(node: Node, nodes: Sequence[Node], device: torch.device, mode: str) -> _Entry:
    x, padding = depthwise_conv.ir_call(node, nodes)
    sig = depthwise_signature(node, depthwise_operands(node, x, padding, torch.device("meta")), padding)
    return _Entry(
        node,
        sig,
        functools.partial(depthwise_operands, node, x, padding, device),
        lambda ops, _prebuilt: measure_depthwise(node, ops, padding, mode),
        functools.partial(depthwise_candidates, node, padding=padding),
        lambda c: c is None or (mode == "auto" and c.inductor_ms is None),
    )


def triton_kernel(node: Node, device: torch.device) -> Any:
    """The module of the Triton kernel that can run the convolution ``node`` on ``device``
    (``pointwise_conv`` for 1x1 convolutions, ``stem_conv`` for image stems), or None."""
    for module in (pointwise_conv, stem_conv):
        if module.eligible(node) and module.available(device):
            return module
    return None


def splitk_eligible(node: Node, device: torch.device) -> bool:
    """Whether the split-K Triton kernel can run the convolution ``node`` on ``device``."""
    return splitk_conv.eligible(node) and splitk_conv.available(device)


Candidates = dict[str, tuple[Sequence[tuple], Callable[[tuple], None]]]


def triton_candidates(node: Node, ops: cudnn_conv.Operands) -> Candidates:
    """kerasrt's Triton kernels that can run the convolution ``node``, by tactic ("triton": the
    pointwise or stem kernel; "splitk"): their configs, and a launch of one config on ``ops``."""
    device = ops.x.device
    stride, padding, _, act, clip = cudnn_conv.op_arguments(node)
    found: Candidates = {}
    module = triton_kernel(node, device)
    if module is pointwise_conv:
        found["triton"] = (
            module.CONFIGS,
            lambda config: module.launch(config, ops.x, ops.w, ops.bias, ops.residual, ops.out, act, clip),
        )
    elif module is stem_conv:
        found["triton"] = (
            module.CONFIGS,
            lambda config: module.launch(config, ops.x, ops.w, ops.bias, ops.out, stride, padding, act, clip),
        )
    if splitk_eligible(node, device):

        def split(config: tuple) -> None:
            if not splitk_conv.splits_as_configured(config, ops.out.shape):
                raise ValueError("too many output tiles to split")  # (skipped, not timed)
            splitk_conv.launch(
                config, ops.x, ops.w, ops.bias, ops.residual, ops.out, stride, padding, act, clip
            )

        found["splitk"] = (splitk_conv.CONFIGS, split)
    return found


PrecompileJob = tuple[Callable[[Any], Candidates], Callable[[], Any]]
"""(a convolution's Triton candidates on given operands, a function making its operands)."""


def precompile(
    jobs: Sequence[PrecompileJob], device: torch.device, requests: Sequence[compile_pool.Request] = ()
) -> dict[compile_pool.Request, Any]:
    """Compile the Triton candidates of convolutions before the tactics time them one at a
    time (``PrecompileJob``: the operands are made only in the job), and do the other
    compile ``requests`` (cuDNN plans to build) alongside. A cold build compiles dozens to
    hundreds of configs (67 kernels for ResNet50, 231 for EfficientNetB0), each a few
    hundred ms: the launches are collected here, without compiling, and compiled in worker
    processes (``compile_pool``). Returns the results of ``requests`` that were done.
    Failures are left for the timing to meet (a config that does not compile is no
    candidate)."""
    if device.type != "cuda" or op_library.triton_kernels() is None or not (jobs or requests):
        return {}

    def launch(job: PrecompileJob) -> None:
        candidates, operands = job
        with torch.cuda.device(device), op_library.precompiling():
            for configs, run in candidates(operands()).values():
                for config in configs:
                    try:
                        run(config)
                    except Exception as exc:
                        log.debug("launching Triton config %s to compile it failed: %s", config, exc)

    started = time.perf_counter()
    if not compile_pool.supported():  # an older Triton: the launches compile, in threads
        if jobs:
            with concurrent.futures.ThreadPoolExecutor(min(compile_pool.THREADS, len(jobs))) as pool:
                list(pool.map(launch, jobs))
        log.info(
            "compiled the Triton candidates of %d convolution(s) in %.1f s",
            len(jobs),
            time.perf_counter() - started,
        )
        return {}
    kernels = compile_pool.collect(lambda: [launch(job) for job in jobs])
    results, workers = compile_pool.compile_requests([*requests, *kernels])
    log.info(
        "compiled %d Triton kernel(s) for %d convolution(s) and did %d of %d other request(s) in %.1f s "
        "(%d worker process(es))",
        len(kernels),
        len(jobs),
        sum(r in results for r in requests),
        len(requests),
        time.perf_counter() - started,
        workers,
    )
    return {r: results[r] for r in requests if r in results}


def _runtime_compiled(node: Node, device: torch.device) -> bool:
    """Whether cuDNN compiles the plans of the fused graph of ``node`` at run time (conv +
    bias + SiLU has no precompiled kernel): those are built in compile workers."""
    return eligible(node) and cudnn_conv.op_arguments(node)[3] == "silu" and cudnn_conv.available(device)


def _plan_requests(node: Node, device: torch.device) -> list[compile_pool.Request]:
    """Compile-worker requests for the first ``RUNTIME_PLANS`` cuDNN plans of ``node``'s graph
    (an index past cuDNN's list fails in the worker and is not a candidate)."""
    ops = example_operands(node, torch.device("meta"))  # shapes and strides only
    description = cudnn_conv.plan_description(ops, *cudnn_conv.op_arguments(node), device=device)
    function = f"{cudnn_conv.__name__}:serialized_plan"
    return [
        compile_pool.Request(function, (description, i), here=False, gpu=True) for i in range(RUNTIME_PLANS)
    ]


def _measure(
    node: Node, ops: cudnn_conv.Operands, prebuilt: dict[int, str] | None = None, *, sig: str, mode: str
) -> Choice:
    """cuDNN's best plan (among ``prebuilt`` where workers built them), for 1x1 convolutions
    and stems a Triton kernel's best config, the split-K kernel's best config, and in "auto"
    Inductor's estimate: the fastest wins."""
    found = measure_cudnn(node, ops, prebuilt) if cudnn_conv.available(ops.x.device) else None
    cudnn_ms = None
    if found is not None:
        index, cudnn_ms, plan = found
        cudnn_conv.adopt_plan(sig, index, plan)
    timed = {
        name: best_config(configs, run, node) for name, (configs, run) in triton_candidates(node, ops).items()
    }
    triton, splitk = timed.get("triton"), timed.get("splitk")
    inductor_ms = inductor_estimate_ms(node, ops) if mode == "auto" else None
    timings = {
        "cudnn": cudnn_ms,
        "triton": triton and triton[1],
        "splitk": splitk and splitk[1],
        "inductor": inductor_ms,
    }
    kernel = min(
        (k for k, ms in timings.items() if ms is not None), key=timings.__getitem__, default="inductor"
    )
    return Choice(
        kernel,
        found[0] if found is not None else 0,
        cudnn_ms and round(cudnn_ms, 5),
        inductor_ms and round(inductor_ms, 5),
        found[2].workspace if found is not None else 0,
        triton and round(triton[1], 5),
        triton[0] if triton is not None else 0,
        splitk and round(splitk[1], 5),
        splitk[0] if splitk is not None else 0,
    )
