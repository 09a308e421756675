"""GPU-only checks and A/B timings of the fused cuDNN convolutions (CI has no GPU).

1. ``kerasrt::cudnn_conv`` on CUDA against float32 math on the same inputs, FP16 and BF16,
   with every epilogue kerasrt fuses, called directly and replayed in a CUDA graph: fails
   (exit 1) when an error is outside the precision's tolerance.
   ``kerasrt::depthwise_conv``'s, ``kerasrt::pointwise_conv``'s, ``kerasrt::stem_conv``'s and
   ``kerasrt::splitk_conv``'s Triton kernels the same way, every config (split-K also: two
   calls give identical bits, so its tile counters are back at zero after each); the merged
   kernels ``kerasrt::dual_conv`` and ``kerasrt::pointwise_pair`` (both outputs, the second
   written over its input) too. Each Triton op inlined into an AOTInductor package
   (``--only inlined``): the package holds compiled kernels and calls no kerasrt op, and
   its outputs are the op's.
2. Whole models, same run, same card, same inputs: kerasrt with ``conv_kernels="auto"``
   (tactics timed, fresh cache), a second build (tactics from the cache), and
   ``conv_kernels="inductor"``; errors against Keras FP32.

    source .whl/activate.sh && python bench/gpu_checks.py [--models ResNet50|none] [--batches 1,128]
    source .whl/activate.sh && python bench/gpu_checks.py --only splitk   # one kernel's checks
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import sys
import tempfile
import time
import zipfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np
import torch

import kerasrt
from kerasrt.backend import (
    cudnn_conv,
    depthwise_conv,
    dual_conv,
    pointwise_conv,
    pointwise_pair,
    splitk_conv,
    stem_conv,
)
from kerasrt.bench import latency_stats, relative_error, sample_latencies
from kerasrt.settings import PRECISION_RTOL

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from kerasrt_testing import randomize  # calibrated random weights

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the FP32 reference
DEV = torch.device("cuda")
CASES = [  # (N, C, H, W), (K, R, S), stride, padding, bias, residual, activation, clip
    ((8, 64, 56, 56), (64, 1, 1), [1, 1], [0, 0], True, False, "relu", []),
    ((8, 64, 56, 56), (64, 3, 3), [1, 1], [1, 1], True, False, "relu", []),
    ((8, 64, 56, 56), (256, 1, 1), [1, 1], [0, 0], True, True, "relu", []),
    ((8, 128, 29, 29), (128, 3, 3), [2, 2], [0, 0], True, False, "relu", []),
    ((4, 32, 112, 112), (96, 1, 1), [1, 1], [0, 0], True, False, "clamp", [0.0, 6.0]),
    ((4, 40, 28, 28), (240, 1, 1), [1, 1], [0, 0], True, False, "silu", []),
    ((4, 240, 28, 28), (40, 1, 1), [1, 1], [0, 0], True, True, "none", []),
    ((1, 3, 230, 230), (64, 7, 7), [2, 2], [0, 0], True, False, "relu", []),
]


DEPTHWISE_CASES = [  # (N, C, H, W), K, stride, [top, bottom, left, right], activation, clip
    ((8, 32, 112, 112), 3, [1, 1], [1, 1, 1, 1], "clamp", [0.0, 6.0]),
    ((8, 96, 112, 112), 3, [2, 2], [0, 1, 0, 1], "clamp", [0.0, 6.0]),
    ((8, 144, 56, 56), 5, [2, 2], [1, 2, 1, 2], "silu", []),
    ((8, 672, 14, 14), 5, [1, 1], [2, 2, 2, 2], "silu", []),
    ((3, 40, 17, 9), 3, [1, 2], [1, 1, 0, 2], "none", []),
]


POINTWISE_CASES = [  # (N, C, H, W), K, bias, residual, activation, clip
    ((8, 16, 112, 112), 96, True, False, "clamp", [0.0, 6.0]),
    ((8, 24, 56, 56), 144, True, False, "clamp", [0.0, 6.0]),
    ((8, 144, 28, 28), 32, True, True, "none", []),
    ((8, 40, 28, 28), 240, True, False, "silu", []),
    ((8, 64, 56, 56), 256, True, True, "relu", []),
    ((3, 5, 9, 7), 12, False, False, "relu", []),
]


DUAL_CASES = [  # h (N, C, H, W), K, shortcut input channels, shortcut stride, activation, clip
    ((8, 64, 56, 56), 256, 64, 1, "relu", []),  # ResNet50's first stage
    ((8, 128, 28, 28), 512, 256, 2, "relu", []),
    ((3, 32, 7, 9), 40, 48, 2, "clamp", [0.0, 6.0]),
    ((2, 16, 5, 5), 24, 16, 1, "none", []),
]

PAIR_CASES = [  # x (N, C, H, W), first K, residual, shortcut (channels, stride), activations
    ((8, 64, 56, 56), 256, True, None, "relu", "relu"),  # ResNet50's first stage
    ((8, 64, 56, 56), 256, False, (64, 1), "relu", "relu"),  # its first block (a dualpair)
    ((8, 128, 28, 28), 512, True, None, "relu", "relu"),
    ((4, 32, 14, 14), 128, False, (48, 2), "relu", "clamp"),
    ((8, 24, 28, 28), 144, True, None, "none", "clamp"),
    ((3, 20, 9, 7), 40, False, None, "silu", "none"),
]

STEM_CASES = [  # (N, C, H, W), (K, R, S), stride, padding, bias, activation, clip
    ((8, 4, 224, 224), (64, 7, 7), [2, 2], [3, 3], True, "relu", []),  # ResNet50's
    ((8, 4, 225, 225), (32, 3, 3), [2, 2], [0, 0], True, "clamp", [0.0, 6.0]),  # MobileNetV2's
    ((8, 4, 225, 225), (32, 3, 3), [2, 2], [0, 0], True, "silu", []),  # EfficientNetB0's
    ((3, 8, 19, 13), (20, 5, 5), [1, 2], [2, 1], False, "none", []),
]


SPLITK_CASES = [  # (N, C, H, W), (K, R, S), stride, padding, bias, residual, activation, clip
    ((1, 512, 7, 7), (512, 3, 3), [1, 1], [1, 1], True, False, "relu", []),  # ResNet50 b1 stage 4
    ((1, 256, 14, 14), (256, 3, 3), [1, 1], [1, 1], True, False, "relu", []),
    ((1, 1024, 14, 14), (2048, 1, 1), [2, 2], [0, 0], True, True, "relu", []),  # projection + residual
    ((1, 2048, 7, 7), (512, 1, 1), [1, 1], [0, 0], True, False, "relu", []),
    ((2, 32, 9, 11), (40, 5, 3), [2, 1], [2, 1], False, True, "silu", []),
    ((4, 64, 56, 56), (64, 3, 3), [1, 1], [1, 1], True, False, "clamp", [0.0, 6.0]),
]


def check_splitk() -> bool:
    """kerasrt::splitk_conv's Triton kernel, every config, against float32 math; a second call
    must reproduce the first bit for bit (the tile counters were reset)."""
    ok = True
    for dtype, tol in ((torch.float16, PRECISION_RTOL["FP16"]), (torch.bfloat16, PRECISION_RTOL["BF16"])):
        for xs, (k, r, s), stride, padding, has_b, has_r, act, clip in SPLITK_CASES:
            x, w, b, res = conv_operands(dtype, xs, (k, r, s), stride, padding, has_b, has_r)

            def reference(x=x, w=w, b=b, res=res, stride=stride, padding=padding, act=act, clip=clip):
                f32 = [t.float() if t is not None else None for t in (x, w, b, res)]
                return splitk_conv.reference(*f32, stride, padding, act, clip)

            ref = reference()
            errors, repeatable = [], True
            for config in splitk_conv.CONFIGS:
                first = splitk_conv.empty_output(x, w, stride, padding)
                second = torch.empty_like(first)
                try:
                    for out in (first, second):
                        splitk_conv.launch(config, x, w, b, res, out, stride, padding, act, clip)
                except ValueError:  # a split refused for its workspace: the tactics skip it too
                    continue
                errors.append(error(first, ref))
                repeatable &= torch.equal(first, second)
            args = (x, w, b, res, stride, padding, act, clip)
            errors.append(replay_error(lambda args=args: torch.ops.kerasrt.splitk_conv(*args), x, reference))
            row = {
                "check": "splitk op",
                "dtype": str(dtype),
                "x": xs,
                "w": [k, xs[1], r, s],
                "stride": stride,
            }
            ok = report(ok and repeatable, errors, tol, {**row, "activation": act, "repeatable": repeatable})
    return ok


def conv_operands(dtype, xs, kernel, stride, padding, has_bias, has_residual) -> tuple:
    """x, w, bias and residual of a convolution check: random channels-last activations of
    shape ``xs``, a (K, C, R, S) weight scaled to keep outputs near 1, ``dtype``."""
    cl = torch.channels_last
    k, r, s = kernel
    x = torch.randn(xs, device=DEV).to(dtype).contiguous(memory_format=cl)
    w = (
        (torch.randn(k, xs[1], r, s, device=DEV) / (xs[1] * r * s) ** 0.5)
        .to(dtype)
        .contiguous(memory_format=cl)
    )
    b = torch.randn(k, device=DEV).to(dtype) if has_bias else None
    shape = cudnn_conv.output_shape(x.shape, w.shape, stride, padding, [1, 1])
    res = torch.randn(shape, device=DEV).to(dtype).contiguous(memory_format=cl) if has_residual else None
    return x, w, b, res


def error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |got - expected| over the largest |expected|, in float32."""
    expected = expected.float()
    return float((got.float() - expected).abs().max() / expected.abs().max())


