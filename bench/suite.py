"""The standard benchmark suite, one run on one GPU: kerasrt against what Keras users have
(Keras eager on torch, Keras on JAX under jax.jit) and against torch.compile of the
equivalent PyTorch model (torchvision, transformers), same card, same inputs.

Run on the GPU machine:
    source .whl/activate.sh && python bench/suite.py --out $OUT/suite.json [--quick]
Writes the JSON record (after every batch) and prints a markdown table for BENCHMARKS.md.
``--resume`` keeps the rows already in ``--out`` (same card and torch) and measures only the
models and batches it lacks: a run cut short, or one split over calls with a time limit,
ends in one record. Each row names the host and process that measured it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import socket
import sys
import time
import traceback

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import torch

from kerasrt.bench import MemoryWatch, Result, bench_keras_model, environment, measure

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from kerasrt_testing import random_input, randomize  # calibrated random weights

SEQ, WIDTH, HEADS, MLP, LAYERS, VOCAB = 128, 768, 12, 3072, 12, 30522


def bert_encoder(layers: int = LAYERS) -> keras.Model:
    """A BERT-base sized encoder from Keras layers: token + position embeddings, post-LN blocks."""
    L = keras.layers
    ids = keras.Input((SEQ,), dtype="int32", name="input_ids")
    x = L.Embedding(VOCAB, WIDTH)(ids)
    positions = L.Embedding(SEQ, WIDTH)(keras.ops.arange(SEQ)[None, :])
    x = L.LayerNormalization(epsilon=1e-12)(x + positions)
    for _ in range(layers):
        a = L.MultiHeadAttention(HEADS, WIDTH // HEADS)(x, x)
        x = L.LayerNormalization(epsilon=1e-12)(x + a)
        h = L.Dense(WIDTH)(L.Dense(MLP, activation="gelu")(x))
        x = L.LayerNormalization(epsilon=1e-12)(x + h)
    return keras.Model(ids, x, name="bert_encoder")


def keras_models(quick: bool) -> dict[str, tuple]:
    apps = keras.applications
    models = {
        "ResNet50": (lambda: apps.ResNet50(weights=None, classifier_activation=None), [1, 128]),
        "MobileNetV2": (lambda: apps.MobileNetV2(weights=None, classifier_activation=None), [1, 128]),
        "EfficientNetB0": (lambda: apps.EfficientNetB0(weights=None, classifier_activation=None), [1, 128]),
        "BERT-base encoder": (bert_encoder, [32]),
    }
    if quick:
        models = {"ResNet50": models["ResNet50"], "BERT-base encoder": (lambda: bert_encoder(2), [32])}
    return models


def torch_peer(name: str, batch: int, warmup: int, iters: int) -> Result | None:
    """torch.compile (reduce-overhead, freezing) of torchvision's / transformers' model, fp16."""
    torch._inductor.config.freezing = True
    dev = torch.device("cuda")
    # the last peer's CUDA-graph pool outlives it (cudagraph trees are global): free it first,
    # or this window sees it freed and reports less than nothing
    torch._dynamo.reset()
    memory = MemoryWatch(dev).start()
    if name == "BERT-base encoder":
        from transformers import BertConfig, BertModel

        config = BertConfig(
            hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=MLP, num_hidden_layers=LAYERS
        )
        config._attn_implementation = "sdpa"  # fused scaled-dot-product attention
        module = BertModel(config, add_pooling_layer=False).eval().half().to(dev)
        x = torch.randint(0, VOCAB, (batch, SEQ), device=dev)
        system = "transformers BertModel, torch.compile"
    else:
        import torchvision

        ctor = {"ResNet50": "resnet50", "MobileNetV2": "mobilenet_v2", "EfficientNetB0": "efficientnet_b0"}[
            name
        ]
        module = getattr(torchvision.models, ctor)().eval().half().to(dev, memory_format=torch.channels_last)
        x = torch.randn(batch, 3, 224, 224, device=dev).half().to(memory_format=torch.channels_last)
        system = f"torchvision {ctor}, torch.compile"
    compiled = torch.compile(module, mode="reduce-overhead")
    with torch.no_grad():
        begin = time.perf_counter()
        compiled(x)
        compiled(x)
        torch.cuda.synchronize()
        build = time.perf_counter() - begin
        build_peak = memory.build_done()

        def call():
            out = compiled(x)
            return out.last_hidden_state if hasattr(out, "last_hidden_state") else out

        result = measure(
            system, batch, "FP16", call, dev, build_s=build, warmup=warmup, iters=iters, memory=memory
        )
    result.extra["build_peak_memory_mb"] = build_peak
    return result


def log_step(model: str, message: str) -> None:
    """Print which system and batch the suite is at; the build's own steps ("kerasrt, batch 1:
    timing kernels ...", one per layer or shape) are left to the CLI's spinner."""
    if ": " not in message:
        print(f"[{time.strftime('%X')}] {model}: {message}", flush=True)


