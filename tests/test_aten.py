"""ATen lowerings tested directly: trace a small torch function, lower it, run the IR program
on the torch backend, compare with eager PyTorch. Covers ops that Keras emits only on some
torch versions or devices (e.g. fused RMS norm on CUDA builds)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from kerasrt.backend.torch_backend import TorchEngine
from kerasrt.frontend.aten import LOWERINGS, AtenLowering, UnsupportedOp, lowering
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
    ("max_pool_values_of_with_indices", lambda x: F.max_pool2d(x, 2, return_indices=True)[0], (x4,)),
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
    with pytest.raises(UnsupportedOp, match=r"aten\._fft_r2c"):
        lower(lambda x: torch.fft.rfft(x).abs(), x3)


def lower_call(op: torch._ops.OpOverload, *args: Any, **kwargs: Any) -> tuple[Graph, list[torch.Tensor]]:
    """Lower a graph of one call to ``op`` (tensor arguments are graph inputs), as a tracer that
    keeps in-place ops would record it: an in-place op's result is read through its input."""
    graph = torch.fx.Graph()
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    inputs = iter([graph.placeholder(f"x{i}") for i in range(len(tensors))])
    fx_args = tuple(next(inputs) if isinstance(a, torch.Tensor) else a for a in args)
    call = graph.call_function(op, fx_args, kwargs)
    call.meta["val"] = result = op(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
    if op._schema.arguments[0].alias_info is not None and op._schema.arguments[0].alias_info.is_write:
        out = fx_args[0]
    elif isinstance(result, (tuple, list)):
        out = graph.call_function(operator.getitem, (call, 0))
        out.meta["val"] = result[0]
    else:
        out = call
    graph.output(out)
    ir = Graph()
    values = [ir.add_input(f"x{i}", t.shape, dtype_name(t.dtype)) for i, t in enumerate(tensors)]
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    ir.outputs = AtenLowering(ir, "layer", lambda t, hint: ir.add_constant(hint, t)).lower(gm, values)
    ir.remove_unused()
    verify(ir)
    return ir, tensors


def eager_first(op: torch._ops.OpOverload, *args: Any, **kwargs: Any) -> torch.Tensor:
    result = op(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
    return result[0] if isinstance(result, (tuple, list)) else result


def test_lowerings_are_keyed_by_op_overloads() -> None:
    assert LOWERINGS and all(isinstance(op, torch._ops.OpOverload) for op in LOWERINGS)
    for op in (
        aten.convolution.default,
        aten.max_pool2d.default,
        aten.max_pool2d_with_indices.default,
        aten.relu_.default,
        aten.add_.Tensor,
        aten._native_batch_norm_legit_no_training.default,
    ):
        assert op in LOWERINGS, op
    assert aten.relu.default not in {aten._fft_r2c.default} and aten._fft_r2c.default not in LOWERINGS


def test_every_in_place_twin_shares_its_functional_lowering() -> None:
    """Registering ``aten.x`` covers ``aten.x_``: same overloads, same lowering object."""
    checked = 0
    for op in list(LOWERINGS):
        twin = getattr(getattr(aten, op.overloadpacket.__name__ + "_", None), op._overloadname, None)
        if twin is None or twin._schema.arguments[0].alias_info is None:
            continue
        assert LOWERINGS.get(twin) is LOWERINGS[op], twin
        checked += 1
    assert checked > 50


def test_lowering_takes_only_ops_and_refuses_a_second_lowering() -> None:
    before = dict(LOWERINGS)
    with pytest.raises(TypeError, match="relu"):
        lowering("relu")
    with pytest.raises(ValueError, match=r"aten\.relu_\.default"):
        lowering(aten.erfinv, aten.relu_.default)(lambda c, a: a["input"])
    assert LOWERINGS == before  # nothing half-registered


x23 = torch.randn(2, 3)
y23 = torch.rand(2, 3) + 0.5

# (in-place overload, its functional twin, args, kwargs)
IN_PLACE: list[tuple[Any, Any, tuple, dict]] = [
    (aten.relu_.default, aten.relu.default, (x23,), {}),
    (aten.sigmoid_.default, aten.sigmoid.default, (x23,), {}),
    (aten.add_.Tensor, aten.add.Tensor, (x23, y23), {"alpha": 2}),
    (aten.sub_.Scalar, aten.sub.Scalar, (x23, 0.25), {}),
    (aten.mul_.Tensor, aten.mul.Tensor, (x23, y23), {}),
    (aten.div_.Tensor_mode, aten.div.Tensor_mode, (x23, y23), {"rounding_mode": "floor"}),
    (aten.clamp_.default, aten.clamp.default, (x23, -0.5, 0.25), {}),
    (aten.clamp_min_.default, aten.clamp_min.default, (x23, 0.1), {}),
    (aten.clamp_max_.Tensor, aten.clamp_max.Tensor, (x23, y23 - 1), {}),
    (aten.hardtanh_.default, aten.hardtanh.default, (x23, -0.3, 0.2), {}),
    (aten.leaky_relu_.default, aten.leaky_relu.default, (x23, 0.2), {}),
    (aten.elu_.default, aten.elu.default, (x23, 0.7), {}),
    (aten.pow_.Scalar, aten.pow.Tensor_Scalar, (y23, 3.0), {}),
    (aten.unsqueeze_.default, aten.unsqueeze.default, (x23, 1), {}),
    (aten.t_.default, aten.t.default, (x23,), {}),
]


@pytest.mark.parametrize("in_place, functional, args, kwargs", IN_PLACE, ids=[str(c[0]) for c in IN_PLACE])
def test_in_place_op_lowers_like_its_functional_twin(
    in_place: Any, functional: Any, args: tuple, kwargs: dict
) -> None:
    expected = eager_first(functional, *args, **kwargs)
    graph, inputs = lower_call(in_place, *args, **kwargs)
    (got,) = run(graph, *inputs)
    torch.testing.assert_close(got, expected)
    graph, inputs = lower_call(functional, *args, **kwargs)
    (got_functional,) = run(graph, *inputs)
    torch.testing.assert_close(got_functional, expected)


def lowered(gm: torch.fx.GraphModule, x: torch.Tensor) -> Graph:
    """The IR of a traced one-input function, lowered as a layer is."""
    graph = Graph()
    values = [graph.add_input("x0", x.shape, "float32")]
    graph.outputs = AtenLowering(graph, "layer", lambda t, hint: graph.add_constant(hint, t)).lower(
        gm, values
    )
    graph.remove_unused()
    return graph


def test_traced_in_place_ops_lower() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        y = F.relu(x * 2, inplace=True)
        return F.hardtanh(y.add_(x), -0.5, 0.5, inplace=True) + y

    gm = make_fx(fn)(x3)
    assert {aten.relu_.default, aten.add_.Tensor, aten.hardtanh_.default} <= {
        n.target for n in gm.graph.nodes
    }
    (got,) = run(lowered(gm, x3), x3)
    torch.testing.assert_close(got, fn(x3.clone()))


def test_in_place_op_on_a_constant_leaves_earlier_readers_alone() -> None:
    """``c.add_(1)`` is folded at conversion; ``x + c`` read ``c`` before it, so it sees ones."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        c = torch.ones(3)
        y = x + c
        c.add_(1)
        return y * c

    gm = make_fx(fn)(x23)
    (got,) = run(lowered(gm, x23), x23)
    torch.testing.assert_close(got, fn(x23))


rm, rv = torch.randn(3), torch.rand(3) + 0.5
w3, b3 = torch.randn(3), torch.randn(3)
b8 = torch.randn(8)
q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)

# Each overload of a variant family, called directly (first output compared).
VARIANTS: list[tuple[Any, tuple, dict]] = [
    (aten.max_pool2d.default, (x4, [2, 2]), {}),
    (aten.max_pool2d_with_indices.default, (x4, [3, 3], [2, 2], [1, 1]), {}),
    (aten.max_pool1d_with_indices.default, (x3, [3], [2]), {}),
    (aten.max_pool3d_with_indices.default, (torch.randn(1, 2, 4, 4, 4), [2, 2, 2]), {}),
    (aten.batch_norm.default, (x4, w3, b3, rm, rv, False, 0.1, 1e-3, False), {}),
    (aten.native_batch_norm.default, (x4, w3, b3, rm, rv, False, 0.1, 1e-3), {}),
    (aten._native_batch_norm_legit.default, (x4, w3, b3, rm, rv, False, 0.1, 1e-3), {}),
    (aten._native_batch_norm_legit_no_training.default, (x4, None, b3, rm, rv, 0.1, 1e-3), {}),
    (aten.layer_norm.default, (x3, [8], w8, b8, 1e-5), {}),
    (aten.native_layer_norm.default, (x3, [8], None, b8, 1e-5), {}),
    (aten._softmax.default, (x3, 1, False), {}),
    (aten.softmax.int, (x3, -1), {}),
    (aten._log_softmax.default, (x3, 1, False), {}),
    (aten.log_softmax.int, (x3, -1), {}),
    (aten.scaled_dot_product_attention.default, (q, k, v), {}),
    (aten._scaled_dot_product_flash_attention_for_cpu.default, (q, k, v), {}),
    (aten.var.correction, (x3, [1]), {"correction": 0}),
    (aten.std.correction, (x3, [2]), {"correction": 1, "keepdim": True}),
    (aten.var_mean.correction, (x3, [1]), {"correction": 1}),
    (aten.max.dim, (x3, 1), {}),
    (aten.min.dim, (x3, 2, True), {}),
    (aten.min.other, (x3, b8), {}),
    (aten.max.default, (x3,), {}),
    (aten.argmin.default, (x3, 1), {}),
    (aten.argmax.default, (x3, -1, True), {}),
    (aten.sub.Tensor, (x3, b8), {"alpha": 3}),
    (aten.add.Scalar, (x3, 0.5), {}),
    (aten.clamp_min.Tensor, (x3, b8), {}),
    (aten.clamp_max.default, (x3, 0.3), {}),
    (aten.clip.default, (x3, None, 0.3), {}),
    (aten.relu6.default, (x3 * 8,), {}),
    (aten.reflection_pad2d.default, (x4, [1, 2, 2, 1]), {}),
    (aten.replication_pad1d.default, (x3, [2, 1]), {}),
    (aten.upsample_nearest2d.vec, (x4, [9, 7], None), {}),
    (aten.upsample_bilinear2d.vec, (x4, None, False, [1.5, 2.0]), {}),
    (aten.upsample_linear1d.vec, (x3, [11], True, None), {}),
    (aten.upsample_bicubic2d.vec, (x4, [8, 8], False, None), {}),
]


@pytest.mark.parametrize("op, args, kwargs", VARIANTS, ids=[str(c[0]) for c in VARIANTS])
def test_each_variant_overload_lowers(op: Any, args: tuple, kwargs: dict) -> None:
    graph, inputs = lower_call(op, *args, **kwargs)
    assert all(n.op != "keras_layer" for n in graph.nodes)
    (got,) = run(graph, *inputs)
    expected = eager_first(op, *args, **kwargs)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_pooling_indices_are_refused() -> None:
    with pytest.raises(UnsupportedOp, match="output 1 of max_pool2d_with_indices"):
        lower(lambda x: F.max_pool2d(x, 2, return_indices=True)[1].float(), x4)


def test_unlowered_resize_mode_is_refused_with_its_name() -> None:
    with pytest.raises(UnsupportedOp, match=r"aten\._upsample_nearest_exact2d"):
        lower(lambda x: F.interpolate(x, scale_factor=2, mode="nearest-exact"), x4)