def replay_error(call, x: torch.Tensor, reference) -> float:
    """Relative error of ``call()`` captured in a CUDA graph and replayed on new data in
    ``x`` (the captured input), against ``reference()`` on that data."""
    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = call()
    x.copy_(torch.randn_like(x))
    graph.replay()
    expected = reference()
    torch.cuda.synchronize()
    return error(replayed, expected)


def report(ok: bool, errors: list[float], tol: float, row: dict) -> bool:
    passed = max(errors) <= tol
    print(json.dumps({**row, "max_err": max(errors), "tol": tol, "passed": passed}), flush=True)
    return ok and passed


def check_depthwise() -> bool:
    """kerasrt::depthwise_conv's Triton kernels, every config, against float32 math."""
    ok = True
    for dtype, tol in ((torch.float16, PRECISION_RTOL["FP16"]), (torch.bfloat16, PRECISION_RTOL["BF16"])):
        for xs, k, stride, padding, act, clip in DEPTHWISE_CASES:
            x = torch.randn(xs, device=DEV).to(dtype).contiguous(memory_format=torch.channels_last)
            w = (torch.randn(xs[1], 1, k, k, device=DEV) / k).to(dtype)
            b = torch.randn(xs[1], device=DEV).to(dtype)

            def reference(x=x, w=w, b=b, stride=stride, padding=padding, act=act, clip=clip):
                return depthwise_conv.reference(x.float(), w.float(), b.float(), stride, padding, act, clip)

            ref = reference()
            errors = []
            for config in depthwise_conv.CONFIGS:
                out = torch.empty_like(ref, dtype=dtype).contiguous(memory_format=torch.channels_last)
                depthwise_conv.launch(config, x, w, b, out, stride, padding, act, clip)
                errors.append(error(out, ref))
            args = (x, w, b, stride, padding, act, clip)
            errors.append(
                replay_error(lambda args=args: torch.ops.kerasrt.depthwise_conv(*args), x, reference)
            )
            row = {"check": "depthwise op", "dtype": str(dtype), "x": xs, "k": k, "stride": stride}
            ok = report(ok, errors, tol, {**row, "padding": padding, "activation": act})
    return ok


