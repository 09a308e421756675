"""Mixed input shapes from one conversion: a BERT-base encoder served a random mix of batch
sizes and sequence lengths, against static engines built for each exact shape and against
transformers' BertModel under torch.compile(dynamic=True), same card, same mix.

Run on the GPU machine:
    source .whl/activate.sh && python bench/dynamic.py --out $OUT/dynamic.json [--quick]

For each system: the time to serve the whole mix once from cold (compiles included, what a
service feels at start), then the steady per-request time (every shape warm; median over the
mix) and each shape's time. "kerasrt use_dynamic_shape": one ``Converter(model,
use_dynamic_shape=True).convert()`` with no input shapes, engines compiled once with symbolic
sizes. "kerasrt" (``--systems kerasrt``): the same conversion with static engines, one
compiled per new shape. "kerasrt static": a separate conversion with ``input_shapes`` for each
of the most frequent exact shapes, the reference of the "within 10% of a static engine"
bound (per-shape times).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np
import torch

import kerasrt
from kerasrt.bench import environment

WIDTH, HEADS, MLP, LAYERS, VOCAB, MAX_SEQ = 768, 12, 3072, 12, 30522, 512


@keras.saving.register_keras_serializable("kerasrt_bench")
class PositionEmbedding(keras.layers.Layer):
    """Learned positions for a sequence of any length up to ``max_length``."""

    def __init__(self, max_length: int, width: int, **kwargs):
        super().__init__(**kwargs)
        self.max_length, self.width = max_length, width

    def build(self, input_shape):
        self.table = self.add_weight(shape=(self.max_length, self.width), name="table")

    def call(self, x):
        return x + self.table[None, : keras.ops.shape(x)[1]]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "max_length": self.max_length, "width": self.width}


def bert_encoder(layers: int = LAYERS, width: int = WIDTH, heads: int = HEADS, mlp: int = MLP) -> keras.Model:
    """A BERT-base sized encoder of Keras layers whose sequence length is unknown."""
    L = keras.layers
    ids = keras.Input((None,), dtype="int32", name="input_ids")
    x = PositionEmbedding(MAX_SEQ, width)(L.Embedding(VOCAB, width)(ids))
    x = L.LayerNormalization(epsilon=1e-12)(x)
    for _ in range(layers):
        a = L.MultiHeadAttention(heads, width // heads)(x, x)
        x = L.LayerNormalization(epsilon=1e-12)(x + a)
        h = L.Dense(width)(L.Dense(mlp, activation="gelu")(x))
        x = L.LayerNormalization(epsilon=1e-12)(x + h)
    return keras.Model(ids, x, name="bert_encoder")


def request_mix(count: int, batches: list[int], lengths: list[int], seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [(int(rng.choice(batches)), int(rng.choice(lengths))) for _ in range(count)]


def serve(call, mix: list[tuple[int, int]], inputs: dict) -> tuple[float, list[float], dict]:
    """(seconds to serve the mix once from cold, per-request ms of a second warm pass, ms per
    shape (median of 5 warm calls))."""
    begin = time.perf_counter()
    for shape in mix:
        call(inputs[shape])
    torch.cuda.synchronize()
    cold = time.perf_counter() - begin
    warm, per_shape = [], {}
    for shape in mix:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        call(inputs[shape])
        end.record()
        torch.cuda.synchronize()
        warm.append(start.elapsed_time(end))
    for shape in sorted(set(mix)):
        times = []
        for _ in range(5):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            call(inputs[shape])
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        per_shape[f"{shape[0]}x{shape[1]}"] = float(np.median(times))
    return cold, warm, per_shape


def jax_worker(request: dict) -> None:
    """Child process (KERAS_BACKEND=jax): the model under jax.jit with a bfloat16 policy, served
    the mix. jax.jit compiles once per new input shape, so cold includes a compile per shape."""
    import jax

    from kerasrt.bench import keras_with_policy

    model = keras_with_policy(keras.models.load_model(request["model"], compile=False), "mixed_bfloat16")
    params = [v.value for v in model.trainable_variables]
    state = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def infer(params, state, x):
        return model.stateless_call(params, state, x, training=False)[0]

    mix = [tuple(s) for s in request["mix"]]
    rng = np.random.default_rng(1)
    inputs = {s: jax.device_put(rng.integers(0, VOCAB, s).astype("int32")) for s in sorted(set(mix))}

    def timed(shape: tuple) -> float:
        begin = time.perf_counter()
        jax.block_until_ready(infer(params, state, inputs[shape]))
        return (time.perf_counter() - begin) * 1e3

    cold = sum(timed(s) for s in mix) / 1e3
    warm = [timed(s) for s in mix]
    per_shape = {f"{s[0]}x{s[1]}": float(np.median([timed(s) for _ in range(5)])) for s in sorted(set(mix))}
    with open(request["out"], "w") as fh:
        json.dump({"cold_s": cold, "warm": warm, "per_shape": per_shape, "device": str(jax.devices()[0])}, fh)


def run_jax(model: keras.Model, mix: list[tuple[int, int]], folder: str) -> dict:
    """``jax_worker`` in a child process on this model (saved to ``folder``)."""
    import subprocess
    import sys

    path = os.path.join(folder, "bert_dynamic.keras")
    model.save(path)
    request = {"model": path, "mix": [list(s) for s in mix], "out": os.path.join(folder, "jax.json")}
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    done = subprocess.run(
        [sys.executable, __file__, "--jax-worker", json.dumps(request)],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the JAX worker failed: {done.stderr[-1500:]}")
    with open(request["out"]) as fh:
        return json.load(fh)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="dynamic.json")
    parser.add_argument("--quick", action="store_true", help="a 2-layer encoder and a small mix")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument(
        "--systems", default="kerasrt-dynamic,kerasrt-static,keras-jax-jit,torch-compile-dynamic"
    )
    parser.add_argument(
        "--static-shapes",
        type=int,
        default=3,
        help="static engines for this many of the most frequent shapes",
    )
    parser.add_argument("--jax-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.jax_worker:
        return jax_worker(json.loads(args.jax_worker))
    dev = torch.device("cuda")
    layers = 2 if args.quick else LAYERS
    batches, lengths = ([1, 8], [16, 128]) if args.quick else ([1, 8, 32, 64], [16, 128, 512])
    mix = request_mix(args.requests, batches, lengths)
    shapes = sorted(set(mix))
    rng = np.random.default_rng(1)
    host = {s: rng.integers(0, VOCAB, s).astype("int32") for s in shapes}
    inputs = {s: torch.from_numpy(x).to(dev) for s, x in host.items()}
    keras.utils.set_random_seed(0)
    model = bert_encoder(layers)
    record = {"environment": environment(), "mix": mix, "shapes": [list(s) for s in shapes], "rows": []}

    def row(system: str, cold: float, warm: list[float], per_shape: dict, note: str = "") -> None:
        record["rows"].append(
            {
                "system": system,
                "cold_s": round(cold, 2),
                "warm_ms_p50": float(np.median(warm)),
                "warm_ms_mean": float(np.mean(warm)),
                "per_shape_ms": per_shape,
                "note": note,
            }
        )
        print(json.dumps(record["rows"][-1]), flush=True)
        with open(args.out, "w") as fh:
            json.dump(record, fh, indent=1)

    systems = args.systems.split(",")
    variants = {  # system name -> (row name, use_dynamic_shape)
        "kerasrt-dynamic": ("kerasrt use_dynamic_shape (one conversion, one compile)", True),
        "kerasrt": ("kerasrt (one conversion)", False),
    }
    for system, (name, dynamic) in variants.items():
        if system not in systems:
            continue
        begin = time.perf_counter()
        optimized = kerasrt.Converter(
            model, precision_mode="FP16", use_dynamic_shape=dynamic, maximum_cached_engines=len(shapes)
        ).convert()
        convert_s = time.perf_counter() - begin
        cold, warm, per_shape = serve(optimized, mix, inputs)
        errors = []
        for s in shapes[:2]:
            want = keras.ops.convert_to_numpy(model(inputs[s])).astype(np.float64)
            got = optimized(inputs[s]).float().cpu().numpy()
            errors.append(float(np.abs(got - want).max() / np.abs(want).max()))
        row(name, convert_s + cold, warm, per_shape, f"convert {convert_s:.1f} s; rel err {max(errors):.1e}")
        del optimized
    if "kerasrt-static" in systems:
        engines, build = {}, 0.0
        frequent = sorted(shapes, key=lambda s: -mix.count(s))[: args.static_shapes]
        for s in frequent:
            begin = time.perf_counter()
            engines[s] = kerasrt.Converter(model, precision_mode="FP16", input_shapes=[s]).convert()
            engines[s](inputs[s])
            torch.cuda.synchronize()
            build += time.perf_counter() - begin
        sub = [s for s in mix if s in engines]
        cold, warm, per_shape = serve(lambda x: engines[tuple(x.shape)](x), sub, inputs)
        note = (
            f"builds {build:.1f} s, for the {len(frequent)} most frequent shapes ({len(sub)} of the requests)"
        )
        row("kerasrt static (one conversion per exact shape)", build + cold, warm, per_shape, note)
        del engines
    if "keras-jax-jit" in systems:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="kerasrt-dynamic-") as folder:
            done = run_jax(model, mix, folder)
        row(
            "Keras on JAX, jax.jit (bfloat16 policy; a compile per new shape)",
            done["cold_s"],
            done["warm"],
            done["per_shape"],
            done["device"],
        )
    if "torch-compile-dynamic" in systems:
        from transformers import BertConfig, BertModel

        config = BertConfig(
            hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=MLP, num_hidden_layers=layers
        )
        config._attn_implementation = "sdpa"
        module = BertModel(config, add_pooling_layer=False).eval().half().to(dev)
        torch._dynamo.reset()
        compiled = torch.compile(module, dynamic=True)
        with torch.no_grad():
            cold, warm, per_shape = serve(lambda x: compiled(x.long()).last_hidden_state, mix, inputs)
        row("transformers BertModel, torch.compile(dynamic=True)", cold, warm, per_shape)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
