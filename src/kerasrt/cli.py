"""The ``kerasrt`` command line: convert, inspect, validate, bench, demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from kerasrt.errors import ConversionError, KerasRTError
from kerasrt.settings import COMPILERS, CONV_KERNELS, PRECISION_MODES, PRECISION_RTOL, ConversionSettings

err = Console(stderr=True, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


@contextlib.contextmanager
def status(message: str) -> Iterator[Any]:
    """A spinner on stderr with a live message; yields a callback that updates it."""
    with err.status(message) as spinner:
        yield lambda detail: spinner.update(f"{message}: {detail}")


def _batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad batch list {text!r}; write it like 1,8,128") from None
    if not batches or any(b < 1 for b in batches):
        raise argparse.ArgumentTypeError(f"bad batch list {text!r}; batch sizes must be positive")
    return batches


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}; write it like 1,224,224,3") from None
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}; dimensions must be positive")
    return shape


def _custom_objects(spec: str | None) -> dict[str, Any] | None:
    """Keras classes defined in a module (import name or .py file) given by the user."""
    if spec is None:
        return None
    from kerasrt.user_modules import load_module

    module = load_module(spec, "custom objects")
    objects = getattr(module, "custom_objects", None)
    if isinstance(objects, dict):
        return objects
    return {k: v for k, v in vars(module).items() if isinstance(v, type) and not k.startswith("_")}


def _converter_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "precision_mode": args.precision,
        "minimum_segment_size": args.minimum_segment_size,
        "maximum_cached_engines": args.maximum_cached_engines,
        "allow_build_at_runtime": not args.no_build_at_runtime,
        "input_shapes": args.input_shape,
        "batch_size": args.batch_size,
        "keep_in_keras": args.keep_in_keras,
        "batch_profile": args.batch_profile,
        "fp32_ops": [o for o in args.fp32_ops.split(",") if o] if args.fp32_ops is not None else None,
        "compiler": args.compiler,
        "cuda_graphs": not args.no_cuda_graphs,
        "autotune": args.autotune,
        "conv_kernels": args.conv_kernels,
        "exclude_kernels": [k for k in args.exclude_kernels.split(",") if k],
        "use_dynamic_shape": args.dynamic_shape,
        "hot_shape_calls": args.hot_shape_calls,
        "calibrator": args.calibrator,
        "max_accuracy_drop": args.max_accuracy_drop,
        "custom_objects": _custom_objects(args.custom_objects),
        "device": args.device,
    }


def cmd_convert(args: argparse.Namespace) -> int:
    from kerasrt.converter import Converter

    with status(f"converting {args.model}") as progress:
        conv = Converter(args.model, progress=progress, **_converter_kwargs(args))
        conv.convert(calibration_input_fn=_calibration_data(args, conv))
    conv.summary(print_fn=_plain)
    with status(f"saving {args.output}"):
        keep = True if args.keras_model else False if args.no_keras_model else None
        path = conv.save(args.output, not args.no_compiled_engines, keep)
    err.print(f"[green]saved[/] {path}")
    return 0


def _calibration_data(args: argparse.Namespace, conv: Any) -> Any:
    """The batches ``--calibration-data`` names (INT8/FP8), or None."""
    if args.calibration_data is None:
        if conv.settings.quantized:
            raise ConversionError(
                f"--precision {conv.settings.precision_mode} needs --calibration-data "
                "(an .npz of input samples, or a generator 'module:function')"
            )
        return None
    from kerasrt.quantization.data import calibration_input_fn

    names = conv.input_names or ["input"]
    return calibration_input_fn(args.calibration_data, names, args.calibration_batch_size)


def _plain(text: str) -> None:
    """Print text that is not rich markup (a type such as ``f32[s0,s1]`` looks like a tag)."""
    out.print(text, markup=False, highlight=False)


def cmd_inspect(args: argparse.Namespace) -> int:
    from kerasrt.ir.graph import dump
    from kerasrt.report import format_report, format_tactics, make_report, tactics_rows
    from kerasrt.runtime.artifact import load

    model = load(args.artifact, device=args.device)
    if args.tactics:
        rows = tactics_rows(model)
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            out.print(format_tactics(rows), markup=False, highlight=False)
        return 0
    report = make_report(model)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _plain(format_report(report))
    if args.graph:
        _plain(dump(model.primary_graph() if model.graphs else model.sources[0]))
    if args.dot or args.html:
        _write_pictures(model, args.dot, args.html, format_report(report))
    return 0


def _write_pictures(model: Any, dot_path: str | None, html_path: str | None, summary: str) -> None:
    """The optimized graph as DOT, and a page showing the graph before and after optimization."""
    import dataclasses

    from kerasrt.compile.pipeline import compile_graph, serves
    from kerasrt.visualize import to_dot, to_html, to_svg

    key = model.engine_shapes[-1]
    program = model.program(key)
    if dot_path:
        _write_text(Path(dot_path), to_dot(program.graph, program.segments, model.name))
        err.print(f"[green]wrote[/] {dot_path}")
    if html_path:
        with status("compiling the unoptimized graph for the 'before' picture"):
            source = next(s for s in model.sources if serves(s, key) is None)
            before = compile_graph(source, key, dataclasses.replace(model.settings, optimization_level=0))
        from kerasrt.runtime.program import Program

        before_program = Program(before, model.settings, model.device, model.keras)
        page = to_html(
            f"kerasrt: {model.name}",
            [
                (f"before optimization ({len(before.nodes)} ops)", to_svg(before, before_program.segments)),
                (
                    f"after optimization ({len(program.graph.nodes)} ops)",
                    to_svg(program.graph, program.segments),
                ),
            ],
            summary,
        )
        _write_text(Path(html_path), page)
        err.print(f"[green]wrote[/] {html_path}")


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary file and a rename, so a failure leaves nothing half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def cmd_validate(args: argparse.Namespace) -> int:
    import numpy as np

    from kerasrt.frontend import keras_adapter as ka
    from kerasrt.runtime.artifact import load
    from kerasrt.validate import compare, random_inputs

    model = load(args.artifact, device=args.device)
    keras_model = ka.load_model(args.model, _custom_objects(args.custom_objects))
    if args.inputs:
        with np.load(args.inputs, allow_pickle=False) as data:
            inputs = [
                data[s.name] if s.name in data else data[data.files[i]] for i, s in enumerate(model.inputs)
            ]
    else:
        if not model.engine_shapes and any(d is None for s in model.inputs for d in s.shape[1:]):
            raise ConversionError(
                f"{args.artifact} has no engine yet and its inputs have sizes known only at run time: "
                "pass --inputs x.npz"
            )
        batch = model.engine_shapes[-1][0][0] if model.engine_shapes else 1
        inputs = random_inputs(model, batch, seed=args.seed)
    rtol = args.rtol if args.rtol is not None else PRECISION_RTOL[model.settings.precision_mode]
    with status("running both models"):
        results = compare(keras_model, model, inputs, rtol=rtol, atol=args.atol)
    ok = True
    for r in results:
        mark = "[green]OK[/]" if r.ok else "[red]MISMATCH[/]"
        out.print(
            f"{r.name}: max abs err {r.max_abs:.3g}, max rel err {r.max_rel:.3g} "
            f"(output scale {r.scale:.3g}, rtol {rtol:g} for {model.settings.precision_mode}) {mark}"
        )
        ok &= r.ok
    return 0 if ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from kerasrt.bench import bench_keras_model, environment, report_json

    systems = list(dict.fromkeys(["kerasrt", *(args.systems.split(",") if args.compare else [])]))
    if Path(args.model).is_dir():  # an artifact: its settings, and its Keras model
        from kerasrt.runtime.artifact import load

        loaded = load(args.model, device="cpu", compiled_engines=False)  # settings and Keras model only
        if not loaded.keras.available:
            raise ConversionError(
                f"{args.model} holds no Keras model to compare against (an artifact is self-contained): "
                "bench the model file, or convert with --keras-model to keep it in the artifact"
            )
        keras_model, settings = loaded.keras.get(), loaded.settings
        precision = args.precision or settings.precision_mode
        batches = args.batch or [loaded.engine_shapes[-1][0][0]]
        kwargs = {
            k: getattr(settings, k)
            for k in (
                "minimum_segment_size",
                "keep_in_keras",
                "optimization_level",
                "compiler",
                "cuda_graphs",
                "conv_kernels",
            )
        }
    else:
        from kerasrt.frontend import keras_adapter as ka

        keras_model = ka.load_model(args.model, _custom_objects(args.custom_objects))
        precision = args.precision or "FP32"
        batches = args.batch or [1]
        kwargs = {"compiler": args.compiler, "cuda_graphs": not args.no_cuda_graphs}
    kwargs["autotune"] = args.autotune
    if args.conv_kernels:  # else the artifact's own choice (or the default for a model file)
        kwargs["conv_kernels"] = args.conv_kernels
    with status("benchmarking") as progress:
        results = bench_keras_model(
            keras_model,
            batches,
            precision,
            systems,
            device=args.device,
            warmup=args.warmup,
            iters=args.iters,
            converter_kwargs=kwargs,
            progress=progress,
            model_path=args.model if str(args.model).endswith(".keras") else None,
            # an artifact runs its own engines unless asked to build differently
            artifact=args.model
            if Path(args.model).is_dir() and not (args.conv_kernels or args.autotune)
            else None,
        )
    env = environment()
    _print_bench(results, env)
    if args.json:
        document = report_json(results, {**env, "model": str(args.model), "precision": precision})
        _write_text(Path(args.json), json.dumps(document, indent=1))
    if args.plot:
        from kerasrt.bench import plot

        plot(results, Path(args.plot), title=f"{Path(args.model).name} ({precision}, {env['device']})")
    return 0


def _print_bench(results: Sequence[Any], env: dict) -> None:
    out.print(f"[bold]{env['device']}[/], torch {env['torch']}, keras {env['keras']}")
    header = f"{'system':<22}{'batch':>6}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'per s':>12}{'vs kerasrt':>11}"
    out.print(header + f"{'rel err':>10}{'build s':>9}{'h2d ms':>8}{'d2h ms':>8}{'peak MiB':>10}")
    for r in results:
        if not r.latency_ms:
            out.print(f"{r.system:<22}{r.batch:>6}  {r.note}")
            continue
        base = next((x for x in results if x.system == "kerasrt" and x.batch == r.batch and x.latency_ms), r)
        cells = [
            f"{r.latency_ms['p50']:>10.3f}{r.latency_ms['p99']:>10.3f}{r.latency_ms['mean']:>10.3f}",
            f"{r.throughput:>12,.0f}{r.latency_ms['p50'] / base.latency_ms['p50']:>10.2f}x",
            f"{_num(r.max_rel_err, '.1e'):>10}{_num(r.build_s, '.1f'):>9}",
            f"{_num(r.h2d_ms, '.3f'):>8}{_num(r.d2h_ms, '.3f'):>8}{_num(r.peak_memory_mb, ',.0f'):>10}",
        ]
        out.print(f"{r.system:<22}{r.batch:>6}" + "".join(cells))
    out.print(
        "ms: time per call on the device (CUDA events; wall clock on a CPU), inputs already there;"
        " h2d/d2h: copying inputs from and outputs to the host, timed apart"
    )
    noted = [r for r in results if r.latency_ms and r.note]
    if noted:
        out.print("notes:")
    for r in noted:
        out.print(f"  {r.system} (batch {r.batch}): {r.note}", markup=False)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _print_timings(timings: Sequence[Any], batch: int, device: str) -> None:
    base = timings[0].median_ms
    for t in timings:
        out.print(
            f"{t.name:<8} batch {batch} on {device}: {t.median_ms:8.3f} ms/batch median "
            f"(min {t.min_ms:.3f}, max {t.max_ms:.3f}, {t.iters} runs)  {base / t.median_ms:5.2f}x"
        )


def cmd_export(args: argparse.Namespace) -> int:
    from kerasrt.export.onnx import check_with_onnxruntime, export_onnx
    from kerasrt.runtime.artifact import load

    model = load(args.artifact, device="cpu")
    shapes = args.input_shape or (model.engine_shapes[-1] if model.engine_shapes else None)
    if shapes is None:
        raise KerasRTError("the artifact holds no engine shapes: pass --input-shape (once per input)")
    with status(f"exporting {args.onnx}"):
        path = export_onnx(model, args.onnx, shapes)
    err.print(f"[green]wrote[/] {path} (ONNX opset 19, input shapes {[list(s) for s in shapes]})")
    if not args.no_check:
        with status("checking it with onnxruntime"):
            error = check_with_onnxruntime(path, model)
        out.print(f"onnxruntime vs kerasrt: max |error| / output scale = {error:.2e}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from kerasrt.serve.server import ServeOptions, serve
    except ImportError as exc:
        raise KerasRTError(
            f"kerasrt serve needs the serving extra ({exc.name} is missing): pip install 'kerasrt[serve]'"
        ) from None
    from kerasrt.serve.batcher import BatchingConfig

    logging.getLogger("kerasrt.serve").setLevel(logging.INFO)  # one JSON line per batch, load, failure
    if not args.verbose:  # a line per request (access log, KServe's timings) costs more than the engine
        for name in ("uvicorn.access", "kserve.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        batching = BatchingConfig(
            args.max_batch_size, args.max_queue_delay_ms, args.max_queue_size, args.request_timeout_s
        )
    except ValueError as exc:
        raise KerasRTError(str(exc)) from None
    options = ServeOptions(
        http_port=args.port,
        grpc_port=args.grpc_port,
        batching=batching,
        device=args.device,
        grace_period_s=args.grace_period_s,
        ray_replicas=args.replicas if args.ray else None,
        ray_autoscale=args.autoscale,
        warmup=args.warmup,
    )
    serve(args.artifact, options)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from kerasrt.bench import compare_keras
    from kerasrt.converter import Converter
    from kerasrt.demo import DATA_PATH, MODEL_PATH
    from kerasrt.frontend import keras_adapter as ka
    from kerasrt.runtime.artifact import load
    from kerasrt.validate import compare

    with np.load(DATA_PATH, allow_pickle=False) as data:
        x, y = data["x"].astype("float32"), data["y"].astype(np.int64)
    batch = args.batch_size
    out.print(
        f"[bold]kerasrt demo[/]: a CNN trained on scikit-learn's 8x8 digits ({MODEL_PATH.name}), "
        f"{len(x)} held-out test images"
    )
    with status("converting") as progress:
        conv = Converter(MODEL_PATH, batch_size=batch, progress=progress, device=args.device)
        conv.convert()
    conv.summary(print_fn=_plain)
    keras_model = ka.load_model(MODEL_PATH)
    with tempfile.TemporaryDirectory() as tmp:
        with status("saving and reloading the artifact"):
            model = load(conv.save(Path(tmp) / "digits_krt"), device=args.device)
        n = len(x)
        with status("validating against Keras"):
            results = compare(keras_model, model, [x[:batch]])
            logits_krt = model.predict(x[:n], batch_size=batch)
            logits_keras = np.asarray(ka.keras_module().ops.convert_to_numpy(keras_model(x, training=False)))
        with status("timing"):
            timings = compare_keras(keras_model, model, [x[:batch]], iters=args.iters)
    out.print("")
    for r in results:
        out.print(
            f"max abs error vs Keras {r.max_abs:.3g}, max rel error {r.max_rel:.3g} "
            f"(logit scale {r.scale:.3g}) {'[green]OK[/]' if r.ok else '[red]MISMATCH[/]'}"
        )
    acc_keras = float(np.mean(logits_keras.argmax(1) == y[:n]))
    acc_krt = float(np.mean(logits_krt.argmax(1) == y[:n]))
    agree = float(np.mean(logits_keras.argmax(1) == logits_krt.argmax(1)))
    out.print(
        f"accuracy on {n} test images: Keras {acc_keras:.2%}, kerasrt {acc_krt:.2%} "
        f"(predictions agree on {agree:.2%})"
    )
    _print_timings(timings, batch, str(model.device))
    return 0 if all(r.ok for r in results) and agree == 1.0 else 1


def cmd_debug_reduce(args: argparse.Namespace) -> int:
    from kerasrt.debug import find_divergence
    from kerasrt.frontend import keras_adapter as ka
    from kerasrt.frontend.importer import model_inputs
    from kerasrt.validate import random_inputs_for

    model = ka.load_model(args.model, _custom_objects(args.custom_objects))
    declared = model_inputs(model, args.input_shape, args.batch_size)
    if declared.example is None:
        raise ConversionError("the model's input sizes are unknown: pass --input-shape")
    specs = [(shape, s.dtype) for s, shape in zip(declared.specs, declared.example)]
    inputs = random_inputs_for(specs, seed=args.seed)
    with status("looking for the first divergence"):
        found = find_divergence(
            model, inputs, ConversionSettings(optimization_level=args.level), rtol=args.rtol
        )
    if found is None:
        out.print("[green]no divergence[/]: kerasrt matches Keras at every layer and after every rewrite")
        return 0
    out.print(str(found))
    return 1


def _add_conversion_options(p: argparse.ArgumentParser) -> None:
    d = ConversionSettings()  # the CLI and the Python API share one set of defaults
    p.add_argument(
        "--precision",
        default=d.precision_mode,
        type=str.upper,
        choices=PRECISION_MODES,
        help=f"engine precision (default {d.precision_mode}); FP16/BF16 keep softmax, norms and "
        "reductions in FP32",
    )
    p.add_argument(
        "--calibration-data",
        metavar="DATA",
        help="INT8/FP8: samples to calibrate on: an .npz (one array per model input, by input name) "
        "or .npy, or a generator function yielding batches ('module:function', 'file.py:function')",
    )
    p.add_argument(
        "--calibration-batch-size",
        type=int,
        default=32,
        metavar="N",
        help="batch size the .npz/.npy samples are calibrated in (default 32)",
    )
    p.add_argument(
        "--calibrator",
        choices=("max", "percentile", "entropy", "mse"),
        help="INT8/FP8: how activation ranges are chosen (default: entropy for INT8, max for FP8)",
    )
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        metavar="DROP",
        help="INT8/FP8: keep the most sensitive layers in FP16 until top-1 agreement with FP32 on the "
        "calibration data drops by at most DROP (e.g. 0.005)",
    )
    p.add_argument(
        "--fp32-ops",
        metavar="OPS",
        help="comma-separated IR op types computed in FP32 in FP16/BF16 engines (default: softmax, "
        "norms, reductions, exp/log/pow; '' for none)",
    )
    p.add_argument(
        "--compiler",
        default=d.compiler,
        choices=COMPILERS,
        help="engine compiler: inductor (TorchInductor), eager (op by op), auto (default: inductor "
        "on CUDA, eager on CPU)",
    )
    p.add_argument("--no-cuda-graphs", action="store_true", help="launch kernels one by one on CUDA")
    p.add_argument(
        "--dynamic-shape",
        action="store_true",
        help="one engine set compiled with symbolic sizes for every input shape, instead of one per "
        "exact shape (TF-TRT's use_dynamic_shape)",
    )
    p.add_argument(
        "--hot-shape-calls",
        type=int,
        default=d.hot_shape_calls,
        metavar="N",
        help="with --dynamic-shape: after N calls at one shape, time a static engine for it against "
        "the dynamic one and keep the faster (default 0: never)",
    )
    p.add_argument(
        "--autotune", action="store_true", help="time kernel choices per layer shape (slower build)"
    )
    p.add_argument(
        "--conv-kernels",
        default=d.conv_kernels,
        choices=CONV_KERNELS,
        help="FP16/BF16 convolutions on CUDA: auto (default: time the kernel registry's families (cuDNN, "
        "cuBLAS, Triton) against Inductor's code per layer shape, keep the fastest), cudnn "
        "(kerasrt's kernels wherever they run), inductor",
    )
    p.add_argument(
        "--exclude-kernels",
        default="",
        metavar="NAMES",
        help="comma-separated kernel families the tactics never consider (e.g. linear_gemm,splitk_conv)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"batch size of the first engine (default {d.batch_size})",
    )
    p.add_argument(
        "--input-shape",
        type=_shape,
        action="append",
        help="full input shape incl. batch, e.g. 1,224,224,3; repeat once per model input",
    )
    p.add_argument(
        "--batch-profile",
        type=_batches,
        metavar="MIN,OPT,MAX",
        help="serve every batch size in [MIN, MAX] from two engines (OPT and MAX), padding smaller batches",
    )
    p.add_argument(
        "--minimum-segment-size",
        type=int,
        default=d.minimum_segment_size,
        help=f"smallest op run put into an engine (default {d.minimum_segment_size}, as in TF-TRT)",
    )
    p.add_argument(
        "--maximum-cached-engines",
        type=int,
        default=d.maximum_cached_engines,
        help=f"engines (input shapes) kept at once, least recently used evicted (default {d.maximum_cached_engines})",
    )
    p.add_argument(
        "--no-build-at-runtime",
        action="store_true",
        help="refuse input shapes with no prebuilt engine instead of building one",
    )
    p.add_argument(
        "--keep-in-keras",
        action="append",
        default=[],
        metavar="NAME",
        help="layer name, path or class to leave to Keras, or an IR op type (as `inspect --graph` "
        "shows) to keep out of engines (repeatable)",
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument(
        "--custom-objects",
        metavar="MODULE_OR_FILE",
        help="module or .py file defining the model's custom Keras classes",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kerasrt", description=__doc__.split(":")[0] + ": convert Keras 3 models into optimized engines."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what kerasrt does")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a .keras/.h5 model and save the artifact")
    p.add_argument("model", help="a .keras or .h5 model file")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument(
        "--no-compiled-engines", action="store_true", help="do not store AOTInductor packages of the engines"
    )
    keras_model = p.add_mutually_exclusive_group()
    keras_model.add_argument(
        "--keras-model",
        action="store_true",
        help="store the original model in the artifact (by default only when a layer runs in Keras); "
        "'kerasrt bench ARTIFACT' compares against it",
    )
    keras_model.add_argument("--no-keras-model", action="store_true", help="never store the original model")
    _add_conversion_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="print the conversion report of a saved artifact")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="machine-readable JSON report")
    p.add_argument("--graph", action="store_true", help="also print the IR graph")
    p.add_argument(
        "--tactics",
        action="store_true",
        help="list each node's kernel choice and every candidate's timing (with --json: as JSON)",
    )
    p.add_argument("--dot", metavar="FILE", help="write the optimized graph as Graphviz DOT")
    p.add_argument(
        "--html", metavar="FILE", help="write a page with pictures of the graph before/after optimization"
    )
    p.add_argument("--device", default="cpu", help="device to load onto (default cpu)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("validate", help="compare an artifact's outputs with the Keras model's")
    p.add_argument("model", help="the original .keras or .h5 model")
    p.add_argument("artifact")
    p.add_argument("--inputs", help=".npz file with one array per input (default: random inputs)")
    p.add_argument(
        "--rtol",
        type=float,
        help="max abs error allowed relative to the output scale (default by precision: "
        + ", ".join(f"{k} {v:g}" for k, v in PRECISION_RTOL.items())
        + ")",
    )
    p.add_argument("--atol", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    _add_common(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "bench",
        help="latency percentiles, throughput, transfers, build time and memory, per batch size "
        "(--compare: against Keras eager, Keras torch.compile and Keras on JAX)",
    )
    p.add_argument(
        "model",
        help="a .keras/.h5 model file or a kerasrt artifact directory (which runs its own engines "
        "at the shapes it was saved with; its build time is then load + first call)",
    )
    p.add_argument(
        "--batch",
        type=_batches,
        help="batch sizes, e.g. 1,8,128 (default: the artifact's engine batch, else 1)",
    )
    p.add_argument(
        "--precision", type=str.upper, choices=PRECISION_MODES, help="default: the artifact's, else FP32"
    )
    p.add_argument("--compare", action="store_true", help="also measure the systems in --systems")
    p.add_argument(
        "--systems",
        default="keras-eager,keras-torch-compile,keras-jax-jit",
        help="systems --compare measures (default: all of keras-eager, keras-torch-compile, keras-jax-jit)",
    )
    p.add_argument("--json", metavar="FILE", help="write every measurement as JSON")
    p.add_argument(
        "--plot", metavar="FILE", help="plot throughput and latency by batch (matplotlib; .png/.svg)"
    )
    p.add_argument("--iters", type=int, default=50, help="timed calls per measurement (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls first (default 10)")
    p.add_argument("--compiler", default="auto", choices=COMPILERS, help="engine compiler for a model file")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--autotune", action="store_true")
    p.add_argument("--conv-kernels", choices=CONV_KERNELS, help="FP16/BF16 convolution kernels on CUDA")
    p.add_argument("--custom-objects", metavar="MODULE_OR_FILE")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("debug", help="tools for finding conversion bugs")
    debug = p.add_subparsers(dest="debug_command", required=True)
    p = debug.add_parser("reduce", help="find the first layer or rewrite where kerasrt and Keras disagree")
    p.add_argument("model", help="a .keras or .h5 model file")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--input-shape", type=_shape, action="append")
    p.add_argument("--level", type=int, default=2, help="optimization level to check (default 2)")
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--custom-objects", metavar="MODULE_OR_FILE")
    p.set_defaults(func=cmd_debug_reduce)

    p = sub.add_parser(
        "export", help="write an artifact's optimized graph as ONNX (for trtexec, ONNX Runtime)"
    )
    p.add_argument("artifact", help="a kerasrt artifact directory")
    p.add_argument("--onnx", required=True, metavar="FILE", help="the ONNX file to write")
    p.add_argument(
        "--input-shape",
        type=_shape,
        action="append",
        help="input shape to export at (default: the artifact's)",
    )
    p.add_argument(
        "--no-check", action="store_true", help="do not run the file in onnxruntime against kerasrt"
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "serve", help="serve artifacts over the Open Inference Protocol (REST and gRPC), dynamically batched"
    )
    p.add_argument("artifact", help="a kerasrt artifact directory, or a directory of them (one model each)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--max-batch-size", type=int, default=32, help="rows per engine call at most (default 32)")
    p.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=2.0,
        help="how long the first request of a batch waits for others (default 2)",
    )
    p.add_argument(
        "--max-queue-size",
        type=int,
        default=256,
        help="requests waiting per model; more are refused with 503 / RESOURCE_EXHAUSTED (default 256)",
    )
    p.add_argument("--request-timeout-s", type=float, default=30.0, help="per request (default 30)")
    p.add_argument(
        "--grace-period-s", type=int, default=30, help="on SIGTERM, time to finish requests in flight"
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--warmup",
        action="store_true",
        help="build every batch size's engine (powers of two up to --max-batch-size) before serving",
    )
    p.add_argument("--ray", action="store_true", help="run each model as a Ray Serve deployment")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: replicas per model (one GPU each)")
    p.add_argument(
        "--autoscale",
        action="store_true",
        help="with --ray: scale between 1 and --replicas on ongoing requests",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="convert, validate and time the embedded digits model")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except KerasRTError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")  # (a message's "[serve]" is no markup)
        return 2
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