def check_pointwise() -> bool:
    """kerasrt::pointwise_conv's Triton kernel, every config, against float32 math."""
    ok = True
    for dtype, tol in ((torch.float16, PRECISION_RTOL["FP16"]), (torch.bfloat16, PRECISION_RTOL["BF16"])):
        for xs, k, has_b, has_r, act, clip in POINTWISE_CASES:
            x, w, b, r = conv_operands(dtype, xs, (k, 1, 1), [1, 1], [0, 0], has_b, has_r)

            def reference(x=x, w=w, b=b, r=r, act=act, clip=clip):
                f32 = [t.float() if t is not None else None for t in (x, w, b, r)]
                return pointwise_conv.reference(*f32, act, clip)

            ref = reference()
            errors = []
            for config in pointwise_conv.CONFIGS:
                out = pointwise_conv.empty_output(x, w)
                pointwise_conv.launch(config, x, w, b, r, out, act, clip)
                errors.append(error(out, ref))
            args = (x, w, b, r, act, clip)
            errors.append(
                replay_error(lambda args=args: torch.ops.kerasrt.pointwise_conv(*args), x, reference)
            )
            row = {"check": "pointwise op", "dtype": str(dtype), "x": xs, "k": k, "residual": has_r}
            ok = report(ok, errors, tol, {**row, "activation": act})
    return ok


