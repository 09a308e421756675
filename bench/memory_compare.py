"""Peak GPU memory of kerasrt and of torch.compile on the same model, each measured alone in a
fresh process, the same way: the caching allocator's peaks (weights, workspaces, CUDA-graph
pools, activations) and what the driver reports in use, over build + warm-up + 20 calls.

    source .whl/activate.sh && python bench/memory_compare.py [BATCH]

Systems: "kerasrt convert" (Keras ResNet50 -> FP16 engines, conversion included),
"kerasrt load" (the saved artifact loaded and its engines compiled just in time), "kerasrt
load packages" (the artifact saved with its AOTInductor packages, loaded and run: what a
deployment holds), and
"torch.compile" (torchvision resnet50, reduce-overhead + freezing, fp16, channels-last).

Prints one JSON line per system (peak allocated and reserved MiB, allocated after, the driver's
memory in use after, the input's size); with $OUT set, also writes them to
$OUT/memory_b{BATCH}.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, sys
os.environ.setdefault("KERAS_BACKEND", "torch")
import torch
system, batch, art = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.cuda.init(); torch.zeros(1, device="cuda"); torch.cuda.synchronize()
free0, total = torch.cuda.mem_get_info()
if system == "torch.compile":
    import torchvision
    torch._inductor.config.freezing = True
    model = torchvision.models.resnet50().eval().half().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device="cuda").half().to(memory_format=torch.channels_last)
    fn = torch.compile(model, mode="reduce-overhead")
else:
    import kerasrt
    x = torch.randn(batch, 224, 224, 3, device="cuda")
    if system == "kerasrt convert":
        import keras
        model = keras.applications.ResNet50(weights=None, classifier_activation=None)
        conv = kerasrt.Converter(model, precision_mode="FP16", batch_size=batch)
        fn = conv.convert()
    elif system == "kerasrt load packages":
        fn = kerasrt.load(art + "-packages")
    else:
        fn = kerasrt.load(art, compiled_engines=False)
with torch.no_grad():
    for _ in range(23):
        y = fn(x)
torch.cuda.synchronize()
peak_allocated, peak_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
if system == "kerasrt convert":  # (saving is not part of the peaks above)
    conv.save(art, compiled_engines=False)
    conv.save(art + "-packages")
free1, _ = torch.cuda.mem_get_info()
mib = lambda b: round(b / 2**20, 1)
print(json.dumps({
    "system": system, "batch": batch,
    "peak_allocated_mib": mib(peak_allocated),
    "peak_reserved_mib": mib(peak_reserved),
    "allocated_after_mib": mib(torch.cuda.memory_allocated()),
    "driver_in_use_after_mib": mib(free0 - free1),
    "input_mib": mib(x.numel() * x.element_size()),
}))
"""


def main() -> None:
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        art = os.path.join(tmp, "resnet50.kerasrt")
        for system in ("kerasrt convert", "kerasrt load", "kerasrt load packages", "torch.compile"):
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, system, str(batch), art], capture_output=True, text=True
            )
            if proc.returncode:
                print(f"{system}: failed\n{proc.stderr[-3000:]}", flush=True)
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"memory_b{batch}.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
