"""Save with ahead-of-time compiled engines, then load in a fresh process: how long until the
first inference, and does the loaded model run at the compiled model's speed?

    source .whl/activate.sh && python bench/load_time.py [MODEL] [BATCH]

MODEL: a keras.applications name (default ResNet50) or BERT (the suite's BERT-base encoder).

Prints JSON lines on stdout: the JIT build (convert + build seconds, latency), the save with
AOT engines (seconds, cuDNN plans saved and their bytes), then per load mode the loading
process's record (import, load and first-inference seconds, engines, CUDA graph, latency,
modules imported, Triton cache entries) and the loaded outputs' largest relative difference
from the JIT-built model's. Writes no files: the artifact lives in a temporary folder.

With KERASRT_PROFILE_LOAD=1 the loading processes print a profile (cumulative time) of load
and first inference. LOAD_MODES lists the loads to run (default
"no-cuda-graph,cuda-graph,fresh-machine"; a "profiled" load runs with CUDA graphs and prints
the profile; "fresh-machine" runs with CUDA graphs and empty kerasrt and Triton caches, as on
a machine that never built the model, and "fresh-machine-profiled" profiles that;
``triton_kernels_in_cache`` counts the entries of Triton's cache after the first inference:
kernels and launchers compiled there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

LOAD = """
import cProfile, dataclasses, logging, os, pstats, time, sys, json
logging.basicConfig(level=logging.WARNING)  # kerasrt's warnings (e.g. a failed CUDA-graph capture)
t0 = time.perf_counter()
import torch, numpy as np, kerasrt
from kerasrt.bench import sample_latencies, latency_stats
t1 = time.perf_counter()
profile = cProfile.Profile() if os.environ.get("KERASRT_PROFILE_LOAD") or "profiled" in sys.argv[4] else None
spent = {}
if profile:  # time kerasrt's first-call work per function, next to the profile
    from kerasrt.kernels import cudnn_conv, depthwise_conv, pointwise_conv
    def timed(module, name):
        fn = getattr(module, name)
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                n, total = spent.get(name, (0, 0.0))
                spent[name] = (n + 1, total + time.perf_counter() - t)
        setattr(module, name, wrapper)
    from kerasrt.backend import aoti
    import subprocess
    for module, name in ((cudnn_conv, "plan_for"), (cudnn_conv, "build_graph"), (cudnn_conv, "deserialized_plan"),
                         (cudnn_conv, "install_saved_plans"),
                         (pointwise_conv, "launch"), (depthwise_conv, "launch"),
                         (aoti, "package_problem"), (aoti, "load_package")):
        timed(module, name)
    popen_init = subprocess.Popen.__init__
    def logged_popen(self, args, *a, **k):  # which child processes the load starts
        spent.setdefault("subprocesses", []).append(str(args)[:160])
        popen_init(self, args, *a, **k)
    subprocess.Popen.__init__ = logged_popen
    profile.enable()
modules_before = set(sys.modules)
model = kerasrt.load(sys.argv[1])
if sys.argv[4] == "no-cuda-graph":
    model.settings = dataclasses.replace(model.settings, cuda_graphs=False)
t_load = time.perf_counter()
print("loaded", file=sys.stderr, flush=True)
x = torch.from_numpy(np.load(sys.argv[2])).cuda()
y = model(x); torch.cuda.synchronize()
t2 = time.perf_counter()
import collections  # which packages the load and first inference imported (slow without .pyc files)
imported = collections.Counter(m.split(".")[0] for m in set(sys.modules) - modules_before)
if profile:
    profile.disable()
    print("PROFILE", json.dumps(spent), file=sys.stderr)
    stats = pstats.Stats(profile, stream=sys.stderr)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats("kerasrt", 30)
    stats.print_callers("check_call|waitpid|builtins.compile")