def check_dual() -> bool:
    """kerasrt::dual_conv's Triton kernel, every config, against float32 math."""
    ok = True
    for dtype, tol in ((torch.float16, PRECISION_RTOL["FP16"]), (torch.bfloat16, PRECISION_RTOL["BF16"])):
        for hs, k, c2, stride, act, clip in DUAL_CASES:
            h, w, b, _ = conv_operands(dtype, hs, (k, 1, 1), [1, 1], [0, 0], True, False)
            xs = (hs[0], c2, (hs[2] - 1) * stride + 1, (hs[3] - 1) * stride + 1)
            x, ws, _, _ = conv_operands(dtype, xs, (k, 1, 1), [1, 1], [0, 0], False, False)
            s = [stride, stride]

            def reference(h=h, w=w, x=x, ws=ws, b=b, s=s, act=act, clip=clip):
                return dual_conv.reference(
                    h.float(), w.float(), x.float(), ws.float(), b.float(), s, act, clip
                )

            ref = reference()
            errors = []
            for config in dual_conv.CONFIGS:
                out = pointwise_conv.empty_output(h, w)
                dual_conv.launch(config, h, w, x, ws, b, out, s, act, clip)
                errors.append(error(out, ref))
            args = (h, w, x, ws, b, s, act, clip)
            errors.append(replay_error(lambda args=args: torch.ops.kerasrt.dual_conv(*args), h, reference))
            row = {"check": "dual op", "dtype": str(dtype), "h": hs, "k": k, "x": xs, "stride": stride}
            ok = report(ok, errors, tol, {**row, "activation": act})
    return ok


def check_pair() -> bool:
    """kerasrt::pointwise_pair's Triton kernel, every config, against float32 math: the first
    output (with a dual's shortcut product where the case has one), and the second (from the
    first rounded to the working dtype, as the op defines) written over x; and the op
    replayed in a CUDA graph on new data in x."""
    ok = True
    for dtype, tol in ((torch.float16, PRECISION_RTOL["FP16"]), (torch.bfloat16, PRECISION_RTOL["BF16"])):
        for xs, k1, has_r, shortcut_of, act1, act2 in PAIR_CASES:
            x, w1, b1, r = conv_operands(dtype, xs, (k1, 1, 1), [1, 1], [0, 0], True, has_r)
            _, w2, b2, _ = conv_operands(
                dtype, (xs[0], k1, *xs[2:]), (xs[1], 1, 1), [1, 1], [0, 0], True, False
            )
            shortcut, ws, stride = None, None, [1, 1]
            if shortcut_of is not None:
                c2, step = shortcut_of
                ss = (xs[0], c2, (xs[2] - 1) * step + 1, (xs[3] - 1) * step + 1)
                shortcut, ws, _, _ = conv_operands(dtype, ss, (k1, 1, 1), [1, 1], [0, 0], False, False)
                stride = [step, step]
            clip1 = [0.0, 6.0] if act1 == "clamp" else []
            clip2 = [0.0, 6.0] if act2 == "clamp" else []
            head = (w1, shortcut, ws, stride, b1, r, w2, b2)
            tail = (act1, clip1, act2, clip2)

            def reference(x, head=head, tail=tail):
                f32 = [t.float() if isinstance(t, torch.Tensor) else t for t in (x, *head)]
                y, _ = pointwise_pair.reference(*f32, *tail)
                stored = y.to(x.dtype).float()  # the first output as stored, then the second
                return y, pointwise_conv.reference(stored, f32[7], f32[8], None, tail[2], tail[3])

            ry, rz = reference(x)
            errors = []
            for config in pointwise_pair.CONFIGS:
                xc, y = x.clone(), pointwise_conv.empty_output(x, w1)
                pointwise_pair.launch(config, xc, *head, y, *tail)
                errors += [error(y, ry), error(xc, rz)]
            xc = x.clone()
            torch.ops.kerasrt.pointwise_pair(xc, *head, *tail)  # warm-up (writes over xc)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replayed = torch.ops.kerasrt.pointwise_pair(xc, *head, *tail)
            xc.copy_(torch.randn_like(xc))
            ry, rz = reference(xc.clone())
            graph.replay()
            torch.cuda.synchronize()
            errors += [error(replayed, ry), error(xc, rz)]
            row = {"check": "pair op", "dtype": str(dtype), "x": xs, "k1": k1, "residual": has_r}
            ok = report(ok, errors, tol, {**row, "shortcut": shortcut_of, "activations": [act1, act2]})
    return ok


