"""Why does an AOTInductor CUDA package crash the loader on this GPU machine (diagnostic)?

Compiles one small package (conv2d + ReLU, fp16) and loads it in several ways: in the process
that compiled it, in fresh processes with and without a CUDA context first, without the
checkout's PYTHONPATH, through the lower-level container runner on the extracted .so, and
under gdb when the machine has it, and with a small SIGSEGV handler preloaded that prints the
native stack (library + offset of every frame) when gdb is missing. Variants: a CUDA conv +
ReLU package and a CPU matmul package, each compiled with $CXX and with g++.

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


SEGV_HANDLER = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
static void on_segv(int sig, siginfo_t *info, void *ctx) {
  void *frames[64];
  int n = backtrace(frames, 64);
  fprintf(stderr, "native SIGSEGV at address %p, %d frames\n", info->si_addr, n);
  for (int i = 0; i < n; i++) {
    Dl_info d;
    if (dladdr(frames[i], &d) && d.dli_fname)
      fprintf(stderr, "  #%d %s+0x%lx (%s)\n", i, d.dli_fname,
              (unsigned long)((char *)frames[i] - (char *)d.dli_fbase), d.dli_sname ? d.dli_sname : "?");
    else
      fprintf(stderr, "  #%d %p\n", i, frames[i]);
  }
  fflush(stderr);
  _exit(139);
}
__attribute__((constructor)) static void install(void) {
  struct sigaction sa = {0};
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO;
  sigaction(SIGSEGV, &sa, NULL);
}
"""


def build_segv_handler(tmp: str) -> str | None:
    """Compile the SIGSEGV stack printer into a preloadable library (None without a C compiler)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src, lib = os.path.join(tmp, "segv.c"), os.path.join(tmp, "libsegv.so")
    with open(src, "w") as f:
        f.write(SEGV_HANDLER)
    proc = subprocess.run(
        [cc, "-shared", "-fPIC", "-O0", "-o", lib, src, "-ldl"], capture_output=True, text=True
    )
    if proc.returncode:
        print("segv handler did not compile:", proc.stderr[-500:], flush=True)
        return None
    return lib


def run(label: str, argv: list[str], env: dict | None = None) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    tail = (proc.stdout.strip()[-300:] + " | " + proc.stderr.strip()[-1500:]) if proc.returncode else ""
    print(f"[{label}] exit {proc.returncode}", proc.stdout.strip()[-200:], tail, flush=True)


class MatMul(torch.nn.Module):
    """A CUDA package with no Triton kernel: one cuBLAS call."""

    def __init__(self, device: str):
        super().__init__()
        self.register_buffer(
            "w", torch.randn(16, 16, device=device).half() if device == "cuda" else torch.randn(16, 16)
        )

    def forward(self, x):
        return (x @ self.w,)


LOAD_ANY = """
import sys, torch
p, device = sys.argv[1], sys.argv[2]
r = torch._inductor.aoti_load_package(p)
print("loaded", flush=True)
x = torch.randn(*map(int, sys.argv[3].split("x")), device=device)
x = x.half() if device == "cuda" else x
out = r(x)
print("ran", out[0].shape if isinstance(out, (list, tuple)) else out.shape, flush=True)
"""


def environment() -> None:
    """What builds and loads the packages here: compiler, ABI, libstdc++ and torch's build."""
    for cmd in (["cc", "--version"], ["g++", "--version"], ["ldconfig", "-p"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True).stdout
        except OSError as exc:
            out = str(exc)
        lines = out.splitlines()
        if cmd[0] == "ldconfig":
            lines = [ln for ln in lines if "libstdc++" in ln or "libcuda.so" in ln]
        print(" ".join(cmd), "->", " / ".join(lines[:4]), flush=True)
    print("CXX11 ABI", torch._C._GLIBCXX_USE_CXX11_ABI, "CXX env", os.environ.get("CXX"), flush=True)
    with open("/proc/self/maps") as f:
        print("libstdc++ loaded:", sorted({ln.split()[-1] for ln in f if "libstdc++" in ln}), flush=True)
    print(torch.__config__.show()[:1500], flush=True)


def main() -> None:
    """Run as ``python -X faulthandler bench/aoti_probe.py`` for the Python stack of a crash."""
    environment()
    tmp = tempfile.mkdtemp()
    handler = build_segv_handler(tmp)
    traced = dict(os.environ, LD_PRELOAD=handler) if handler else None
    compilers = [os.environ.get("CXX")] if os.environ.get("CXX") else []
    compilers += [c for c in ("g++",) if shutil.which(c)]
    for cxx in compilers:
        which = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
        lib = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True).stdout
        print("compiler", cxx, which, "its libstdc++:", os.path.realpath(lib.strip()), flush=True)
    variants = [
        *[
            (f"cuda conv+relu, cpp.cxx={cxx}", M(), (2, 8, 16, 16), "cuda", {"cpp.cxx": (None, cxx)})
            for cxx in compilers
        ],
        *[
            (f"cpu matmul, cpp.cxx={cxx}", MatMul("cpu"), (4, 16), "cpu", {"cpp.cxx": (None, cxx)})
            for cxx in compilers
        ],
    ]
    first = None
    for label, module, shape, device, configs in variants:
        x = torch.randn(*shape, device=device)
        x = x.half() if device == "cuda" else x
        path = os.path.join(tmp, f"{len(os.listdir(tmp))}.pt2")
        try:
            ep = torch.export.export(module, (x,))
            torch._inductor.aoti_compile_and_package(ep, package_path=path, inductor_configs=configs)
        except Exception as exc:  # a config this torch lacks
            print(f"[{label}] compile failed:", type(exc).__name__, str(exc)[:300], flush=True)
            continue
        first = first or path
        argv = [sys.executable, "-c", LOAD_ANY, path, device, "x".join(map(str, shape))]
        proc = subprocess.run(argv, capture_output=True, text=True, env=traced)
        print(f"[{label}] exit {proc.returncode}:", proc.stdout.strip()[-200:], flush=True)
        if proc.returncode:
            err = proc.stderr.strip()
            print(err[:2500], "\n...\n", err[-800:], flush=True)
    if first is None:
        return
    path = first
    extracted = os.path.join(tmp, "x")
    with zipfile.ZipFile(path) as z:
        z.extractall(extracted)
        print("package files:", [(i.filename, i.file_size) for i in z.infolist()][:12], flush=True)
    for so in glob.glob(os.path.join(extracted, "**", "*.so"), recursive=True):
        ldd = subprocess.run(["ldd", so], capture_output=True, text=True).stdout
        print("ldd", so, "\n", ldd[-1500:], flush=True)
        py = [sys.executable, "-X", "faulthandler", "-c", LOAD]
        run("runner on extracted .so", [*py, so, "runner"], traced)
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


if __name__ == "__main__":
    main()
