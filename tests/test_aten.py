"""ATen lowerings tested directly: trace a small torch function, lower it, run the IR program
on the torch backend, compare with eager PyTorch. Covers ops that Keras emits only on some
torch versions or devices (e.g. fused RMS norm on CUDA builds)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from kerasrt.backend.torch_backend import TorchEngine
from kerasrt.frontend.aten import AtenLowering
from kerasrt.ir.graph import Graph, dtype_name, verify

aten = torch.ops.aten


def lower(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Graph:
    gm = make_fx(torch.func.functionalize(fn, remove="mutations"))(*inputs)
    graph = Graph()
    values = [graph.add_input(f"x{i}", t.shape, dtype_name(t.dtype)) for i, t in enumerate(inputs)]
    outputs = AtenLowering(graph, "layer", lambda t, hint: graph.add_constant(hint, t)).lower(gm, values)
    graph.outputs = outputs
    graph.remove_unused()
    verify(graph)
    return graph


def run(graph: Graph, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return list(TorchEngine(graph.nodes, graph.inputs, graph.outputs, torch.device("cpu"))(*inputs))


x4 = torch.randn(2, 3, 6, 6)
x3 = torch.randn(2, 5, 8)
w8 = torch.randn(8)
table = torch.randn(10, 4)
wt = torch.randn(3, 2, 3, 3)
wl, bl = torch.randn(4, 8), torch.randn(4)

CASES: list[tuple[str, Callable[..., object], tuple[torch.Tensor, ...]]] = [
    ("fused_rms_norm", lambda x: aten._fused_rms_norm(x, [8], w8, 1e-5)[0], (x3,)),
    ("fused_rms_norm_no_eps", lambda x: aten._fused_rms_norm(x, [8], None, None)[0], (x3,)),
    ("rms_norm", lambda x: F.rms_norm(x, [8], w8, 1e-6), (x3,)),
    (
        "sdpa_mask",
        lambda q, k: F.scaled_dot_product_attention(q, k, k, attn_mask=torch.ones(5, 5).tril().bool()),
        (x3, torch.randn(2, 5, 8)),
    ),
    (
        "upsample_bilinear_align",
        lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True),
        (x4,),
    ),
    ("upsample_nearest", lambda x: F.interpolate(x, size=(9, 7), mode="nearest"), (x4,)),
    ("clamp_tensor_bounds", lambda x: torch.clamp(x, min=torch.zeros(8), max=torch.ones(8)), (x3,)),
    ("hardtanh", lambda x: F.hardtanh(x, -0.5, 0.5), (x3,)),
    ("var_mean", lambda x: sum(torch.var_mean(x, dim=1, correction=1)), (x3,)),
    ("std", lambda x: torch.std(x, dim=-1, keepdim=True), (x3,)),
    ("max_dim", lambda x: torch.max(x, dim=1)[0] + torch.max(x, dim=1)[1], (x3,)),
    ("argmax_flat", lambda x: torch.argmax(x), (x3,)),
    (
        "split_unbind_chunk",
        lambda x: torch.split(x, 3, dim=2)[2].sum() + torch.unbind(x, 1)[4] + torch.chunk(x, 3, -1)[1].mean(),
        (x3,),
    ),
    ("stack_cat", lambda x: torch.cat([torch.stack([x, x * 2], dim=1).flatten(1, 2), x], dim=1), (x3,)),
    (
        "index_select_gather",
        lambda x: (
            torch.index_select(x, 1, torch.tensor([4, 0, 2]))
            + torch.gather(x[:, :3], 2, torch.zeros(2, 3, 8, dtype=torch.long))
        ),
        (x3,),
    ),
    ("advanced_index", lambda x: x[:, torch.tensor([1, 3])], (x3,)),
    ("embedding", lambda i: F.embedding(i, table), (torch.randint(0, 10, (2, 7)),)),
    ("cumsum_where_scalar", lambda x: torch.where(x > 0, torch.cumsum(x, 1), 0.5), (x3,)),
    ("rsub_div_floor", lambda x: (1.0 - x) + torch.div(x, 0.3, rounding_mode="floor"), (x3,)),
    ("pow_rsqrt_inplace", lambda x: x.abs().add_(1).rsqrt_() ** 2, (x3,)),
    (
        "pads",
        lambda x: (
            F.pad(x, (1, 2, 0, 1), mode="reflect").sum() + F.pad(x, (1, 1, 1, 1), mode="replicate").mean()
        ),
        (x4,),
    ),
    (
        "pools",
        lambda x: (
            F.max_pool2d(x, 3, 2, 1, ceil_mode=True).sum()
            + F.avg_pool2d(x, 2, count_include_pad=False).sum()
            + F.adaptive_avg_pool2d(x, 1).sum()
        ),
        (x4,),
    ),
    ("conv_transpose_groups", lambda x: F.conv_transpose2d(x, wt, stride=2, groups=1), (x4,)),
    ("linear_addmm", lambda x: F.linear(x, wl, bl), (x3,)),
    ("softplus_mish_logsigmoid", lambda x: F.softplus(x, 2.0, 10.0) + F.mish(x) + F.logsigmoid(x), (x3,)),
    ("elu_selu_celu", lambda x: F.elu(x, 0.5) + F.selu(x) + F.celu(x, 0.7), (x3,)),
    ("logical", lambda x: ((x > 0) & (x < 1) | ~(x > 2)).float(), (x3,)),
    ("log_softmax_int_mean", lambda x: F.log_softmax(x, 1) + (x > 0).sum(-1, keepdim=True).float(), (x3,)),
]


@pytest.mark.parametrize("fn, inputs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_aten_lowering_matches_eager(
    fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...]
) -> None:
    if "fused_rms" in repr(fn.__code__.co_names) and not hasattr(aten, "_fused_rms_norm"):
        pytest.skip("this torch has no aten._fused_rms_norm")
    graph = lower(fn, *inputs)
    assert all(n.op != "keras_layer" for n in graph.nodes)
    (got,) = run(graph, *inputs)
    expected = fn(*inputs)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_unknown_op_is_refused_with_its_name() -> None:
    from kerasrt.frontend.aten import UnsupportedOp

    with pytest.raises(UnsupportedOp, match=r"aten\._fft_r2c"):
        lower(lambda x: torch.fft.rfft(x).abs(), x3)