print("first inference done", file=sys.stderr, flush=True)
program = model.program(model.engine_shapes[0])
cached = len(os.listdir(os.environ["TRITON_CACHE_DIR"])) if os.path.isdir(os.environ["TRITON_CACHE_DIR"]) else 0
kinds = sorted(e.compiler for e in program.compiled_engines.values())
stats = latency_stats(sample_latencies(lambda: model(x), torch.device("cuda"), 10, 50))
np.save(sys.argv[3], y.float().cpu().numpy())
print(json.dumps({"mode": sys.argv[4], "import_s": t1 - t0, "load_and_first_inference_s": t2 - t1, "load_s": t_load - t1,
                  "engines": kinds, "cuda_graph": program.captured, "latency_ms": stats,
                  "modules_imported": dict(imported.most_common(8)), "bytecode_writes": not sys.dont_write_bytecode,
                  "triton_kernels_in_cache": cached}))
"""


def main() -> None:
    import numpy as np
    import torch

    import kerasrt
    from kerasrt.bench import latency_stats, sample_latencies

    name = sys.argv[1] if len(sys.argv) > 1 else "ResNet50"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from kerasrt_testing import calibrated_application, randomize  # as the suite's

    if name == "BERT":  # the suite's BERT-base encoder, token ids in
        from suite import SEQ, VOCAB, bert_encoder

        model = randomize(bert_encoder())
        x = np.random.default_rng(0).integers(0, VOCAB, (batch, SEQ)).astype("int32")
    else:
        model = calibrated_application(name)  # raw init overflows FP16 in MobileNetV2
        x = np.random.default_rng(0).standard_normal((batch, 224, 224, 3)).astype("float32")
    t = time.perf_counter()
    conv = kerasrt.Converter(model, precision_mode="FP16", batch_size=batch)
    optimized = conv.convert()
    optimized(torch.from_numpy(x).cuda())
    torch.cuda.synchronize()
    build = time.perf_counter() - t
    x_cuda = torch.from_numpy(x).cuda()  # on the device, as in the loading process
    jit = latency_stats(sample_latencies(lambda: optimized(x_cuda), torch.device("cuda"), 10, 50))
    print(
        json.dumps({"model": name, "batch": batch, "convert_and_build_s": build, "jit_latency_ms": jit}),
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = conv.save(os.path.join(tmp, "art"))
        saved_s = time.perf_counter() - t
        plan_files = [
            path / e["compiled"]["cudnn_plans"]
            for e in json.loads((path / "manifest.json").read_text())["engines"]
            if e.get("compiled", {}).get("cudnn_plans")
        ]
        plans = sum(len(json.loads(f.read_text())["plans"]) for f in plan_files)
        size = sum(f.stat().st_size for f in plan_files)
        print(
            json.dumps({"save_with_aot_engines_s": saved_s, "cudnn_plans": plans, "cudnn_plans_bytes": size})
        )
        np.save(os.path.join(tmp, "x.npy"), x)
        for mode in os.environ.get("LOAD_MODES", "no-cuda-graph,cuda-graph,fresh-machine").split(","):
            out = os.path.join(tmp, f"y-{mode}.npy")
            env = dict(os.environ)
            if mode.startswith("fresh-machine"):
                env["TRITON_CACHE_DIR"] = os.path.join(tmp, mode, "triton")
                env["KERASRT_CACHE_DIR"] = os.path.join(tmp, mode, "kerasrt")
            proc = subprocess.run(
                [
                    sys.executable,
                    "-X",
                    "faulthandler",
                    "-c",
                    LOAD,
                    str(path),
                    os.path.join(tmp, "x.npy"),
                    out,
                    mode,
                ],
                capture_output=True,
                text=True,
                env=env,
            )
            if proc.returncode:
                print(f"{mode}: the loading process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
                continue
            notes = [ln for ln in proc.stderr.splitlines() if "WARNING" in ln or "Warning: " in ln]
            print("\n".join(notes[-10:]), flush=True)
            if os.environ.get("KERASRT_PROFILE_LOAD") or "profiled" in mode:
                print(proc.stderr[max(proc.stderr.find("PROFILE"), 0) :][:30000], flush=True)
            print(proc.stdout.strip().splitlines()[-1], flush=True)
            ref = optimized(torch.from_numpy(x).cuda()).float().cpu().numpy()
            got = np.load(out)
            print(
                json.dumps(
                    {
                        "mode": mode,
                        "loaded_vs_jit_max_rel": float(np.abs(got - ref).max() / np.abs(ref).max()),
                    }
                )
            )


if __name__ == "__main__":
    main()
