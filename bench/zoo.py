"""The zoo benchmark: every keras.applications architecture at its default resolution and the
keras_hub backbones kerasrt converts, against what their users can run today, one record per
GPU run.

For each model and batch, in one process on one card, inputs already on the GPU:
kerasrt (converted from empty caches, so its build time is convert + first build); Keras on
JAX under ``jax.jit`` (bfloat16 policy); ``torch.compile`` (mode="reduce-overhead",
freezing, channels-last) of the equivalent torchvision / timm / transformers model where one
exists; Keras eager (the floor, and Keras's own mixed-precision error on the same inputs).

Run on the GPU machine:
    source .whl/activate.sh && python bench/zoo.py --out $OUT/zoo.json [--models A,B] [--resume]
``--resume`` keeps the rows already in ``--out`` (same card and torch) and measures only the
models and batches it lacks: a zoo split over calls with a time limit ends in one record.
``--report zoo.json [--plot zoo.png]`` prints the tables (and draws the plot) of a record
without measuring anything (CPU side). ``bench/records/zoo-h100.json`` is the H100 record so
far: copy it to ``--out`` and ``--resume`` to measure the models it lacks.

Inputs are images the way each architecture expects them (pixels 127.5 +- 50 through its own
``preprocess_input``) or token ids below the vocabulary with a full padding mask. Weights are
random with BatchNormalization statistics measured on such inputs (``randomize_weights``), so
activations stay at a trained model's scale and the FP16 error figures mean something.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import shlex
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np
import torch

from kerasrt.bench import MemoryWatch, Result, bench_keras_model, environment, measure

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from kerasrt_testing import application, decode_step, randomize  # calibrated random weights

PEER_DTYPES = {
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "INT8": torch.float16,
    "FP8": torch.float16,
}
"""The dtype each peer runs at for a kerasrt precision (INT8/FP8 kerasrt against FP16 peers)."""
PEERS = ("keras-jax-jit", "torch-compile")
"""The systems kerasrt must beat; Keras eager is the floor, not a peer."""


@dataclass(frozen=True)
class Entry:
    """One zoo model: how to build it (random weights at a trained model's scale), its inputs
    for a batch, the batches it runs at, and its PyTorch equivalent (``library:name``)."""

    name: str
    build: Callable[[], keras.Model]
    inputs: Callable[[keras.Model, int], list[np.ndarray]]
    batches: tuple[int, ...]
    peer: str | None
    note: str = ""


# -- keras.applications ------------------------------------------------------------------------

APPLICATION_PEERS = {
    **{f"ConvNeXt{s}": f"torchvision:convnext_{s.lower()}" for s in ("Tiny", "Small", "Base", "Large")},
    "ConvNeXtXLarge": "timm:convnext_xlarge",
    **{f"DenseNet{d}": f"torchvision:densenet{d}" for d in (121, 169, 201)},
    **{f"EfficientNetB{i}": f"torchvision:efficientnet_b{i}" for i in range(8)},
    **{f"EfficientNetV2B{i}": f"timm:tf_efficientnetv2_b{i}" for i in range(4)},
    **{f"EfficientNetV2{s}": f"torchvision:efficientnet_v2_{s.lower()}" for s in "SML"},
    "InceptionV3": "torchvision:inception_v3",
    "InceptionResNetV2": "timm:inception_resnet_v2",
    "MobileNet": "timm:mobilenetv1_100",
    "MobileNetV2": "torchvision:mobilenet_v2",
    "MobileNetV3Small": "torchvision:mobilenet_v3_small",
    "MobileNetV3Large": "torchvision:mobilenet_v3_large",
    "NASNetLarge": "timm:nasnetalarge",
    **{f"ResNet{d}": f"torchvision:resnet{d}" for d in (50, 101, 152)},
    **{f"ResNet{d}V2": f"timm:resnetv2_{d}" for d in (50, 101, 152)},
    "VGG16": "torchvision:vgg16",
    "VGG19": "torchvision:vgg19",
    "Xception": "timm:legacy_xception",
}
"""keras.applications architecture -> the same architecture in torchvision or timm (RegNets:
timm's ``regnetx_002`` ... names, derived). NASNetMobile has none."""

APPLICATIONS = sorted(n for n in dir(keras.applications) if n[:1].isupper())
LARGE_BATCH_PIXELS = 380 * 380
"""From this resolution up (EfficientNetB4-B7, EfficientNetV2M/L) the large batch is 64, not
128: Keras eager and XLA at 128 such images need more memory and minutes per measurement."""


def application_peer(name: str) -> str | None:
    if name.startswith("RegNet"):  # RegNetX002 -> regnetx_002
        return f"timm:{name[:7].lower()}_{name[7:]}"
    return APPLICATION_PEERS.get(name)


def _images(name: str) -> Callable[[keras.Model, int], list[np.ndarray]]:
    preprocess = importlib.import_module(getattr(keras.applications, name).__module__).preprocess_input

    def images(model: keras.Model, batch: int, seed: int = 0) -> list[np.ndarray]:
        side = model.input_shape[1]
        rng = np.random.default_rng(seed + batch)
        pixels = 127.5 + 50.0 * rng.standard_normal((batch, side, side, 3)).astype("float32")
        return [np.asarray(keras.ops.convert_to_numpy(preprocess(pixels)), dtype="float32")]

    return images


def _calibrated(name: str, side: int) -> keras.Model:
    model = application(name, side)
    images = _images(name)(model, 16, seed=1000)[0]
    return randomize(model, calibration=images)


def application_entry(name: str) -> Entry:
    side = DEFAULT_SIDES.get(name, 224)
    big = 64 if side * side >= LARGE_BATCH_PIXELS else 128
    note = f"batch {big}: {side}x{side} images" if big != 128 else ""
    return Entry(name, lambda: _calibrated(name, side), _images(name), (1, big), application_peer(name), note)


DEFAULT_SIDES = {
    **dict(zip((f"EfficientNetB{i}" for i in range(8)), (224, 240, 260, 300, 380, 456, 528, 600))),
    **dict(zip((f"EfficientNetV2B{i}" for i in range(4)), (224, 240, 260, 300))),
    "EfficientNetV2S": 384,
    "EfficientNetV2M": 480,
    "EfficientNetV2L": 480,
    "InceptionV3": 299,
    "InceptionResNetV2": 299,
    "Xception": 299,
    "NASNetLarge": 331,
}
"""Each architecture's default resolution where it is not 224 (its constructor's
``default_size``; MobileNetV3 declares none and runs at 224)."""


# -- keras_hub backbones and the suite's Keras-layers encoder -------------------------------------

BERT_BASE = {"num_layers": 12, "num_heads": 12, "hidden_dim": 768, "intermediate_dim": 3072}


def _tokens(vocabulary: int, length: int, names: Sequence[str]) -> Callable[[keras.Model, int], list]:
    """Token ids below ``vocabulary`` and a full padding mask (and segment ids of 0), in the
    order of the model's inputs."""

    def tokens(model: keras.Model, batch: int) -> list[np.ndarray]:
        rng = np.random.default_rng(batch + length)
        arrays = {
            "token_ids": rng.integers(0, vocabulary, (batch, length)).astype("int32"),
            "padding_mask": np.ones((batch, length), "int32"),
            "segment_ids": np.zeros((batch, length), "int32"),
            "input_ids": rng.integers(0, vocabulary, (batch, length)).astype("int32"),
        }
        order = [t.name.split(":")[0] for t in model.inputs]
        return [arrays[name] for name in order if name in names]

    return tokens


def _hub_text(kind: str, length: int) -> Callable[[], keras.Model]:
    def build() -> keras.Model:
        import keras_hub

        if kind == "bert":
            model = keras_hub.models.BertBackbone(vocabulary_size=30522, max_sequence_length=512, **BERT_BASE)
        else:
            model = keras_hub.models.GPT2Backbone(
                vocabulary_size=50257, max_sequence_length=1024, **BERT_BASE
            )
        return randomize(model)

    return build


DECODE_CACHE, DECODE_POSITION = 1024, 512


def _gpt2_decode() -> keras.Model:
    """GPT-2 base's one-token generation step with a KV cache of 1024 positions."""
    return decode_step(_hub_text("gpt2", 1)(), DECODE_CACHE)


def _decode_inputs(model: keras.Model, batch: int) -> list[np.ndarray]:
    """A token, a cache of keys and values at an activation's scale, the write position."""
    rng = np.random.default_rng(batch)
    cache = rng.standard_normal((batch, *model.inputs[1].shape[1:])).astype("float32")
    return [
        rng.integers(0, 50257, (batch, 1)).astype("int32"),
        cache,
        np.full((batch, 1), DECODE_POSITION, "int32"),
    ]


def _hub_vit() -> keras.Model:
    import keras_hub

    model = keras_hub.models.ViTBackbone(
        image_shape=(224, 224, 3), patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072
    )
    return randomize(model)


def _vit_images(model: keras.Model, batch: int) -> list[np.ndarray]:
    rng = np.random.default_rng(batch)
    return [rng.random((batch, 224, 224, 3)).astype("float32")]


SEQ, VOCAB = 128, 30522


def bert_encoder(layers: int = 12, width: int = 768, heads: int = 12, mlp: int = 3072) -> keras.Model:
    """The standard suite's BERT-base sized encoder of Keras layers (sequence 128): token +
    position embeddings, post-LN blocks."""
    L = keras.layers
    ids = keras.Input((SEQ,), dtype="int32", name="input_ids")
    x = L.Embedding(VOCAB, width)(ids)
    positions = L.Embedding(SEQ, width)(keras.ops.arange(SEQ)[None, :])
    x = L.LayerNormalization(epsilon=1e-12)(x + positions)
    for _ in range(layers):
        a = L.MultiHeadAttention(heads, width // heads)(x, x)
        x = L.LayerNormalization(epsilon=1e-12)(x + a)
        h = L.Dense(width)(L.Dense(mlp, activation="gelu")(x))
        x = L.LayerNormalization(epsilon=1e-12)(x + h)
    return keras.Model(ids, x, name="bert_encoder")


def _suite_encoder(layers: int) -> Callable[[], keras.Model]:
    return lambda: bert_encoder(layers)


def hub_entries() -> list[Entry]:
    text = ("token_ids", "padding_mask", "segment_ids")
    return [
        Entry(
            "BERT-base encoder",
            _suite_encoder(12),
            _tokens(VOCAB, SEQ, ("input_ids",)),
            (32,),
            "transformers:bert-128",
            "Keras layers, sequence 128",
        ),
        Entry(
            "keras_hub BERT-base seq128",
            _hub_text("bert", 128),
            _tokens(30522, 128, text),
            (1, 128),
            "transformers:bert-128",
        ),
        Entry(
            "keras_hub BERT-base seq512",
            _hub_text("bert", 512),
            _tokens(30522, 512, text),
            (1, 64),
            "transformers:bert-512",
            "batch 64: sequence 512",
        ),
        Entry(
            "keras_hub GPT-2 prefill 512",
            _hub_text("gpt2", 512),
            _tokens(50257, 512, text),
            (1, 64),
            "transformers:gpt2-512",
            "batch 64: sequence 512",
        ),
        Entry(
            "keras_hub GPT-2 decode step",
            _gpt2_decode,
            _decode_inputs,
            (1, 64),
            None,
            f"KV cache of {DECODE_CACHE}, written at {DECODE_POSITION}; batch 64; no torch.compile peer",
        ),
        Entry("keras_hub ViT-B/16", _hub_vit, _vit_images, (1, 128), "transformers:vit"),
    ]


def zoo(quick: bool = False) -> dict[str, Entry]:
    entries = [application_entry(n) for n in APPLICATIONS] + hub_entries()
    table = {e.name: e for e in entries}
    if quick:  # the suite's smoke test: one CNN, a 2-layer encoder
        encoder = table["BERT-base encoder"]
        table = {
            "ResNet50": table["ResNet50"],
            "BERT-base encoder": Entry(
                encoder.name, _suite_encoder(2), encoder.inputs, encoder.batches, None
            ),
        }
    return table


# -- the torch.compile peer -----------------------------------------------------------------------


def peer_module(spec: str, side: int) -> tuple[torch.nn.Module, str, str]:
    """(module, input kind "image"/"tokens", description) for ``library:name``."""
    library, name = spec.split(":")
    if library == "torchvision":
        import torchvision

        extra = {"aux_logits": False, "init_weights": False} if name == "inception_v3" else {}
        return getattr(torchvision.models, name)(weights=None, **extra), "image", f"torchvision {name}"
    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=False), "image", f"timm {name}"
    import transformers

    family = name.split("-")[0]
    if family == "vit":
        config = transformers.ViTConfig(image_size=side)
        config._attn_implementation = "sdpa"
        return transformers.ViTModel(config, add_pooling_layer=False), "image", "transformers ViTModel"
    config = transformers.BertConfig() if family == "bert" else transformers.GPT2Config()
    config._attn_implementation = "sdpa"  # fused scaled-dot-product attention
    if family == "bert":
        return transformers.BertModel(config, add_pooling_layer=False), "tokens", "transformers BertModel"
    return transformers.GPT2Model(config), "tokens", "transformers GPT2Model"


def torch_peer(
    spec: str, host: Sequence[np.ndarray], precision: str, warmup: int, iters: int, profile: bool = False
) -> Result:
    """torch.compile(mode="reduce-overhead") with freezing of the PyTorch equivalent, in the
    run's 16-bit type, channels-last, fed inputs of the same shape as kerasrt's."""
    torch._inductor.config.freezing = True
    dev = torch.device("cuda")
    # the last peer's CUDA-graph pool outlives it (cudagraph trees are global): free it first,
    # or this window sees it freed and reports less than nothing
    torch._dynamo.reset()
    memory = MemoryWatch(dev).start()
    batch = host[0].shape[0]
    side = host[0].shape[1] if host[0].ndim == 4 else 224
    module, kind, description = peer_module(spec, side)
    dtype = PEER_DTYPES[precision]
    module = module.eval().to(dev, dtype=dtype, memory_format=torch.channels_last)
    if kind == "image":
        x = (
            torch.from_numpy(host[0])
            .to(dev, dtype)
            .permute(0, 3, 1, 2)
            .contiguous(memory_format=torch.channels_last)
        )
    else:
        x = torch.from_numpy(host[0]).to(dev, torch.long)
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
            "torch-compile",
            batch,
            precision,
            call,
            dev,
            build_s=build,
            warmup=warmup,
            iters=iters,
            memory=memory,
            note=description,
            profile=profile,
        )
    result.extra["build_peak_memory_mb"] = build_peak
    return result


# -- one row -------------------------------------------------------------------------------------


def measure_entry(entry: Entry, batch: int, args: argparse.Namespace, model: keras.Model) -> list[Result]:
    """Every system on one model at one batch; a failing system is a row that says why."""
    rows: list[Result] = []
    inputs = lambda b: entry.inputs(model, b)  # noqa: E731
    systems = [s for s in args.systems.split(",") if s != "keras-eager"]

    def attempt(what: str, run: Callable[[], list[Result]]) -> None:
        try:
            rows.extend(run())
        except Exception:  # record the failure and go on with the zoo
            traceback.print_exc()
            rows.append(Result(what, batch, args.precision, {}, 0.0, 0, note=traceback.format_exc()[-400:]))

    progress = lambda m: log_step(entry.name, m)  # noqa: E731
    attempt(
        "kerasrt",
        lambda: bench_keras_model(
            model,
            [batch],
            args.precision,
            systems,
            iters=args.iters,
            progress=progress,
            inputs=inputs,
            profile=args.profile,
            converter_kwargs={"exclude_kernels": [k for k in args.exclude_kernels.split(",") if k]},
        ),
    )
    if "keras-eager" in args.systems.split(","):  # the floor: a few calls are enough
        attempt(
            "keras-eager",
            lambda: bench_keras_model(
                model,
                [batch],
                args.precision,
                ["keras-eager"],
                warmup=2,
                iters=5,
                progress=progress,
                inputs=inputs,
            ),
        )
    if entry.peer and not args.no_peers:
        log_step(entry.name, f"torch-compile, batch {batch}")
        attempt(
            "torch-compile",
            lambda: [torch_peer(entry.peer, inputs(batch), args.precision, 10, args.iters, args.profile)],
        )
    for r in rows:
        r.extra.update(model=entry.name, host=socket.gethostname(), pid=os.getpid(), batch_note=entry.note)
        print(json.dumps(r.to_json()), flush=True)
    return rows


def log_step(model: str, message: str) -> None:
    """Print which system and batch the run is at; the build's own steps ("kerasrt, batch 1:
    timing kernels ...") are left out."""
    if ": " not in message:
        print(f"[{time.strftime('%X')}] {model}: {message}", flush=True)


# -- the record and its tables ------------------------------------------------------------------


def save(path: str, env: dict, results: list[Result]) -> None:
    """Write the record atomically: a run killed while saving keeps the previous one."""
    with open(path + ".tmp", "w") as fh:
        json.dump({"schema": 1, **env, "results": [r.to_json() for r in results]}, fh, indent=1)
    os.replace(path + ".tmp", path)


def load_record(path: str) -> tuple[dict, list[Result]]:
    with open(path) as fh:
        data = json.load(fh)
    env = {k: v for k, v in data.items() if k not in ("schema", "results")}
    return env, [Result(**row) for row in data["results"]]


def previous_results(path: str, env: dict) -> list[Result]:
    """The rows of an earlier record at ``path`` (none if there is none); refuses a record
    made on another card or torch, whose rows would not compare with this run's."""
    if not os.path.exists(path):
        return []
    saved, results = load_record(path)
    for key in ("device", "torch"):
        if saved.get(key) != env.get(key):
            sys.exit(
                f"--resume: {path} was measured with {key} {saved.get(key)!r}, this run has {env.get(key)!r}"
            )
    return results


def _key(r: Result) -> tuple:
    return (r.extra.get("model"), r.batch, r.precision)


def comparisons(results: Sequence[Result]) -> list[dict]:
    """Per model, batch and precision: kerasrt against its fastest peer. ``speedup`` is the
    peer's median latency over kerasrt's (> 1: kerasrt is faster)."""
    rows = []
    for key in dict.fromkeys(_key(r) for r in results):
        group = {r.system: r for r in results if _key(r) == key}
        krt = group.get("kerasrt")
        peers = [group[s] for s in PEERS if s in group and group[s].latency_ms]
        best = min(peers, key=lambda r: r.latency_ms["p50"], default=None)
        ok = krt is not None and bool(krt.latency_ms)
        eager = group.get("keras-eager")
        rows.append(
            {
                "model": key[0],
                "batch": key[1],
                "precision": key[2],
                "kerasrt": krt if ok else None,
                "failure": None if ok else (krt.note if krt else "not run"),
                "peer": best,
                "speedup": best.latency_ms["p50"] / krt.latency_ms["p50"] if ok and best else None,
                "keras_mixed_err": eager.max_rel_err if eager is not None else None,
                "note": (krt or best or eager).extra.get("batch_note", "") if (krt or best or eager) else "",
            }
        )
    return rows


def geometric_mean(values: Sequence[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(results: list[Result], env: dict, command: str) -> str:
    runs = {(r.extra.get("host"), r.extra.get("pid")) for r in results}
    head = (
        f"Card: {env['device']}; torch {env['torch']}, keras {env['keras']}, triton {env.get('triton')}; "
        f"{env['date']}; command: `{command}`"
        + (f" (rows from {len(runs)} runs, resumed)" if len(runs) > 1 else "")
    )
    lines = [
        head,
        "",
        "| model | batch | kerasrt p50 ms | kerasrt /s | fastest peer | peer p50 ms | speedup "
        "| kerasrt err | Keras mixed err | build s | peak MiB kerasrt / peer |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    table = comparisons(results)
    for c in table:
        krt, peer = c["kerasrt"], c["peer"]
        name = f"{c['model']} ({c['note']})" if c["note"] else c["model"]
        peer_name = (
            f"{peer.system} ({peer.note})"
            if peer and peer.system == "torch-compile"
            else (peer.system if peer else "none")
        )
        if krt is None:
            lines.append(
                f"| {name} | {c['batch']} | failed: {c['failure'][-120:].strip().splitlines()[-1]} | | {peer_name} | "
                f"{_fmt(peer.latency_ms['p50'] if peer else None, '.3f')} | | | | | |"
            )
            continue
        lines.append(
            f"| {name} | {c['batch']} | {krt.latency_ms['p50']:.3f} | {krt.throughput:,.0f} | {peer_name} | "
            f"{_fmt(peer.latency_ms['p50'] if peer else None, '.3f')} | {_fmt(c['speedup'], '.2f')}{'x' if c['speedup'] else ''} | "
            f"{_fmt(krt.max_rel_err, '.1e')} | {_fmt(c['keras_mixed_err'], '.1e')} | {_fmt(krt.build_s, '.1f')} | "
            f"{_fmt(krt.peak_memory_mb, '.0f')} / {_fmt(peer.peak_memory_mb if peer else None, '.0f')} |"
        )
    lines.append("")
    for label, small in (("batch 1", True), ("large batch", False)):
        speedups = [c["speedup"] for c in table if c["speedup"] and (c["batch"] == 1) == small]
        below = sum(1 for s in speedups if s < 1.0)
        mean = geometric_mean(speedups)
        lines.append(
            f"- {label}: geometric-mean speedup over the fastest peer {_fmt(mean, '.2f')}x over "
            f"{len(speedups)} rows; {below} rows below 1.0x"
        )
    failed = [c for c in table if c["kerasrt"] is None]
    if failed:
        lines.append(
            f"- kerasrt failed on {len(failed)} rows: "
            + ", ".join(f"{c['model']} b{c['batch']}" for c in failed)
        )
    lines += [
        "",
        "All systems:",
        "",
        "| model | batch | system | p50 ms | throughput /s | max rel err | build s | peak MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if not r.latency_ms:
            tail = r.note.strip().splitlines()[-1][:120] if r.note.strip() else ""
            lines.append(f"| {r.extra.get('model')} | {r.batch} | {r.system} | failed: {tail} | | | | |")
            continue
        lines.append(
            f"| {r.extra.get('model')} | {r.batch} | {r.system} {r.note} | {r.latency_ms['p50']:.3f} | "
            f"{r.throughput:,.0f} | {_fmt(r.max_rel_err, '.1e')} | {_fmt(r.build_s, '.1f')} | {_fmt(r.peak_memory_mb, '.0f')} |"
        )
    profiled = [r for r in results if r.extra.get("top_kernels")]
    if profiled:
        lines += ["", "Top kernels (own device time per call, share of the call's kernel time):", ""]
        for r in profiled:
            top = "; ".join(
                f"{k['name'][:60]} {k['ms_per_call']:.3f} ms ({k['share']:.0%})"
                for k in r.extra["top_kernels"][:6]
            )
            lines.append(f"- {r.extra.get('model')} b{r.batch} {r.system}: {top}")
    return "\n".join(lines)


def plot(results: list[Result], path: str, title: str) -> None:
    """kerasrt's speedup over the fastest peer per model, sorted, one panel per batch class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    table = [c for c in comparisons(results) if c["speedup"]]
    panels = [
        ("batch 1", [c for c in table if c["batch"] == 1]),
        ("large batch", [c for c in table if c["batch"] != 1]),
    ]
    panels = [(label, rows) for label, rows in panels if rows]
    if not panels:
        raise SystemExit("no row has both kerasrt and a peer: nothing to plot")
    fig, axes = plt.subplots(
        1, len(panels), figsize=(7 * len(panels), 0.25 * max(len(r) for _, r in panels) + 2)
    )
    for ax, (label, rows) in zip(np.atleast_1d(axes), panels):
        rows = sorted(rows, key=lambda c: c["speedup"])
        speedups = [c["speedup"] for c in rows]
        ax.barh(
            [c["model"] for c in rows],
            [s - 1.0 for s in speedups],  # bars from 1.0x: right is faster than the peer
            left=1.0,
            color=["tab:red" if s < 1 else "tab:green" for s in speedups],
        )
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(0.5, min(speedups) / 1.2), max(2.0, max(speedups) * 1.2))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xlabel("speedup over the fastest peer (peer p50 / kerasrt p50)")
        ax.set_title(f"{label}: geometric mean {geometric_mean(speedups):.2f}x")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# -- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, default_models: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="zoo.json")
    parser.add_argument("--models", help="comma-separated subset of the zoo's model names (see --list)")
    parser.add_argument("--batches", help="comma-separated subset of each model's batch sizes")
    parser.add_argument("--precision", default="FP16", choices=sorted(PEER_DTYPES))
    parser.add_argument("--systems", default="kerasrt,keras-jax-jit,keras-eager")
    parser.add_argument("--no-peers", action="store_true", help="no torch.compile peer")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="ResNet50 and a 2-layer encoder only")
    parser.add_argument("--resume", action="store_true", help="keep --out's rows, measure only the rest")
    parser.add_argument("--list", action="store_true", help="print the zoo's models and exit")
    parser.add_argument("--report", metavar="RECORD", help="print the tables of a record, measure nothing")
    parser.add_argument("--plot", metavar="PNG", help="with --report: draw the speedups")
    parser.add_argument("--log", action="store_true", help="kerasrt's INFO log on stderr")
    parser.add_argument(
        "--profile", action="store_true", help="record kerasrt's and the torch.compile peer's top kernels"
    )
    parser.add_argument(
        "--exclude-kernels", default="", metavar="NAMES", help="kernel families kerasrt's tactics may not use"
    )
    args = parser.parse_args(argv)
    table = zoo(args.quick)
    if args.list:
        for e in table.values():
            print(f"{e.name}: batches {e.batches}, peer {e.peer or 'none'} {e.note}")
        return
    if args.report:
        env, results = load_record(args.report)
        print(markdown(results, env, env.get("command", "")))
        if args.plot:
            plot(results, args.plot, f"kerasrt vs the fastest peer, {env['device']}, {env['date']}")
        return
    if args.log:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("kerasrt").setLevel(logging.INFO)
    names = args.models.split(",") if args.models else list(default_models or table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; --list shows the zoo")
    env = environment()
    env["command"] = shlex.join(["python", *sys.argv])
    print(json.dumps(env), flush=True)
    results = previous_results(args.out, env) if args.resume else []
    done = {(r.extra.get("model"), r.batch) for r in results if r.system == "kerasrt" and r.latency_ms}
    results = [r for r in results if (r.extra.get("model"), r.batch) in done]  # failures are retried
    for name in names:
        entry = table[name]
        batches = [b for b in entry.batches if not args.batches or str(b) in args.batches.split(",")]
        batches = [b for b in batches if (name, b) not in done]
        if not batches:
            continue
        log_step(name, "building the Keras model")
        keras.backend.clear_session()
        model = entry.build()
        for batch in batches:
            results += measure_entry(entry, batch, args, model)
            torch.cuda.empty_cache()
            save(args.out, env, results)  # after every batch: a run cut short keeps what it measured
        del model
    print(markdown(results, env, env["command"]))


if __name__ == "__main__":
    sys.exit(main())