def check_stem() -> bool:
    """kerasrt::stem_conv's Triton kernel, every config, against float32 math."""
    ok = True
    for dtype, tol in ((torch.float16, PRECISION_RTOL["FP16"]), (torch.bfloat16, PRECISION_RTOL["BF16"])):
        for xs, (k, r, s), stride, padding, has_b, act, clip in STEM_CASES:
            x, w, b, _ = conv_operands(dtype, xs, (k, r, s), stride, padding, has_b, False)

            def reference(x=x, w=w, b=b, stride=stride, padding=padding, act=act, clip=clip):
                f32 = [t.float() if t is not None else None for t in (x, w, b)]
                return stem_conv.reference(*f32, stride, padding, act, clip)

            ref = reference()
            errors = []
            for config in stem_conv.CONFIGS:
                out = stem_conv.empty_output(x, w, stride, padding)
                stem_conv.launch(config, x, w, b, out, stride, padding, act, clip)
                errors.append(error(out, ref))
            args = (x, w, b, stride, padding, act, clip)
            errors.append(replay_error(lambda args=args: torch.ops.kerasrt.stem_conv(*args), x, reference))
            row = {"check": "stem op", "dtype": str(dtype), "x": xs, "w": [k, xs[1], r, s], "stride": stride}
            ok = report(ok, errors, tol, {**row, "activation": act})
    return ok


def check_op() -> bool:
    ok = True
    for dtype, tol in ((torch.float16, PRECISION_RTOL["FP16"]), (torch.bfloat16, PRECISION_RTOL["BF16"])):
        for xs, (k, r, s), stride, padding, has_b, has_r, act, clip in CASES:
            x, w, b, res = conv_operands(dtype, xs, (k, r, s), stride, padding, has_b, has_r)
            args = (x, w, b, res, stride, padding, [1, 1], act, clip)
            f32 = [t.float() if t is not None else None for t in args[:4]]
            ref = cudnn_conv.reference(*f32, stride, padding, [1, 1], act, clip)
            got = torch.ops.kerasrt.cudnn_conv(*args)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replayed = torch.ops.kerasrt.cudnn_conv(*args)
            x.copy_(torch.randn_like(x))  # new data in the captured input
            graph.replay()
            ref2 = cudnn_conv.reference(x.float(), *f32[1:], stride, padding, [1, 1], act, clip)
            torch.cuda.synchronize()
            errors = [error(got, ref), error(replayed, ref2)]
            key = cudnn_conv.signature(
                cudnn_conv.Operands(x, w, b, res, got), stride, padding, [1, 1], act, clip
            )
            fused = cudnn_conv._PLANS.get(key) is not None
            passed = max(errors) <= tol and fused
            ok &= passed
            print(
                json.dumps(
                    {
                        "check": "op",
                        "dtype": str(dtype),
                        "x": xs,
                        "w": [k, xs[1], r, s],
                        "stride": stride,
                        "residual": has_r,
                        "activation": act,
                        "fused_by_cudnn": fused,
                        "err_direct": errors[0],
                        "err_cuda_graph": errors[1],
                        "tol": tol,
                        "passed": passed,
                    }
                ),
                flush=True,
            )
    return ok


