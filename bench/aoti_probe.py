"""Why does an AOTInductor CUDA package crash the loader on this GPU machine (diagnostic)?

Compiles one small package (conv2d + ReLU, fp16) and loads it in several ways: in the process
that compiled it, in fresh processes with and without a CUDA context first, without the
checkout's PYTHONPATH, through the lower-level container runner on the extracted .so, and
under gdb when the machine has it (native stack of the crash).

    source .whl/activate.sh && python bench/aoti_probe.py
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import torch

LOAD = """
import sys, torch
p, mode = sys.argv[1], sys.argv[2]
if mode in ("cuda-first", "no-pythonpath"):
    torch.zeros(1, device="cuda")
if mode == "runner":
    torch.zeros(1, device="cuda")
    r = torch._C._aoti.AOTIModelContainerRunnerCuda(p, 1, "cuda")
    x = torch.randn(2, 8, 16, 16, device="cuda").half()
    print("ran", r.run([x])[0].shape, flush=True)
    sys.exit(0)
r = torch._inductor.aoti_load_package(p)
print("loaded", flush=True)
x = torch.randn(2, 8, 16, 16, device="cuda").half()
out = r(x)
print("ran", out[0].shape if isinstance(out, (list, tuple)) else out.shape, flush=True)
"""


class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(8, 8, 3, 3, device="cuda").half())

    def forward(self, x):
        return (torch.conv2d(x, self.w, padding=1).relu(),)


def run(label: str, argv: list[str], env: dict | None = None) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    tail = (proc.stdout.strip()[-300:] + " | " + proc.stderr.strip()[-1500:]) if proc.returncode else ""
    print(f"[{label}] exit {proc.returncode}", proc.stdout.strip()[-200:], tail, flush=True)


def main() -> None:
    """Run as ``python -X faulthandler bench/aoti_probe.py`` for the Python stack of a crash."""
    m = M()
    x = torch.randn(2, 8, 16, 16, device="cuda").half()
    ep = torch.export.export(m, (x,))
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "m.pt2")
    print("compiling", flush=True)
    torch._inductor.aoti_compile_and_package(ep, package_path=path)
    print("compiled", os.path.getsize(path), "bytes; loading it in this process", flush=True)
    py = [sys.executable, "-X", "faulthandler", "-c", LOAD]
    run("fresh, no CUDA first", [*py, path, "plain"])
    run("fresh, CUDA first", [*py, path, "cuda-first"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run("fresh, no PYTHONPATH", [*py, path, "no-pythonpath"], env)
    extracted = os.path.join(tmp, "x")
    with zipfile.ZipFile(path) as z:
        z.extractall(extracted)
        print("package files:", [(i.filename, i.file_size) for i in z.infolist()][:12], flush=True)
    libs = glob.glob(os.path.join(extracted, "**", "*.so"), recursive=True)
    for so in libs:
        ldd = subprocess.run(["ldd", so], capture_output=True, text=True).stdout
        print("ldd", so, "\n", ldd[-1500:], flush=True)
        run("runner on extracted .so", [*py, so, "runner"])
    gdb = shutil.which("gdb")
    print("gdb:", gdb, flush=True)
    if gdb:
        run(
            "gdb",
            [
                gdb,
                "-batch",
                "-ex",
                "run",
                "-ex",
                "bt 25",
                "--args",
                sys.executable,
                "-c",
                LOAD,
                path,
                "plain",
            ],
        )
    try:  # last: a crash here ends the probe
        r = torch._inductor.aoti_load_package(path)
        print("[same process] ran", r(x)[0].shape, flush=True)
    except Exception as exc:
        print("[same process] failed", type(exc).__name__, str(exc)[:300], flush=True)


if __name__ == "__main__":
    main()
