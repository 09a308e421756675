"""One kernel family's sweep: every config on every layer of a model that the family runs,
against Inductor's way (the tactics' estimate), on the GPU.

    source .whl/activate.sh && python bench/kernels.py --kernel pointwise_conv \
        [--model MobileNetV2] [--batch 1,128] [--precision FP16] [--json $OUT/sweep.json]

Prints one JSON line per (layer, config) and a table of each layer's best config, its time,
Inductor's estimate and the ratio; ``--json`` also writes the rows. The layers are those of the
model's engines where the family is eligible (``kerasrt.kernels.registry``), with the
operands the engine would pass. cuDNN, whose candidates are its listed plans, reports its
fastest plan only. A merged family (``dual_conv``, ``pointwise_pair``) is swept on the merged
nodes the tactics made on this card.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import torch

import kerasrt
from kerasrt.kernels import registry
from kerasrt.kernels.registry import View
from kerasrt.tuning import tactics

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from kerasrt_testing import calibrated_application


def sweep(family: registry.KernelFamily, model_name: str, batch: int, precision: str) -> list[dict]:
    merged = family.ops[0] not in ("conv", "conv_fused")
    optimized = kerasrt.Converter(
        calibrated_application(model_name),
        precision_mode=precision,
        batch_size=batch,
        conv_kernels="auto" if merged else "inductor",  # merged nodes exist only where they won
    ).convert()
    program = optimized.program(optimized.engine_shapes[0])
    tuner = tactics.Tuner(torch.device("cuda"))
    rows = []
    for seg in program.segments:
        if seg.kind != "engine":
            continue
        view = View(seg.nodes, seg.outputs)
        for node in seg.nodes:
            if node.op not in family.ops or not family.eligible(node, view):
                continue
            operands = tuner.operands()
            args = family.arguments(node, operands, view)
            base = {
                "model": model_name,
                "batch": batch,
                "layer": node.layer,
                "output": node.outputs[0].type_str(),
            }
            inductor = tuner.inductor_ms(node, view, operands) if not merged else None
            if family.tune is not None:
                found = family.tune(args, {}, tactics.device_ms)
                timed = {found[0]: found[1]} if found else {}
            else:
                timed = {}
                for index, config in enumerate(family.configs):
                    if family.timed(config, args):
                        try:
                            timed[index] = tactics.device_ms(
                                lambda index=index, args=args: family.call(args, index)
                            )
                        except Exception as exc:  # a config that does not compile or run
                            print(json.dumps({**base, "config": index, "error": str(exc)[:200]}), flush=True)
            for index, ms in timed.items():
                row = {
                    **base,
                    "config": index,
                    "ms": round(ms, 5),
                    "inductor_ms": inductor and round(inductor, 5),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    best: dict[tuple, dict] = {}
    for row in rows:
        key = (row["batch"], row["layer"])
        if key not in best or row["ms"] < best[key]["ms"]:
            best[key] = row
    lines = [
        "| batch | layer | output | best config | ms | Inductor ms | Inductor / kernel |",
        "|---|---|---|---|---|---|---|",
    ]
    for (batch, layer), r in sorted(best.items()):
        ratio = f"{r['inductor_ms'] / r['ms']:.2f}" if r["inductor_ms"] else "-"
        lines.append(
            f"| {batch} | {layer} | {r['output']} | {r['config']} | {r['ms']:.4f} | {r['inductor_ms'] or '-'} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", required=True, choices=[f.name for f in registry.families()])
    parser.add_argument("--model", default="ResNet50", help="a keras.applications architecture")
    parser.add_argument("--batch", default="1,128")
    parser.add_argument("--precision", default="FP16", choices=["FP16", "BF16"])
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py times GPU kernels: it needs a CUDA device")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    family = registry.family(args.kernel)
    rows = []
    for batch in map(int, args.batch.split(",")):
        rows += sweep(family, args.model, batch, args.precision)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
