"""The torch backend: an IR segment becomes a torch.fx program calling each op's impl.

Constants become buffers of the program, moved to the target device once at build time.
The program is a plain ``torch.fx.GraphModule``, which TorchInductor can compile later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.fx

from kerasrt import cache
from kerasrt.backend import (
    aoti,
    cudnn_conv,
    depthwise_conv,
    merges,
    op_library,
    pointwise_conv,
    splitk_conv,
    stem_conv,
)
from kerasrt.ir.graph import Node, Value, torch_dtype
from kerasrt.ir.ops import OPS
from kerasrt.partition import Support

cache.share_with_triton()  # before any Inductor compile: converting and loading processes agree


@contextlib.contextmanager
def inductor_compiling() -> Iterator[None]:
    """The setting every Inductor compile of an engine runs in: kerasrt's ops registered
    with Inductor (``declare_fallbacks``), and the compile in this process. Inductor starts a
    pool of worker processes at its first compile otherwise, one per core, each importing
    torch, for the few Triton kernels of an engine whose heavy layers are kerasrt's own
    kernels (ResNet50's engine compiles 7 of them in 0.8 s in process on the H100 machine)."""
    from torch._inductor import config

    declare_fallbacks()
    with config.patch(compile_threads=1):
        yield


def declare_fallbacks() -> None:
    """Register kerasrt's ops with Inductor as fallback kernels (called as they are), each
    with the layout constraint Inductor gives an op it meets unregistered. Inductor would
    register them itself at their first use, but logs that first call with every argument
    printed, and torch 2.11 builds the text even with the log off: an argument prints the
    IR of everything upstream of it. On the H100 machine that took 107-146 s of ResNet50's
    first engine compile in 5 of 11 cold builds (``python bench/build_phases.py``, sampled
    with ``SAMPLE_EVERY``)."""
    try:
        from torch._inductor.lowering import lowerings, make_fallback, tag_to_layout_constraint
        from torch._library.utils import get_layout_constraint_tag
    except ImportError:  # a torch without these: Inductor registers the ops at first use
        return
    for name in op_library.NAMES:
        op = getattr(torch.ops.kerasrt, name).default
        if op not in lowerings:
            tag = get_layout_constraint_tag(op, with_default=True)
            make_fallback(op, layout_constraint=tag_to_layout_constraint(tag))


def is_supported(node: Node) -> Support:
    """Whether the torch backend can run ``node`` inside an engine."""
    opdef = OPS.get(node.op)
    if opdef is None:
        return Support(False, f"unknown op {node.op}")
    if opdef.category == "fallback":
        return Support(False, str(node.attrs.get("reason", "runs in Keras")))
    return Support(True)


@contextlib.contextmanager
def precision_scope(device: torch.device, precision: str) -> Iterator[None]:
    """Make CUDA math honour the engine precision: TF32 tensor-core shortcuts (on by default for
    cuDNN convolutions) are on only for TF32 engines; float32 everywhere else is IEEE."""
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "TF32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _ident(name: str) -> str:
    return "c_" + re.sub(r"\W", "_", name)


@dataclasses.dataclass(frozen=True)
class _GraphOperands:
    """A convolution's operands as values of the fx graph being built (``arg``), made when
    read: a merged call reads only some of its convolutions' operands. The fields of
    ``cudnn_conv.Operands`` but its output."""

    node: Node
    arg: Callable[..., torch.fx.Node]

    @property
    def x(self) -> torch.fx.Node:
        return self.arg(self.node.inputs[0])

    @property
    def w(self) -> torch.fx.Node:
        return self.arg(self.node.inputs[1], True)

    @property
    def bias(self) -> torch.fx.Node | None:
        value = cudnn_conv.epilogue_values(self.node)[0]
        return None if value is None else self.arg(value)

    @property
    def residual(self) -> torch.fx.Node | None:
        value = cudnn_conv.epilogue_values(self.node)[1]
        return None if value is None else self.arg(value)


def _fused_conv_call(
    node: Node, kernel: str, graph: torch.fx.Graph, arg: Callable[..., torch.fx.Node]
) -> torch.fx.Node:
    """The op call of a conv or conv_fused node on kerasrt's cuDNN graphs (``kernel`` "cudnn")
    or a Triton kernel ("triton": the pointwise kernel for a 1x1 convolution, else the stem
    kernel; "splitk": the split-K kernel). Input channels are padded as the ops take them: a
    pad Inductor fuses into the kernel producing the input."""
    operands = _GraphOperands(node, arg)
    bias, residual, x = operands.bias, operands.residual, operands.x
    channels = node.inputs[0].shape[1]
    if cudnn_conv.input_channels(channels) != channels:
        extra = cudnn_conv.input_channels(channels) - channels
        x = graph.call_function(torch.ops.aten.constant_pad_nd.default, (x, [0, 0, 0, 0, 0, extra]))
    stride, padding, dilation, act, clip = cudnn_conv.op_arguments(node)
    w = operands.w
    if kernel == "triton" and pointwise_conv.eligible(node):
        return graph.call_function(
            torch.ops.kerasrt.pointwise_conv.default, (x, w, bias, residual, act, clip)
        )
    if kernel == "triton" and stem_conv.eligible(node):
        return graph.call_function(
            torch.ops.kerasrt.stem_conv.default, (x, w, bias, stride, padding, act, clip)
        )
    if kernel == "splitk" and splitk_conv.eligible(node):
        return graph.call_function(
            torch.ops.kerasrt.splitk_conv.default, (x, w, bias, residual, stride, padding, act, clip)
        )
    if kernel in ("triton", "splitk"):
        raise ValueError(f"no {kernel} kernel runs {node}")
    args = (x, w, bias, residual, stride, padding, dilation, act, clip)
    return graph.call_function(torch.ops.kerasrt.cudnn_conv.default, args)


def _merged_call(
    merge: merges.Merge,
    graph: torch.fx.Graph,
    arg: Callable[..., torch.fx.Node],
    constant: Callable[[str, torch.Tensor], torch.fx.Node],
) -> list[tuple[Node, torch.fx.Node]]:
    """The op call of merged convolutions (``merges``): (node, fx value) for each whose output
    the call makes. A pair's call returns the lead's output and writes the absorbed one's over
    the first product's input (its fx value from then on)."""
    lead = merge.lead
    args = merges.op_arguments(
        merge,
        lambda node: _GraphOperands(node, arg),
        lambda bias: constant(lead.outputs[0].name + "_dual_bias", bias),
    )
    if merge.kind == "dual":
        return [(lead, graph.call_function(torch.ops.kerasrt.dual_conv.default, args))]
    return [
        (lead, graph.call_function(torch.ops.kerasrt.pointwise_pair.default, args)),
        (merge.absorbed, args[0]),
    ]


class TorchEngine:
    """A compiled segment: call with the segment's input tensors, get its outputs.

    ``compiler="inductor"`` compiles the program with TorchInductor on its first call (static
    shapes, weights frozen into the compiled code's constants); "eager" runs it op by op;
    ``package`` runs an AOTInductor package made earlier by ``export_package`` instead.
    """

    def __init__(
        self,
        nodes: Sequence[Node],
        inputs: Sequence[Value],
        outputs: Sequence[Value],
        device: torch.device,
        compiler: str = "eager",
        autotune: bool = False,
        package: Path | None = None,
        kernel_convs: Mapping[int, str] | None = None,
    ):
        """``kernel_convs``: the convolutions to run on kerasrt's own kernels, by node id: "cudnn"
        (fused cuDNN graphs), "triton" (the pointwise or stem Triton kernel) or "splitk"; a
        depthwise convolution listed runs on the depthwise Triton kernel; two merged
        convolutions (``merges``) have "<kind>:<the other's output name>" on the one that runs
        them and ``merges.ABSORBED`` on the other."""
        kernel_convs = kernel_convs or {}
        self.device = device
        self.compiler = compiler
        self.autotune = autotune
        self.input_types = [(tuple(v.shape), v.dtype) for v in inputs]
        root = torch.nn.Module()
        graph = torch.fx.Graph()
        env: dict[tuple[int, bool], torch.fx.Node] = {}  # (value, as a cuDNN weight) -> fx node
        for i, value in enumerate(inputs):
            env[(id(value), False)] = graph.placeholder(f"in{i}")

        def arg(value: Value, cudnn_weight: bool = False) -> torch.fx.Node:
            """The fx node of ``value``; constants become buffers (for cuDNN convolution
            weights: as the op takes them, see ``cudnn_conv.op_weight``)."""
            key = (id(value), cudnn_weight)
            if key not in env:
                if not value.is_constant:
                    raise ValueError(f"segment reads {value.name} without it being an input")
                name = _ident(value.name) + ("_cl" if cudnn_weight else "")
                data = value.data.to(device)
                if cudnn_weight:
                    data = cudnn_conv.op_weight(data)
                root.register_buffer(name, data, persistent=False)
                env[key] = graph.get_attr(name)
            return env[key]

        def constant(name: str, data: torch.Tensor) -> torch.fx.Node:
            """A tensor made at build time (no IR value) as a buffer of the program."""
            root.register_buffer(_ident(name), data.to(device), persistent=False)
            return graph.get_attr(_ident(name))

        by_output = {n.outputs[0].name: n for n in nodes}
        self.kernel_convs = 0
        for node in nodes:
            kernel = kernel_convs.get(id(node))
            merged = merges.parse(kernel) if kernel is not None else None
            if kernel == merges.ABSORBED:
                self.kernel_convs += 1
                continue  # its merge partner's call computes it
            if merged is not None:
                kind, partners = merged
                missing = [name for name in partners if name not in by_output]
                if missing:
                    raise ValueError(f"{node} is merged with {missing}, not in its engine")
                *inner, absorbed = (by_output[name] for name in partners)
                merge = merges.Merge(kind, node, absorbed, inner[0] if inner else None)
                for done, value in _merged_call(merge, graph, arg, constant):
                    env[(id(done.outputs[0]), False)] = value
                self.kernel_convs += 1
                continue
            if kernel is not None and depthwise_conv.eligible(node):
                x, padding = depthwise_conv.ir_call(node, nodes)
                stride, act, clip = depthwise_conv.op_arguments(node)
                bias = arg(node.inputs[2]) if len(node.inputs) > 2 else None
                result = graph.call_function(
                    torch.ops.kerasrt.depthwise_conv.default,
                    (arg(x), arg(node.inputs[1]), bias, stride, padding, act, clip),
                )
                self.kernel_convs += 1
            elif kernel is not None:
                result = _fused_conv_call(node, kernel, graph, arg)
                self.kernel_convs += 1
            else:
                args = tuple(arg(value) for value in node.inputs)
                result = graph.call_function(OPS[node.op].impl, args, dict(node.attrs))
            env[(id(node.outputs[0]), False)] = result
        graph.output(tuple(env[(id(v), False)] for v in outputs))
        self.module = torch.fx.GraphModule(root, graph)
        self.module.eval()
        self._run: Callable[..., tuple[torch.Tensor, ...]] = self.module
        self._uncompiled = package is None and compiler == "inductor"
        if package is not None:
            self.load_package(package)
        elif compiler == "inductor":
            self._run = torch.compile(
                self.module,
                fullgraph=True,
                dynamic=False,
                mode="max-autotune-no-cudagraphs" if autotune else None,
                options={"freezing": True},
            )
        elif compiler != "eager":
            raise ValueError(f"unknown engine compiler {compiler!r}")

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._uncompiled:  # the first call of an Inductor engine compiles it
            with inductor_compiling():
                outputs = self._run(*tensors)
            self._uncompiled = False
            return outputs
        return self._run(*tensors)

    def example_inputs(self) -> list[torch.Tensor]:
        """Inputs of the engine's shapes and dtypes (for ahead-of-time compilation)."""
        gen = torch.Generator().manual_seed(0)
        tensors = []
        for shape, dtype in self.input_types:
            t = torch_dtype(dtype)
            data = (
                torch.randn(shape, generator=gen).to(t)
                if t.is_floating_point
                else torch.zeros(shape, dtype=t)
            )
            tensors.append(data.to(self.device))
        return tensors

    def export_package(self, path: Path) -> str | None:
        """Compile the engine ahead of time with AOTInductor into a package at ``path``. The
        package holds code only: the weights stay in the artifact and are handed over at load.
        Returns the package's digest when it loaded in a test process here (``aoti.vouch``)."""
        with torch.no_grad(), inductor_compiling(), op_library.inlining_kernels():
            exported = torch.export.export(self.module, tuple(self.example_inputs()))
            aoti.compile_package(exported, path, weights_inside=False, autotune=self.autotune)
        problem = aoti.package_problem(path, self.device)  # tested now: loads here skip the test
        if problem is None:
            return aoti.package_digest(path)
        warnings.warn(
            f"the compiled engine package {path.name} cannot be used on this machine ({problem}); "
            "a load will compile the engine instead",
            stacklevel=2,
        )
        return None

    def load_package(self, path: Path) -> None:
        """Run the AOTInductor package at ``path`` from now on, on this engine's own weights
        (used in place, not copied). Raises RuntimeError when the package cannot be loaded here."""
        problem = aoti.package_problem(path, self.device)
        if problem is not None:
            raise RuntimeError(problem)
        runner = aoti.load_package(path, self.device)
        buffers = dict(self.module.named_buffers())
        runner.load_constants(
            {name: buffers[name] for name in runner.get_constant_fqns()},
            check_full_update=True,
            user_managed=True,
        )
        self._run = runner
        self.compiler = "package"
