"""AOTInductor packages, the serialized form of compiled engines: the environment they are
valid for, a C++ toolchain that builds loadable ones, a crash-safe test load, a fast load.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from kerasrt import __version__, cache


def engine_environment(device: torch.device) -> dict[str, str]:
    """What a compiled engine is valid for: the processor (GPU architecture) and the versions
    of the compiler stack. A serialized engine built elsewhere is rebuilt, never run."""
    env = {"kerasrt": __version__, "torch": torch.__version__}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        env["device"] = f"cuda sm_{major}{minor}"
        with contextlib.suppress(ImportError):
            import triton

            env["triton"] = triton.__version__
    else:
        env["device"] = f"{device.type} {platform.machine()}"
    return env


class LoadedPackage:
    """A package loaded by torch's ``AOTIModelPackageLoader``, called like the engine's program:
    flat input tensors in, a tuple of output tensors out.

    Thinner than torch's ``AOTICompiledModel``: that class's module imports torch._inductor
    (~850 modules, 2 s with bytecode caches, 5 s without), and it re-parses the call's pytree
    specs on every call; an engine's inputs and outputs are flat already."""

    def __init__(self, loader: Any):
        self.loader = loader

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.loader.run(list(tensors)))

    def get_constant_fqns(self) -> list[str]:
        return self.loader.get_constant_fqns()

    def load_constants(
        self, constants: dict[str, torch.Tensor], *, check_full_update: bool, user_managed: bool
    ) -> None:
        """Hand the package its weights (``user_managed``: used in place, kept alive by the caller)."""
        self.loader.load_constants(constants, False, check_full_update, user_managed)


def load_package(path: Path, device: torch.device) -> Any:
    """The AOTInductor package at ``path`` as a callable model on ``device``.

    Run single-threaded: the container's run() otherwise polls an event of the previous run
    (cudaEventQuery), which breaks CUDA-graph capture; kerasrt calls an engine from one thread
    at a time (a captured graph's buffers are shared anyway). Built from torch's loader
    directly: ``torch._inductor.aoti_load_package`` first compares the package's device
    metadata with this machine's (kerasrt's manifest already has), and that probes the CPU's
    vector ISAs by compiling test libraries and loading each in a child process that imports
    torch: 38 s on the GPU machine (torch 2.11). Falls back to it if torch's internals moved."""
    from kerasrt.kernels import registry

    registry.families()  # the package calls kerasrt's ops: importing their families defines them
    index = device.index if device.index is not None else -1
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, index)
    except (AttributeError, TypeError):
        from torch._inductor import aoti_load_package

        return aoti_load_package(str(path), run_single_threaded=True, device_index=index)
    return LoadedPackage(loader)


_PROBE = """
import sys, torch
from pathlib import Path
from kerasrt.backend.aoti import load_package
device = torch.device(sys.argv[2])
if device.type == "cuda":
    torch.zeros(1, device=device)  # a CUDA context first, as in the process that will load it
load_package(Path(sys.argv[1]), device)
"""
"""What a test process does with a package: register kerasrt's custom ops, load it."""


_RUNTIME_PROBE = "#include <locale>\nint kerasrt_probe() { return (int)std::locale().name().size(); }\n"
"""A library that needs the C++ runtime (std::locale lives in it, not in a header)."""