def model_ab(name: str, batch: int) -> None:
    model = getattr(keras.applications, name)(weights=None, classifier_activation=None)
    rng = np.random.default_rng(0)
    calib = rng.uniform(0, 255, (8, 224, 224, 3)).astype("float32")
    randomize(model, calibration=calib)
    x = torch.from_numpy(rng.uniform(0, 255, (batch, 224, 224, 3)).astype("float32")).to(DEV)
    with torch.no_grad():
        ref = model(x, training=False).float().cpu().numpy()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["KERASRT_CACHE_DIR"] = cache
        for label, kernels in (("auto (timed)", "auto"), ("auto (cached)", "auto"), ("inductor", "inductor")):
            torch._dynamo.reset()
            begin = time.perf_counter()
            optimized = kerasrt.Converter(
                model, precision_mode="FP16", batch_size=batch, conv_kernels=kernels
            ).convert()
            out = optimized(x)
            torch.cuda.synchronize()
            build = time.perf_counter() - begin
            stats = latency_stats(sample_latencies(functools.partial(optimized, x), DEV, 10, 50))
            program = optimized.program(optimized.engine_shapes[0])
            counts = {}
            for choice in program.kernel_choices.values():
                counts[choice.kernel] = counts.get(choice.kernel, 0) + 1
            print(
                json.dumps(
                    {
                        "check": "model",
                        "model": name,
                        "batch": batch,
                        "conv_kernels": label,
                        "convert_and_build_s": round(build, 1),
                        "p50_ms": stats["p50"],
                        "img_per_s": round(batch / stats["p50"] * 1e3),
                        "convs_on_own_kernels": len(program.kernel_convs),
                        "shapes_by_kernel": counts,
                        "err_vs_keras_fp32": relative_error([out.float().cpu().numpy()], [ref]),
                        "cuda_graph": program.captured,
                    }
                ),
                flush=True,
            )
            del optimized, program


