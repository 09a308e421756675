"""The torch backend: an IR segment becomes a torch.fx program (an engine), compiled by
TorchInductor just in time or ahead of time (``aoti``).

Each node becomes one call: the op of the kernel family its ``attrs["kernel_choice"]`` names, with
the chosen config (``kerasrt.kernels``), or else its IR op's implementation, which Inductor
compiles. Constants become buffers of the program, moved to the target device once at build
time.
"""

from __future__ import annotations

import contextlib
import operator
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx

from kerasrt import cache
from kerasrt.backend import aoti
from kerasrt.compile.partition import Support
from kerasrt.ir import symbolic
from kerasrt.ir.graph import Node, Value, torch_dtype
from kerasrt.ir.ops import KERNEL, OPS
from kerasrt.kernels import op_library, registry
from kerasrt.tuning.choices import INDUCTOR

cache.share_with_triton()  # before any Inductor compile: converting and loading processes agree


@contextlib.contextmanager
def inductor_compiling() -> Iterator[None]:
    """The setting every Inductor compile of an engine runs in: kerasrt's ops registered
    with Inductor (``declare_fallbacks``), and the compile in this process. Inductor starts a
    pool of worker processes at its first compile otherwise, one per core, each importing
    torch, for the few Triton kernels of an engine whose heavy layers are kerasrt's own."""
    from torch._inductor import config

    declare_fallbacks()
    with config.patch(compile_threads=1):
        yield


def declare_fallbacks() -> None:
    """Register kerasrt's ops with Inductor as fallback kernels (called as they are), each
    with the layout constraint Inductor gives an op it meets unregistered. Inductor would
    register them itself at their first use, but logs that first call with every argument
    printed, and torch 2.11 builds the text even with the log off: an argument prints the
    IR of everything upstream of it, which took minutes of some cold builds."""
    try:
        from torch._inductor.lowering import lowerings, make_fallback, tag_to_layout_constraint
        from torch._library.utils import get_layout_constraint_tag
    except ImportError:  # a torch without these: Inductor registers the ops at first use
        return
    for op in registry.ops():
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


class GraphOperands:
    """``registry.Operands`` as values of the fx program being built: activations are the
    program's values, constants its buffers (moved to the device once, at build time)."""

    def __init__(self, graph: torch.fx.Graph, root: torch.nn.Module, device: torch.device):
        self.graph, self.root, self.device = graph, root, device
        self.env: dict[int, torch.fx.Node] = {}  # IR value id -> fx node
        self._buffers: dict[str, torch.fx.Node] = {}

    def __call__(self, value: Value) -> torch.fx.Node:
        if id(value) not in self.env:
            if not value.is_constant:
                raise ValueError(f"segment reads {value.name} without it being an input")
            self.env[id(value)] = self._buffer(_ident(value.name), lambda: value.data)
        return self.env[id(value)]

    def constant(self, prepare: Callable[..., torch.Tensor], *values: Value) -> torch.fx.Node:
        name = _ident("_".join(v.name for v in values) + "_" + prepare.__name__)
        return self._buffer(name, lambda: prepare(*(v.data for v in values)))

    def apply(self, fn: Callable[..., Any], *args: Any) -> torch.fx.Node:
        return self.graph.call_function(fn, args)

    def _buffer(self, name: str, make: Callable[[], torch.Tensor]) -> torch.fx.Node:
        if name not in self._buffers:
            self.root.register_buffer(name, make().to(self.device), persistent=False)
            self._buffers[name] = self.graph.get_attr(name)
        return self._buffers[name]


class _SymbolicSizes:
    """Sizes of an engine with symbolic shapes, as values of its fx program: each symbol is
    read off the first engine input that has it as a dimension (``aten.sym_size``), and an
    expression (``s0*12``) is computed from those, so Inductor sees how sizes relate."""

    def __init__(self, graph: torch.fx.Graph, inputs: Sequence[tuple[torch.fx.Node, Sequence[Any]]]):
        self.graph = graph
        self.where: dict[str, tuple[torch.fx.Node, int]] = {}
        for node, shape in inputs:
            for d, dim in enumerate(shape):
                if isinstance(dim, str) and symbolic.SYMBOL.fullmatch(dim):
                    self.where.setdefault(dim, (node, d))
        self._made: dict[str, Any] = {}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [self(v) for v in value]
        if not isinstance(value, str) or not symbolic.is_size_expression(value):
            return value
        if value not in self._made:
            missing = symbolic.symbols_of(value) - set(self.where)
            if missing:
                raise ValueError(
                    f"size {value} uses {sorted(missing)}, which no engine input has as a dimension"
                )
            read = {
                name: self.graph.call_function(torch.ops.aten.sym_size.int, (node, d))
                for name, (node, d) in self.where.items()
                if name in symbolic.symbols_of(value)
            }
            self._made[value] = symbolic.evaluate_with(value, read.__getitem__, self._emit)
        return self._made[value]

    def _emit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.graph.call_function(fn, args)


def kernel_family(node: Node) -> registry.KernelFamily | None:
    """The kerasrt kernel family chosen for ``node`` (``attrs["kernel_choice"]``), or None where it
    runs as Inductor compiles its IR op."""
    choice = node.attrs.get(KERNEL)
    if not choice or choice.get("kernel") == INDUCTOR:
        return None
    return registry.family(choice["kernel"])


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
    ):
        """Nodes with a kernel choice (``attrs["kernel_choice"]`` naming a family) run on that family's
        op with the chosen config; every other node runs its IR op's implementation."""
        self.device = device
        self.compiler = compiler
        self.autotune = autotune
        self.input_types = [(tuple(v.shape), v.dtype) for v in inputs]
        self.dynamic = not all(symbolic.is_static(v.shape) for v in [*inputs, *outputs])
        root = torch.nn.Module()
        graph = torch.fx.Graph()
        read = GraphOperands(graph, root, device)
        for i, value in enumerate(inputs):
            read.env[id(value)] = graph.placeholder(f"in{i}")
        sizes = _SymbolicSizes(graph, [(read.env[id(v)], v.shape) for v in inputs])
        view = registry.View(nodes, outputs)
        self.kernel_nodes = 0
        for node in nodes:
            family = kernel_family(node)
            if family is None:
                args = tuple(read(value) for value in node.inputs)
                dims = OPS[node.op].dim_attrs
                attrs = {k: sizes(v) if k in dims else v for k, v in node.attrs.items() if k != KERNEL}
                result = graph.call_function(OPS[node.op].impl, args, attrs)
                results = [result]
                if len(node.outputs) > 1:
                    results = [
                        graph.call_function(operator.getitem, (result, i)) for i in range(len(node.outputs))
                    ]
            else:
                args = family.arguments(node, read, view)
                call = graph.call_function(family.op, (*args, node.attrs[KERNEL]["config"]))
                results = family.results(call, args)
                self.kernel_nodes += 1
            for value, result in zip(node.outputs, results):
                read.env[id(value)] = result
        graph.output(tuple(read(v) for v in outputs))
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
                dynamic=self.dynamic,
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
        if self.dynamic:
            raise ValueError("an engine with symbolic sizes is compiled when loaded, not packaged")
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