def markdown(results: list[Result], env: dict, command: str) -> str:
    runs = {(r.extra.get("host"), r.extra.get("pid")) for r in results}
    lines = [
        f"Card: {env['device']}; torch {env['torch']}, keras {env['keras']}, triton {env.get('triton')}; "
        f"{env['date']}; command: `{command}`"
        + (f" (rows from {len(runs)} runs, resumed)" if len(runs) > 1 else ""),
        "",
        "| model | batch | system | p50 ms | throughput /s | vs kerasrt | max rel err | build s | peak MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if not r.latency_ms:
            lines.append(f"| {r.extra.get('model')} | {r.batch} | {r.system} | failed: {r.note} | | | | | |")
            continue
        krt = next(
            (
                x
                for x in results
                if x.system == "kerasrt"
                and x.batch == r.batch
                and x.extra.get("model") == r.extra.get("model")
            ),
            None,
        )
        ratio = f"{r.latency_ms['p50'] / krt.latency_ms['p50']:.2f}x" if krt and krt.latency_ms else ""
        err = "" if r.max_rel_err is None else f"{r.max_rel_err:.1e}"
        lines.append(
            f"| {r.extra.get('model')} | {r.batch} | {r.system} {r.note} | {r.latency_ms['p50']:.3f} | "
            f"{r.throughput:,.0f} | {ratio} | {err} | {r.build_s if r.build_s is not None else ''} | "
            f"{r.peak_memory_mb if r.peak_memory_mb is not None else ''} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="suite.json")
    parser.add_argument("--quick", action="store_true", help="ResNet50 and a 2-layer encoder only")
    parser.add_argument("--precision", default="FP16")
    parser.add_argument("--systems", default="kerasrt,keras-eager,keras-jax-jit")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--autotune", action="store_true")
    parser.add_argument("--models", help="comma-separated subset of the suite's model names")
    parser.add_argument("--batches", help="comma-separated subset of each model's batch sizes")
    parser.add_argument("--resume", action="store_true", help="keep --out's rows, measure only the rest")
    parser.add_argument(
        "--log", action="store_true", help="kerasrt's INFO log on stderr (the builds' phases)"
    )
    args = parser.parse_args()
    if args.log:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("kerasrt").setLevel(logging.INFO)
    env = environment()
    print(json.dumps(env), flush=True)
    results = previous_results(args.out, env) if args.resume else []
    done = {(r.extra.get("model"), r.batch) for r in results if r.system != "error"}
    results = [r for r in results if (r.extra.get("model"), r.batch) in done]  # errors are retried
    suite = keras_models(args.quick)
    if args.models:
        suite = {k: v for k, v in suite.items() if k in args.models.split(",")}
    for name, (make, batches) in suite.items():
        batches = [b for b in batches if not args.batches or str(b) in args.batches.split(",")]
        batches = [b for b in batches if (name, b) not in done]
        if not batches:
            continue
        model = make()
        # trained-like weights: fresh ones give near-constant tiny logits that fp16 flushes to 0
        image = name != "BERT-base encoder"
        randomize(model, calibration=random_input((16, 224, 224, 3)) if image else None)
        for batch in batches:
            try:
                rows = bench_keras_model(
                    model,
                    [batch],
                    args.precision,
                    args.systems.split(","),
                    iters=args.iters,
                    converter_kwargs={"autotune": args.autotune},
                    progress=lambda m, name=name: log_step(name, m),
                )
                if not args.no_peers:
                    rows.append(torch_peer(name, batch, 10, args.iters))
            except Exception:  # record the failure and go on with the suite
                traceback.print_exc()
                rows = [
                    Result("error", batch, args.precision, {}, 0.0, 0, note=traceback.format_exc()[-300:])
                ]
            for r in rows:
                r.extra.update(model=name, host=socket.gethostname(), pid=os.getpid())
                print(json.dumps(r.to_json()), flush=True)
            results += rows
            torch.cuda.empty_cache()
            save(args.out, env, results)  # after every batch: a run cut short keeps what it measured
    print(markdown(results, env, shlex.join(["python", *sys.argv])))


def save(path: str, env: dict, results: list[Result]) -> None:
    """Write the record atomically: a run killed while saving keeps the previous one."""
    with open(path + ".tmp", "w") as fh:
        json.dump({"schema": 1, **env, "results": [r.to_json() for r in results]}, fh, indent=1)
    os.replace(path + ".tmp", path)


def previous_results(path: str, env: dict) -> list[Result]:
    """The rows of an earlier record at ``path`` (none if there is none); refuses a record
    made on another card or torch, whose rows would not compare with this run's."""
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        data = json.load(fh)
    for key in ("device", "torch"):
        if data.get(key) != env.get(key):
            sys.exit(
                f"--resume: {path} was measured with {key} {data.get(key)!r}, this run has {env.get(key)!r}"
            )
    return [Result(**row) for row in data["results"]]


if __name__ == "__main__":
    sys.exit(main())
