"""The Triton compile pool: collecting what launches would compile, and compiling it in worker
processes (real ones, running a stand-in kernel module: CI has no GPU and no Triton)."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import textwrap
import threading
import types
from types import SimpleNamespace

import pytest

from kerasrt.tuning import compile_pool
from kerasrt.tuning.compile_pool import Request


class FakeKernel:
    """Calls Triton's ``jit_cache_hook`` the way a JIT function's first launch of a
    specialization does, and compiles (records) it only when the hook does not say skip."""

    def __init__(self, runtime: SimpleNamespace, compiled: list[str]):
        self.runtime, self.compiled = runtime, compiled

    def warmup(self, spec: str, device: int = 0) -> None:
        hook = self.runtime.jit_cache_hook
        fn = SimpleNamespace(module="fake_kernels", name="Kernels.conv")
        if hook is not None and hook(fn=fn, compile={"specialization_data": spec, "device": device}):
            return
        self.compiled.append(spec)


def test_collect_records_specializations_in_order_and_compiles_none() -> None:
    previous_calls: list[str] = []
    runtime = SimpleNamespace(
        jit_cache_hook=lambda **kw: previous_calls.append(kw["compile"]["specialization_data"])
    )
    previous = runtime.jit_cache_hook
    compiled: list[str] = []
    kernel = FakeKernel(runtime, compiled)

    def launches() -> None:
        kernel.warmup('{"BLOCK": 64}')
        kernel.warmup('{"BLOCK": 32}', device=1)
        kernel.warmup('{"BLOCK": 64}')  # the same specialization again: one request
        other = threading.Thread(target=kernel.warmup, args=('{"other": 1}',))
        other.start()  # another thread's launch compiles as usual, past the previous hook
        other.join()

    requests = compile_pool.collect(launches, runtime)
    assert requests == [
        compile_pool.triton_request("fake_kernels", "Kernels.conv", '{"BLOCK": 64}', 0),
        compile_pool.triton_request("fake_kernels", "Kernels.conv", '{"BLOCK": 32}', 1),
    ]
    assert compiled == ['{"other": 1}'] and previous_calls == ['{"other": 1}']
    assert runtime.jit_cache_hook is previous  # restored

    def failing() -> None:
        kernel.warmup("{}")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        compile_pool.collect(failing, runtime)
    assert runtime.jit_cache_hook is previous


FAKE_KERNELS = textwrap.dedent(
    """
    import json, os, pathlib, time

    class Kernels:
        class conv:
            @staticmethod
            def preload(spec):
                data = json.loads(spec)
                time.sleep(data.get("sleep", 0))
                os.write(1, b"compiler chatter on fd 1\\n")  # must not corrupt a worker's replies
                if data.get("fail"):
                    raise RuntimeError("does not compile")
                if data.get("crash") and os.getpid() != int(os.environ["FAKE_PARENT_PID"]):
                    os._exit(3)  # a worker dies mid-request
                pathlib.Path(os.environ["FAKE_OUT"], str(data["id"])).write_text(str(os.getpid()))

    def whoami(x):
        return [x, os.getpid()]
    """
)


@pytest.fixture
def fake_kernels(tmp_path, monkeypatch):
    """A kernel module importable here and in workers; compiled ids land in ``out``."""
    (tmp_path / "fake_kernels.py").write_text(FAKE_KERNELS)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_OUT", str(out))
    monkeypatch.setenv("FAKE_PARENT_PID", str(os.getpid()))
    sys.modules.pop("fake_kernels", None)
    yield out
    sys.modules.pop("fake_kernels", None)


def request(**spec) -> Request:
    return compile_pool.triton_request("fake_kernels", "Kernels.conv", json.dumps(spec), 0)


def test_workers_compile_the_requests_and_this_process_what_they_did_not(fake_kernels, monkeypatch) -> None:
    monkeypatch.setenv(compile_pool.WORKERS_VARIABLE, "2")
    monkeypatch.setattr(compile_pool, "THREADS_BESIDE_WORKERS", 0)  # workers take every request
    monkeypatch.setattr(compile_pool, "MIN_REQUESTS", 32)
    requests = [request(id=i) for i in range(40)] + [
        request(id="bad", fail=True),
        request(id="dies", crash=True),
    ]
    results, workers = compile_pool.compile_requests(requests)
    assert workers == 2 and set(results) == set(requests) - {requests[-2]}
    compiled = {p.name: int(p.read_text()) for p in fake_kernels.iterdir()}
    assert set(compiled) == {str(i) for i in range(40)} | {"dies"}  # "bad" compiles nowhere
    assert compiled["dies"] == os.getpid()  # its worker died: compiled here instead
    workers = {pid for name, pid in compiled.items() if name != "dies"}
    assert os.getpid() not in workers and 1 <= len(workers) <= 2  # (one may start late and find none)


def test_without_workers_everything_compiles_here(fake_kernels, monkeypatch, caplog) -> None:
    monkeypatch.setenv(compile_pool.WORKERS_VARIABLE, "0")
    with caplog.at_level(logging.DEBUG, logger="kerasrt.tuning.compile_pool"):
        assert (
            compile_pool.compile_requests([request(id=i) for i in range(40)] + [request(id="x", fail=True)])[
                1
            ]
            == 0
        )
    compiled = {p.name: int(p.read_text()) for p in fake_kernels.iterdir()}
    assert set(compiled) == {str(i) for i in range(40)} and set(compiled.values()) == {os.getpid()}
    assert "does not compile" in caplog.text


def test_requests_for_workers_only_run_in_workers_and_return_results(fake_kernels, monkeypatch) -> None:
    monkeypatch.setattr(compile_pool, "MIN_REQUESTS", 4)
    only_workers = [Request("fake_kernels:whoami", (i,), here=False) for i in range(6)]
    monkeypatch.setenv(compile_pool.WORKERS_VARIABLE, "2")
    results, workers = compile_pool.compile_requests([*only_workers, request(id="a")])
    assert workers == 1  # 7 requests, one worker per 4
    assert [results[r][0] for r in only_workers] == list(range(6))
    assert {results[r][1] for r in only_workers} != {os.getpid()}  # done by the worker
    monkeypatch.setenv(compile_pool.WORKERS_VARIABLE, "0")
    results, workers = compile_pool.compile_requests([*only_workers, request(id="b")])
    assert workers == 0 and list(results) == [request(id="b")]  # the others are left undone
    assert compile_pool.run("fake_kernels:whoami", [7]) == [7, os.getpid()]


def test_gpu_requests_go_to_the_first_gpu_workers_only(fake_kernels, monkeypatch) -> None:
    monkeypatch.setattr(compile_pool, "MIN_REQUESTS", 8)
    monkeypatch.setenv(compile_pool.GPU_WORKERS_VARIABLE, "1")
    monkeypatch.setattr(compile_pool, "THREADS_BESIDE_WORKERS", 0)
    monkeypatch.setenv(compile_pool.WORKERS_VARIABLE, "3")
    gpu = [Request("fake_kernels:whoami", (i,), here=False, gpu=True) for i in range(12)]
    plain = [request(id=i, sleep=0.05) for i in range(12)]
    results, workers = compile_pool.compile_requests([*plain, *gpu])
    assert workers == 3 and set(results) == {*plain, *gpu}
    gpu_pids = {results[r][1] for r in gpu}
    plain_pids = {int(p.read_text()) for p in fake_kernels.iterdir()}
    assert len(gpu_pids) == 1 and os.getpid() not in gpu_pids | plain_pids  # one worker took them all
    assert plain_pids - gpu_pids  # while the others compiled the rest
    monkeypatch.setenv(compile_pool.GPU_WORKERS_VARIABLE, "0")  # none: left to their callers
    results, workers = compile_pool.compile_requests([*plain, *gpu])
    assert workers == 3 and set(results) == set(plain)
    monkeypatch.setenv(compile_pool.WORKERS_VARIABLE, "0")
    here = Request("fake_kernels:whoami", ("here",), gpu=True)  # no worker: done here, as any
    results, workers = compile_pool.compile_requests([here, *gpu])
    assert workers == 0 and results == {here: ["here", os.getpid()]}


def fake_triton_compiler(monkeypatch) -> types.ModuleType:
    """A stand-in for ``triton.backends.nvidia.compiler``: the ptxas version memoized per
    process (by function and by backend method, as Triton's), read from FAKE_PTXAS."""
    compiler = types.ModuleType("triton.backends.nvidia.compiler")

    @functools.lru_cache
    def get_ptxas_version(arch: int = 80) -> str:
        return os.environ["FAKE_PTXAS"]

    class CUDABackend:
        @functools.lru_cache  # noqa: B019 (as Triton's)
        def hash(self) -> str:
            return f"{get_ptxas_version()}-90"

    compiler.get_ptxas_version, compiler.CUDABackend = get_ptxas_version, CUDABackend
    nvidia = types.ModuleType("triton.backends.nvidia")
    nvidia.compiler = compiler
    for name, module in [
        ("triton", types.ModuleType("triton")),
        ("triton.backends", types.ModuleType("triton.backends")),
        ("triton.backends.nvidia", nvidia),
        ("triton.backends.nvidia.compiler", compiler),
    ]:
        monkeypatch.setitem(sys.modules, name, module)
    return compiler


def test_workers_and_this_process_key_kernels_by_the_same_ptxas(fake_kernels, monkeypatch) -> None:
    """Inductor repoints TRITON_PTXAS_PATH after this process memoized the old ptxas's
    version: workers (fresh, with the new environment) would key their kernels by the new one
    and every kernel they compiled would miss here. Starting workers makes this process look
    again."""
    compiler = fake_triton_compiler(monkeypatch)
    backend = compiler.CUDABackend()
    monkeypatch.setenv("FAKE_PTXAS", "bundled 12.9")
    assert backend.hash() == "bundled 12.9-90"  # memoized by a first compile
    monkeypatch.setenv("FAKE_PTXAS", "torch 13.0")  # what Inductor's first compile does
    monkeypatch.setattr(compile_pool, "MIN_REQUESTS", 4)
    monkeypatch.setenv(compile_pool.WORKERS_VARIABLE, "0")
    compile_pool.compile_requests([request(id=i) for i in range(4)])
    assert backend.hash() == "bundled 12.9-90"  # no worker: nothing to agree with
    monkeypatch.setenv(compile_pool.WORKERS_VARIABLE, "1")
    assert compile_pool.compile_requests([request(id=i) for i in range(4, 8)])[1] == 1
    assert backend.hash() == "torch 13.0-90" and compiler.get_ptxas_version() == "torch 13.0"


def test_how_many_workers(monkeypatch, caplog) -> None:
    monkeypatch.delenv(compile_pool.WORKERS_VARIABLE, raising=False)
    cores = min(compile_pool.usable_cores(), compile_pool.MAX_WORKERS)
    assert compile_pool.worker_count(compile_pool.MIN_REQUESTS - 1) == 0  # a few: compiled here
    assert compile_pool.worker_count(1000) == cores
    n = compile_pool.MIN_REQUESTS + 12
    assert compile_pool.worker_count(n) == min(cores, n // compile_pool.REQUESTS_PER_WORKER)
    monkeypatch.setenv(compile_pool.WORKERS_VARIABLE, "0")
    assert compile_pool.worker_count(1000) == 0
    monkeypatch.setenv(compile_pool.WORKERS_VARIABLE, "64")
    assert compile_pool.worker_count(1000) == 64
    monkeypatch.setenv(compile_pool.WORKERS_VARIABLE, "many")
    with caplog.at_level(logging.WARNING, logger="kerasrt.tuning.compile_pool"):
        assert compile_pool.worker_count(1000) == cores
    assert "KERASRT_COMPILE_WORKERS='many'" in caplog.text


def test_supported_needs_the_hook_and_preload(monkeypatch) -> None:
    import types

    def fake_triton(knobs: bool, preload: bool) -> None:
        triton = types.ModuleType("triton")
        if knobs:
            triton.knobs = SimpleNamespace(runtime=SimpleNamespace(jit_cache_hook=None))
        jit = types.ModuleType("triton.runtime.jit")
        jit.JITFunction = type("JITFunction", (), {"preload": lambda self, data: None} if preload else {})
        for name, module in (
            ("triton", triton),
            ("triton.runtime", types.ModuleType("r")),
            ("triton.runtime.jit", jit),
        ):
            monkeypatch.setitem(sys.modules, name, module)

    fake_triton(knobs=True, preload=True)
    assert compile_pool.supported()
    fake_triton(knobs=False, preload=True)  # Triton before 3.4: no knobs
    assert not compile_pool.supported()
    fake_triton(knobs=True, preload=False)
    assert not compile_pool.supported()


def test_an_interrupted_compile_stops_after_the_requests_under_way(fake_kernels, monkeypatch) -> None:
    monkeypatch.setenv(compile_pool.WORKERS_VARIABLE, "0")
    monkeypatch.setattr(compile_pool, "THREADS", 1)
    real_join = threading.Thread.join

    def interrupted_join(self, timeout=None):
        if self.name.startswith("kerasrt-compile"):
            raise KeyboardInterrupt  # Ctrl-C while this process waits for the compiles
        return real_join(self, timeout)

    monkeypatch.setattr(threading.Thread, "join", interrupted_join)
    with pytest.raises(KeyboardInterrupt):
        compile_pool.compile_requests([request(id=i, sleep=0.02) for i in range(200)])
    monkeypatch.setattr(threading.Thread, "join", real_join)
    for thread in threading.enumerate():
        if thread.name.startswith("kerasrt-compile"):
            thread.join()
    assert len(list(fake_kernels.iterdir())) < 10  # not all 200 (4 s of them)