@functools.cache
def links_shared_cxx_runtime(compiler: str) -> bool:
    """Whether ``compiler`` links a shared library against the shared C++ runtime
    (libstdc++.so or libc++.so), judged by building a tiny one and reading its dependencies."""
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp, "probe.cpp"), Path(tmp, "probe.so")
        src.write_text(_RUNTIME_PROBE)
        try:
            proc = subprocess.run(
                [compiler, "-shared", "-fPIC", "-o", str(lib), str(src)], capture_output=True, timeout=120
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return proc.returncode == 0 and re.search(rb"lib(std)?c\+\+\.so", lib.read_bytes()) is not None


_warned_compilers: set[str] = set()


def package_compiler() -> str | None:
    """The C++ compiler for AOTInductor packages: None keeps Inductor's own (``$CXX`` or g++),
    else the first of g++, c++, clang++ on PATH that links the C++ runtime as a shared library.

    A package is loaded into a process that already has the shared C++ runtime; a compiler that
    links a second, static copy into it (seen: a GCC wrapper script set as ``$CXX`` on the GPU
    machine, whose search path has only libstdc++.a) makes the package crash on load (SIGSEGV
    in std::regex's locale use on torch 2.11; an error on 2.13)."""
    from torch._inductor import cpp_builder

    try:
        configured = cpp_builder.get_cpp_compiler()
    except Exception:  # no compiler at all: Inductor reports that itself
        return None
    if links_shared_cxx_runtime(configured):
        return None
    for name in ("g++", "c++", "clang++"):
        found = shutil.which(name)
        if found and links_shared_cxx_runtime(found):
            if configured not in _warned_compilers:
                _warned_compilers.add(configured)
                warnings.warn(
                    f"the C++ compiler {configured} links the C++ runtime statically, which makes "
                    f"compiled engine packages crash when loaded; compiling them with {found} instead",
                    stacklevel=3,
                )
            return found
    return None


def compile_package(
    exported: Any, path: Path, *, weights_inside: bool = True, autotune: bool = False
) -> None:
    """Compile the exported program ``exported`` with AOTInductor into a package at ``path``,
    with a C++ compiler whose packages load (``package_compiler``). ``weights_inside=False``
    leaves the weights out (handed over at load). Export within
    ``op_library.inlining_kernels()`` for kerasrt's Triton kernels to be compiled in."""
    from torch._inductor import aoti_compile_and_package

    configs: dict[str, object] = {"aot_inductor.package_constants_in_so": weights_inside}
    compiler = package_compiler()
    if compiler is not None:
        configs["cpp.cxx"] = (None, compiler)
    if autotune:
        configs["max_autotune"] = True
    aoti_compile_and_package(exported, package_path=str(path), inductor_configs=configs)


def package_digest(path: Path) -> str:
    """A short hash of the package file at ``path``: what a test-load verdict is about."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:20]


_VOUCHED: set[str] = set()
"""Verdict keys of packages that loaded in a test process where they were built."""


def _verdict_key(digest: str, device: torch.device) -> str:
    return f"{digest}-{json.dumps(engine_environment(device), sort_keys=True)}"


def vouch(digest: str, device: torch.device) -> None:
    """Accept, in this process, that the package with ``digest`` loads on ``device``: it was
    test-loaded on the machine that built it, with the same environment (GPU architecture,
    library versions), which a saved package must match to be used at all. A load then skips
    its own test process (3-4 s, most of a first inference on a machine that never saw the
    model); a package file that differs from the one vouched for is tested as usual."""
    _VOUCHED.add(_verdict_key(digest, device))


def package_problem(path: Path, device: torch.device) -> str | None:
    """Why the AOTInductor package at ``path`` cannot be loaded here, or None if it can.

    A package can crash the loader (seen: SIGSEGV for every package built by a compiler that
    linked a static C++ runtime into it, see ``package_compiler``); a crash would take the
    user's process down, so each package is loaded once in a test process first, unless the
    building machine did that (``vouch``). The verdict is cached by the package's hash and
    the environment."""
    key = _verdict_key(package_digest(path), device)
    if key in _VOUCHED:
        return None
    verdicts = cache.read_json("packages.json")
    verdicts = verdicts if isinstance(verdicts, dict) else {}
    if key in verdicts:
        return verdicts[key]
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, str(path), str(device)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        problem = None
        if proc.returncode < 0:
            problem = (
                f"the package loader crashed ({signal.Signals(-proc.returncode).name}) in a test process"
            )
        elif proc.returncode:
            lines = proc.stderr.strip().splitlines()
            problem = f"the package does not load: {lines[-1] if lines else f'exit {proc.returncode}'}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot test-load the package ({exc})"  # not cached: may be transient
    verdicts[key] = problem
    cache.write_json("packages.json", verdicts)
    return problem