def check_inlined() -> bool:
    """Each Triton op inlined into an AOTInductor package, as ``save`` compiles engines: the
    package launches the compiled kernel itself (it calls no kerasrt op, so a loading process
    compiles nothing) and matches the op run eagerly.
    Depthwise in both designs; split-K with its split (the graph zeroes its own counters)."""
    from kerasrt.backend import aoti, op_library, triton_configs
    from kerasrt.backend.torch_backend import inductor_compiling

    ok, dtype, tol = True, torch.float16, PRECISION_RTOL["FP16"]
    x, w, b, r = conv_operands(dtype, (2, 64, 14, 14), (256, 1, 1), [1, 1], [0, 0], True, True)
    h, wh, bh, _ = conv_operands(dtype, (2, 128, 7, 7), (512, 1, 1), [1, 1], [0, 0], True, False)
    xs, ws, _, _ = conv_operands(dtype, (2, 256, 13, 13), (512, 1, 1), [1, 1], [0, 0], False, False)
    px, pw1, pb1, pr = conv_operands(dtype, (2, 64, 14, 14), (256, 1, 1), [1, 1], [0, 0], True, True)
    _, pw2, pb2, _ = conv_operands(dtype, (2, 256, 14, 14), (64, 1, 1), [1, 1], [0, 0], True, False)
    ps, pws, _, _ = conv_operands(dtype, (2, 32, 27, 27), (256, 1, 1), [1, 1], [0, 0], False, False)
    (sk_x, sk_k, sk_stride, sk_pad, _, _, sk_act, _) = SPLITK_CASES[0]
    kx, kw, kb, _ = conv_operands(dtype, sk_x, sk_k, sk_stride, sk_pad, True, False)
    sx, sw, sb, _ = conv_operands(dtype, (2, 4, 33, 31), (32, 3, 3), [2, 2], [1, 1], True, False)
    dx = torch.randn(3, 40, 17, 9, device=DEV).to(dtype).contiguous(memory_format=torch.channels_last)
    dw, db = (torch.randn(40, 1, 3, 3, device=DEV) / 3).to(dtype), torch.randn(40, device=DEV).to(dtype)
    depthwise = (dx, dw, db, [1, 2], [1, 1, 0, 2], "clamp", [0.0, 6.0])
    cases = [
        ("pointwise_conv", (x, w, b, r, "relu", [])),
        ("dual_conv", (h, wh, xs, ws, bh, [2, 2], "relu", [])),
        ("pointwise_pair", (px, pw1, None, None, [1, 1], pb1, pr, pw2, pb2, "relu", [], "relu", [])),
        ("pointwise_pair dual", (px, pw1, ps, pws, [2, 2], pb1, None, pw2, pb2, "relu", [], "relu", [])),
        ("splitk_conv", (kx, kw, kb, None, sk_stride, sk_pad, sk_act, [])),
        ("stem_conv", (sx, sw, sb, [2, 2], [1, 1], "silu", [])),
        ("depthwise_conv", depthwise),
        ("depthwise_conv rows", depthwise),
        ("pointwise_conv opaque", (x, w, b, r, "relu", [])),  # the control: compiled as an op call
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for label, args in cases:
            if label == "depthwise_conv rows":
                rows = next(i for i, c in enumerate(depthwise_conv.CONFIGS) if c[0] == "rows")
                triton_configs.choose(depthwise_conv.signature(*args), rows)
            op = getattr(torch.ops.kerasrt, label.split()[0])
            slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
            tensors = tuple(args[i] for i in slots)

            class Call(torch.nn.Module):
                def forward(self, *given, op=op, args=args, slots=slots):
                    full = list(args)
                    for i, tensor in zip(slots, given):
                        full[i] = tensor
                    return op(*full), full[0]  # (x: what an op that writes over it left there)

            def fresh(tensors=tensors) -> tuple:  # the pair writes over its first input
                return tuple(t.clone() for t in tensors)

            def run(tensors, args=args, slots=slots, op=op):
                full = list(args)
                for i, tensor in zip(slots, tensors):
                    full[i] = tensor
                return op(*full), full[0]

            expected = run(fresh())
            start = time.perf_counter()
            inlining = contextlib.nullcontext() if "opaque" in label else op_library.inlining_kernels()
            with torch.no_grad(), inductor_compiling(), inlining:
                exported = torch.export.export(Call(), fresh())
                path = os.path.join(tmp, f"{label.replace(' ', '_')}.pt2")
                aoti.compile_package(exported, Path(path))
            inlined = package_inlines_kernels(Path(path))
            got = aoti.load_package(Path(path), DEV)(*fresh())
            err = max(error(g, e) for g, e in zip(got, expected))
            row = {
                "check": "inlined op",
                "op": label,
                "inlined": inlined,
                "bitwise": all(torch.equal(g, e) for g, e in zip(got, expected)),
                "compile_s": round(time.perf_counter() - start, 1),
            }
            ok = report(ok and inlined == ("opaque" not in label), [err], tol, row)
    return ok


def package_inlines_kernels(path: Path) -> bool:
    """Whether the AOTInductor package at ``path`` carries compiled kernels (cubin files) and
    calls no kerasrt op (an op call names ``kerasrt::<op>`` or ``ops.kerasrt.<op>`` in the
    package's code or extern-kernel description)."""
    with zipfile.ZipFile(path) as package:
        names = package.namelist()
        calls_op = any(re.search(rb"kerasrt::|ops\.kerasrt\.", package.read(name)) for name in names)
    return not calls_op and any(name.endswith(".cubin") for name in names)


CHECKS = {
    "cudnn": check_op,
    "depthwise": check_depthwise,
    "pointwise": check_pointwise,
    "stem": check_stem,
    "splitk": check_splitk,
    "dual": check_dual,
    "pair": check_pair,
    "inlined": check_inlined,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="ResNet50")
    parser.add_argument("--batches", default="1,128")
    parser.add_argument("--skip-op", action="store_true")
    parser.add_argument("--only", choices=sorted(CHECKS), help="run one kernel's checks alone")
    parser.add_argument("--only-stem", action="store_true", help="the same as --only stem")
    args = parser.parse_args()
    print("cuDNN", cudnn_conv.cudnn_version(), "frontend available:", cudnn_conv.available(DEV), flush=True)
    only = "stem" if args.only_stem else args.only
    if only:
        sys.exit(0 if CHECKS[only]() else 1)
    ok = True
    if not args.skip_op:
        for check in CHECKS.values():
            ok &= check()
    print("op checks", "passed" if ok else "FAILED", flush=True)
    models = [] if args.models.lower() == "none" else list(filter(None, args.models.split(",")))
    for name in models:
        for batch in map(int, args.batches.split(",")):
            model_ab(name, batch)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
