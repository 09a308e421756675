"""A bounded load generator for ``kerasrt serve``: N concurrent clients send a fixed number of
inference requests over loopback (REST, JSON or binary tensors) and every answer is checked
against the artifact's direct call: none lost, none duplicated, none wrong. Reports request
throughput, p50/p99 latency and the batches the server formed.

    python bench/serve_load.py ARTIFACT [--clients 32] [--requests 2000] [--binary]
        [--configs dynamic,batch1] [--ray-replicas 1,2]

Each config starts its own server (a child process on free ports): ``dynamic`` batches up to
32 rows within 2 ms; ``batch1`` serves one request per engine call (``--max-batch-size 1``);
``--ray-replicas 1,2`` adds Ray Serve deployments of that many replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp
import httpx
import numpy as np

import kerasrt

CONFIGS = {
    "dynamic": ["--max-batch-size", "32", "--max-queue-delay-ms", "2"],
    "batch1": ["--max-batch-size", "1", "--max-queue-delay-ms", "0"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(artifact: Path, args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    http, grpc = free_port(), free_port()
    command = [
        sys.executable,
        "-m",
        "kerasrt",
        "serve",
        str(artifact),
        "--port",
        str(http),
        "--grpc-port",
        str(grpc),
    ]
    process = subprocess.Popen(
        [*command, *args],
        env={**os.environ, "KERAS_BACKEND": "torch"},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{http}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(log.read_text()[-2000:])
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError("server did not become ready")


def body(name: str, x: np.ndarray, request_id: str, binary: bool) -> tuple[bytes, dict[str, str]]:
    """A v2 request for ``x``: JSON numbers, or the binary tensor extension (JSON header + raw
    bytes, outputs asked for as binary too)."""
    tensor = {"name": name, "shape": list(x.shape), "datatype": "FP32"}
    if not binary:
        payload = {"id": request_id, "inputs": [{**tensor, "data": x.ravel().tolist()}]}
        return json.dumps(payload).encode(), {"content-type": "application/json"}
    raw = np.ascontiguousarray(x, dtype="float32").tobytes()
    header = json.dumps(
        {
            "id": request_id,
            "inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    headers = {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }
    return header + raw, headers


def outputs_of(content: bytes, headers: Mapping[str, str], binary: bool) -> tuple[str, np.ndarray]:
    if not binary:
        data = json.loads(content)
        return data["id"], np.asarray(data["outputs"][0]["data"], "float32")
    length = int(headers["inference-header-content-length"])
    header = json.loads(content[:length])
    return header["id"], np.frombuffer(content[length:], dtype="float32")


async def load(
    url: str, model: str, name: str, samples: np.ndarray, clients: int, total: int, binary: bool
) -> dict:
    latencies: list[float] = []
    answers: dict[str, np.ndarray] = {}
    duplicates = failures = 0
    counter = iter(range(total))

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal duplicates, failures
        for i in counter:
            request_id = f"r{i}"
            content, headers = body(name, samples[i % len(samples)][None], request_id, binary)
            began = time.perf_counter()
            async with http.post(f"{url}/v2/models/{model}/infer", data=content, headers=headers) as response:
                answer = await response.read()
                status, answer_headers = response.status, response.headers
            latencies.append(time.perf_counter() - began)
            if status != 200:
                failures += 1
                continue
            got_id, out = outputs_of(answer, answer_headers, binary)
            if got_id in answers:
                duplicates += 1
            answers[got_id] = out

    # aiohttp: httpx's connection pool spends O(connections) per request finding a free one,
    # which at 32 connections made the load generator, not the server, the bottleneck
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - began
    return {
        "answers": answers,
        "latencies": latencies,
        "seconds": seconds,
        "duplicates": duplicates,
        "failures": failures,
    }


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument(
        "--binary", action="store_true", help="binary tensor extension instead of JSON numbers"
    )
    parser.add_argument("--configs", default="dynamic,batch1")
    parser.add_argument("--ray-replicas", default="", help="e.g. 1,2: also Ray Serve with that many replicas")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = kerasrt.load(args.artifact, device=args.device)
    spec = model.inputs[0]
    shape = tuple(d or 1 for d in spec.shape[1:])
    samples = np.random.default_rng(0).uniform(0, 16, size=(256, *shape)).astype("float32")
    expected = np.concatenate([model(samples[i : i + 32]) for i in range(0, 256, 32)])
    runs = [(c, [*CONFIGS[c], "--device", args.device]) for c in args.configs.split(",") if c]
    runs += [
        (f"ray x{n}", ["--ray", "--replicas", n, "--device", args.device])
        for n in args.ray_replicas.split(",")
        if n
    ]
    print(
        f"{args.artifact.name}: {args.clients} clients, {args.requests} requests, {'binary' if args.binary else 'JSON'}"
    )
    print(
        f"{'config':<10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'rows/call':>9} {'lost':>5} {'dup':>4} {'wrong':>6} {'failed':>6}"
    )
    throughput = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, server_args in runs:
            process, url = start(args.artifact, server_args, Path(tmp) / f"{label}.log")
            try:
                asyncio.run(load(url, args.artifact.name, spec.name, samples, 4, 64, args.binary))  # warm up
                result = asyncio.run(
                    load(
                        url, args.artifact.name, spec.name, samples, args.clients, args.requests, args.binary
                    )
                )
                text = httpx.get(f"{url}/metrics").text
            finally:
                process.terminate()
                process.wait(120)
            answers = result["answers"]
            lost = args.requests - len(answers) - result["failures"]
            wrong = sum(
                not np.allclose(out, expected[int(i[1:]) % 256].ravel(), rtol=1e-5, atol=1e-5)
                for i, out in answers.items()
            )
            rows = metric(text, f'kerasrt_batch_size_sum{{model="{args.artifact.name}"}}') / metric(
                text, f'kerasrt_batch_size_count{{model="{args.artifact.name}"}}'
            )
            p50, p99 = (1e3 * np.percentile(result["latencies"], q) for q in (50, 99))
            throughput[label] = args.requests / result["seconds"]
            print(
                f"{label:<10} {throughput[label]:>8.0f} {p50:>8.2f} {p99:>8.2f} {rows:>9.2f} {lost:>5} "
                f"{result['duplicates']:>4} {wrong:>6} {result['failures']:>6}"
            )
    if "dynamic" in throughput and "batch1" in throughput:
        print(
            f"dynamic batching: {throughput['dynamic'] / throughput['batch1']:.2f}x the requests/s of batch-1 serving"
        )
    if "ray x1" in throughput and "ray x2" in throughput:
        print(f"Ray Serve: 2 replicas {throughput['ray x2'] / throughput['ray x1']:.2f}x one replica")


if __name__ == "__main__":
    main()
