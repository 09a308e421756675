"""The torch backend: an IR segment becomes a torch.fx program calling each op's impl.

Constants become buffers of the program, moved to the target device once at build time.
The program is a plain ``torch.fx.GraphModule``, which TorchInductor can compile later.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence

import torch
import torch.fx

from kerasrt.ir.graph import Node, Value
from kerasrt.ir.ops import OPS
from kerasrt.partition import Support


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
    """Make CUDA math honour the engine precision: FP32 means IEEE float32, so TF32 tensor-core
    shortcuts (on by default for cuDNN convolutions) are off while an FP32 engine runs."""
    if device.type != "cuda" or precision != "FP32":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _ident(name: str) -> str:
    return "c_" + re.sub(r"\W", "_", name)


class TorchEngine:
    """A compiled segment: call with the segment's input tensors, get its outputs."""

    def __init__(
        self, nodes: Sequence[Node], inputs: Sequence[Value], outputs: Sequence[Value], device: torch.device
    ):
        self.device = device
        root = torch.nn.Module()
        graph = torch.fx.Graph()
        env: dict[int, torch.fx.Node] = {}
        for i, value in enumerate(inputs):
            env[id(value)] = graph.placeholder(f"in{i}")
        for node in nodes:
            args = []
            for value in node.inputs:
                if id(value) not in env:
                    if not value.is_constant:
                        raise ValueError(f"segment reads {value.name} without it being an input")
                    name = _ident(value.name)
                    if not hasattr(root, name):
                        root.register_buffer(name, value.data.to(device), persistent=False)
                    env[id(value)] = graph.get_attr(name)
                args.append(env[id(value)])
            result = graph.call_function(OPS[node.op].impl, tuple(args), dict(node.attrs))
            env[id(node.outputs[0])] = result
        graph.output(tuple(env[id(v)] for v in outputs))
        self.module = torch.fx.GraphModule(root, graph)
        self.module.eval()

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.module(*tensors)
