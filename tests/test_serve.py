"""Serving: the dynamic batcher on its own (asyncio), and ``kerasrt serve`` as a user runs it (a
child process on loopback ports) spoken to with real clients: KServe's REST and gRPC inference
clients, the protocol's gRPC stub and plain HTTP for metadata and the repository extension.
Every answer is compared with the artifact's direct call."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kerasrt
from kerasrt.demo import DATA_PATH, MODEL_PATH
from kerasrt.serve.batcher import BatchingConfig, Closed, DynamicBatcher, QueueFull, RequestTimeout

DIGITS = np.load(DATA_PATH)["x"].astype("float32")


# -- the batcher -----------------------------------------------------------------------------
def rowwise(calls: list[int]):
    """A model whose output row i is a function of input row i alone; records batch sizes."""

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        calls.append(len(inputs[0]))
        if np.isnan(inputs[0]).any():
            raise RuntimeError("the engine met a NaN")
        return [inputs[0].sum(axis=1, keepdims=True) * 2.0, inputs[0][:, :1] + 1.0]

    return run


def run_async(coroutine):
    return asyncio.run(coroutine)


def test_concurrent_requests_share_one_engine_call_and_get_their_own_rows_back() -> None:
    calls: list[int] = []
    batcher = DynamicBatcher(rowwise(calls), BatchingConfig(max_batch_size=16, max_queue_delay_ms=50))
    requests = [np.random.default_rng(i).normal(size=(1 + i % 3, 4)).astype("float32") for i in range(7)]

    async def main():
        return await asyncio.gather(*(batcher.submit([r]) for r in requests))

    results = run_async(main())
    assert calls == [16]  # 14 rows, one call, padded to a power of two
    for request, (total, first) in zip(requests, results):
        np.testing.assert_array_equal(total, request.sum(axis=1, keepdims=True) * 2.0)
        np.testing.assert_array_equal(first, request[:, :1] + 1.0)


def test_batches_hold_at_most_max_batch_size_rows_and_never_mix_shapes() -> None:
    calls: list[int] = []
    batcher = DynamicBatcher(rowwise(calls), BatchingConfig(max_batch_size=4, max_queue_delay_ms=20))
    wide = [np.ones((1, 6), "float32") * i for i in range(3)]
    narrow = [np.ones((2, 4), "float32") * i for i in range(5)]

    async def main():
        return await asyncio.gather(*(batcher.submit([r]) for r in [*narrow, *wide]))

    results = run_async(main())
    assert sorted(calls) == [2, 4, 4, 4]  # narrow: 2+2, 2+2, 2; wide: 3 rows padded to 4
    for request, (total, _) in zip([*narrow, *wide], results):
        np.testing.assert_array_equal(total, request.sum(axis=1, keepdims=True) * 2.0)


def test_a_full_queue_refuses_at_once_and_an_engine_error_fails_only_its_batch() -> None:
    calls: list[int] = []
    config = BatchingConfig(max_batch_size=2, max_queue_delay_ms=30, max_queue_size=3)
    batcher = DynamicBatcher(rowwise(calls), config)
    poison = np.full((2, 4), np.nan, "float32")

    async def main():
        first = [asyncio.ensure_future(batcher.submit([x])) for x in (poison, np.ones((2, 4), "float32"))]
        await asyncio.sleep(0)
        began = time.perf_counter()
        more = [asyncio.ensure_future(batcher.submit([np.ones((1, 4), "float32")])) for _ in range(3)]
        results = await asyncio.gather(*first, *more, return_exceptions=True)
        return results, time.perf_counter() - began

    results, _ = run_async(main())
    assert isinstance(results[0], RuntimeError) and "NaN" in str(results[0])  # its own batch
    np.testing.assert_array_equal(results[1][0], np.full((2, 1), 8.0))  # the next batch ran
    refused = [r for r in results[2:] if isinstance(r, QueueFull)]
    assert len(refused) == 1 and "max_queue_size 3" in str(refused[0])


def test_a_request_past_its_timeout_fails_and_close_answers_every_accepted_request() -> None:
    def slow(inputs):
        time.sleep(0.3)
        return [inputs[0]]

    async def timeout():
        batcher = DynamicBatcher(slow, BatchingConfig(max_batch_size=1, timeout_s=0.1))
        with pytest.raises(RequestTimeout, match=r"within 0\.1 s"):
            await batcher.submit([np.ones((1, 2), "float32")])
        await batcher.close()

    run_async(timeout())

    async def drain():
        batcher = DynamicBatcher(slow, BatchingConfig(max_batch_size=1, max_queue_delay_ms=0))
        pending = [asyncio.ensure_future(batcher.submit([np.full((1, 2), i, "float32")])) for i in range(3)]
        await asyncio.sleep(0.05)
        began = time.perf_counter()
        await batcher.close()
        assert time.perf_counter() - began >= 0.5  # it waited for the queued requests to run
        await asyncio.wait_for(asyncio.gather(*pending), 0.5)
        with pytest.raises(Closed):
            await batcher.submit([np.ones((1, 2), "float32")])
        return [p.result()[0] for p in pending]

    for i, out in enumerate(run_async(drain())):
        np.testing.assert_array_equal(out, np.full((1, 2), i, "float32"))


def test_batching_config_rejects_nonsense_and_buckets_to_powers_of_two() -> None:
    config = BatchingConfig(max_batch_size=32)
    assert [config.bucket(n) for n in (1, 3, 17, 32, 40)] == [1, 4, 32, 32, 40]
    with pytest.raises(ValueError):
        BatchingConfig(max_batch_size=0)


# -- the server ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``kerasrt serve`` in a child process; ``stop()`` sends SIGTERM and waits."""

    def __init__(self, target: Path, *args: str, log: Path):
        self.log = log
        for _ in range(3):  # a port found free may be taken before the server binds it (Ray's)
            if self._start(target, args):
                return
        raise RuntimeError(f"kerasrt serve could not bind its ports:\n{log.read_text()[-3000:]}")

    def _start(self, target: Path, args: tuple[str, ...]) -> bool:
        """Start on two free ports; False where one was taken meanwhile."""
        self.http, self.grpc = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        env = {**os.environ, "KERAS_BACKEND": "torch"}
        command = [sys.executable, "-m", "kerasrt", "serve", str(target), "--port", str(self.http)]
        self.process = subprocess.Popen(
            [*command, "--grpc-port", str(self.grpc), "--device", "cpu", *args],
            env=env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                text = self.log.read_text()
                if "Failed to bind" in text or "address already in use" in text:
                    return False
                raise RuntimeError(f"kerasrt serve exited:\n{text[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.process.kill()
        raise RuntimeError(f"kerasrt serve did not become ready:\n{self.log.read_text()[-3000:]}")

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    """A directory of two artifacts: the digits CNN in FP32 and in INT8."""
    root = tmp_path_factory.mktemp("models")
    converter = kerasrt.Converter(MODEL_PATH, batch_size=4)
    converter.convert()
    converter.save(root / "digits")
    quantized = kerasrt.Converter(MODEL_PATH, precision_mode="INT8", batch_size=4)
    quantized.convert(calibration_input_fn=lambda: [DIGITS[:64]])
    quantized.save(root / "digits_int8")
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory) -> Iterator[Server]:
    running = Server(
        repository, "--max-queue-delay-ms", "5", log=tmp_path_factory.mktemp("log") / "serve.log"
    )
    yield running
    running.stop()


def direct(repository: Path, name: str, x: np.ndarray) -> np.ndarray:
    return kerasrt.load(repository / name, device="cpu")(x)


def json_infer(x: np.ndarray, name: str = "pixels", datatype: str = "FP32") -> dict:
    return {
        "id": "r1",
        "inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}],
    }


def test_rest_health_metadata_and_json_inference(server: Server, repository: Path) -> None:
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{server.url}/v2").json()["name"]
    assert httpx.get(f"{server.url}/v2/models/digits/ready").json()["ready"] is True
    meta = httpx.get(f"{server.url}/v2/models/digits").json()
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 8, 8, 1]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    x = DIGITS[:5]
    answer = httpx.post(f"{server.url}/v2/models/digits/infer", json=json_infer(x)).json()
    assert answer["id"] == "r1" and answer["outputs"][0]["shape"] == [5, 10]
    got = np.asarray(answer["outputs"][0]["data"], "float32").reshape(5, 10)
    np.testing.assert_allclose(got, direct(repository, "digits", x), rtol=1e-6, atol=1e-6)


def test_binary_rest_and_grpc_inference_with_kserve_clients(server: Server, repository: Path) -> None:
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest
    from kserve.inference_client import RESTConfig

    x = DIGITS[10:17]

    async def main():
        tensor = InferInput("pixels", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        request = InferRequest(model_name="digits_int8", infer_inputs=[tensor], request_id="b1")
        grpc_client = InferenceGRPCClient(f"127.0.0.1:{server.grpc}")
        rest_client = InferenceRESTClient(RESTConfig(protocol="v2"))
        try:
            assert await grpc_client.is_server_ready() and await grpc_client.is_model_ready("digits_int8")
            by_grpc = await grpc_client.infer(request)
            by_rest = await rest_client.infer(server.url, request, model_name="digits_int8")
        finally:
            await grpc_client.close()
            await rest_client.close()
        return by_grpc.outputs[0].as_numpy(), by_rest.outputs[0].as_numpy()

    by_grpc, by_rest = run_async(main())
    expected = direct(repository, "digits_int8", x)
    np.testing.assert_array_equal(by_grpc, expected)
    np.testing.assert_array_equal(by_rest, expected)


def test_grpc_metadata_and_repository_with_the_protocol_stub(server: Server) -> None:
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as stub

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc}") as channel:
        service = stub.GRPCInferenceServiceStub(channel)
        assert service.ServerLive(pb.ServerLiveRequest()).live
        meta = service.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("pixels", "FP32", [-1, 8, 8, 1])
        ]
        assert service.ModelReady(pb.ModelReadyRequest(name="digits_int8")).ready
        service.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="digits_int8"))
        with pytest.raises(grpc.RpcError) as unloaded:
            service.ModelMetadata(pb.ModelMetadataRequest(name="digits_int8"))
        assert unloaded.value.code() == grpc.StatusCode.NOT_FOUND
        service.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits_int8"))
        assert service.ModelReady(pb.ModelReadyRequest(name="digits_int8")).ready
        with pytest.raises(grpc.RpcError) as missing:
            service.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_models_unload_and_load_through_the_repository_extension(server: Server, repository: Path) -> None:
    assert set(httpx.get(f"{server.url}/v1/models").json()["models"]) == {"digits", "digits_int8"}
    assert httpx.post(f"{server.url}/v2/repository/models/digits_int8/unload").status_code == 200
    gone = httpx.post(f"{server.url}/v2/models/digits_int8/infer", json=json_infer(DIGITS[:2]))
    assert gone.status_code == 404
    assert httpx.post(f"{server.url}/v2/repository/models/digits_int8/load").status_code == 200
    back = httpx.post(f"{server.url}/v2/models/digits_int8/infer", json=json_infer(DIGITS[:2])).json()
    got = np.asarray(back["outputs"][0]["data"], "float32").reshape(2, 10)
    np.testing.assert_array_equal(got, direct(repository, "digits_int8", DIGITS[:2]))
    assert httpx.post(f"{server.url}/v2/repository/models/nothing/load").status_code >= 400


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (json_infer(DIGITS[:2], name="image"), 400, "missing ['pixels']"),
        (json_infer(DIGITS[:2].reshape(2, 64)), 400, "must have shape [-1, 8, 8, 1]"),
        (json_infer(DIGITS[:2].astype("int32"), datatype="INT32"), 400, "must be FP32"),
        (
            {"inputs": [{"name": "pixels", "shape": [2, 8, 8, 1], "datatype": "FP32", "data": [1.0, 2.0]}]},
            400,
            "",
        ),
        ({"inputs": "nonsense"}, 422, ""),
    ],
)
def test_malformed_requests_get_a_clear_4xx(server: Server, body: dict, status: int, message: str) -> None:
    answer = httpx.post(f"{server.url}/v2/models/digits/infer", json=body)
    assert answer.status_code == status, answer.text
    assert message in answer.text
    assert httpx.post(f"{server.url}/v2/models/unknown/infer", json=json_infer(DIGITS[:1])).status_code == 404
    raw = httpx.post(
        f"{server.url}/v2/models/digits/infer",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert 400 <= raw.status_code < 500


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(["inputs", "name", "shape", "datatype", "data", "id", "parameters"]),
                inner,
                max_size=5,
            )
        ),
        max_leaves=12,
    )
)
def test_fuzzed_bodies_never_crash_the_server(server: Server, body) -> None:
    # encoded here: Python writes Infinity/NaN (not JSON, but some clients send them), which
    # newer httpx versions refuse to encode
    content = json.dumps(body).encode()
    answer = httpx.post(
        f"{server.url}/v2/models/digits/infer", content=content, headers={"content-type": "application/json"}
    )
    assert answer.status_code < 500 or answer.status_code == 503, (body, answer.text)


def test_concurrent_clients_all_get_their_own_answers_and_are_batched(
    server: Server, repository: Path
) -> None:
    expected = direct(repository, "digits", DIGITS[:64])

    async def client(i: int, http: httpx.AsyncClient) -> tuple[int, np.ndarray]:
        x = DIGITS[i : i + 1]
        body = json_infer(x)
        body["id"] = f"c{i}"
        answer = (await http.post(f"{server.url}/v2/models/digits/infer", json=body)).json()
        assert answer["id"] == f"c{i}"
        return i, np.asarray(answer["outputs"][0]["data"], "float32")

    async def main():
        async with httpx.AsyncClient(timeout=30) as http:
            return await asyncio.gather(*(client(i, http) for i in range(64)))

    for i, got in run_async(main()):
        np.testing.assert_allclose(got, expected[i], rtol=1e-6, atol=1e-6)
    metrics = httpx.get(f"{server.url}/metrics").text
    count = float(_metric(metrics, 'kerasrt_batch_size_count{model="digits"}'))
    total = float(_metric(metrics, 'kerasrt_batch_size_sum{model="digits"}'))
    assert total >= 64 and total / count > 1.0  # requests shared engine calls
    assert float(_metric(metrics, 'kerasrt_requests_total{model="digits",outcome="ok"}')) >= 64
    assert "kerasrt_queue_seconds_bucket" in metrics and "kerasrt_gpu_memory_bytes" in metrics


def _metric(text: str, name: str) -> str:
    return next(line.split()[-1] for line in text.splitlines() if line.startswith(name))


def test_overload_answers_503_and_resource_exhausted_at_once(repository: Path, tmp_path: Path) -> None:
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as stub

    slow = Server(
        repository / "digits", "--max-queue-size", "2", "--max-queue-delay-ms", "1500", "--max-batch-size", "64",
        log=tmp_path / "serve.log",
    )  # fmt: skip
    try:

        async def main():
            async with httpx.AsyncClient(timeout=30) as http:
                posts = [
                    http.post(f"{slow.url}/v2/models/digits/infer", json=json_infer(DIGITS[:1]))
                    for _ in range(6)
                ]
                began = time.perf_counter()
                answers = await asyncio.gather(*posts)
                return answers, time.perf_counter() - began

        answers, _ = run_async(main())
        codes = sorted(a.status_code for a in answers)
        assert codes == [200, 200, 503, 503, 503, 503], [a.text for a in answers]
        assert "max_queue_size 2" in next(a.text for a in answers if a.status_code == 503)
        # over gRPC: fill the queue with two slow REST requests, then one gRPC call is refused
        with grpc.insecure_channel(f"127.0.0.1:{slow.grpc}") as channel:
            service = stub.GRPCInferenceServiceStub(channel)

            async def fill_then_call():
                async with httpx.AsyncClient(timeout=30) as http:
                    posts = [
                        asyncio.ensure_future(
                            http.post(f"{slow.url}/v2/models/digits/infer", json=json_infer(DIGITS[:1]))
                        )
                        for _ in range(2)
                    ]
                    await asyncio.sleep(0.5)
                    tensor = pb.ModelInferRequest.InferInputTensor(
                        name="pixels", datatype="FP32", shape=[1, 8, 8, 1]
                    )
                    tensor.contents.fp32_contents.extend(DIGITS[0].ravel().tolist())
                    began = time.perf_counter()
                    with pytest.raises(grpc.RpcError) as refused:
                        service.ModelInfer(pb.ModelInferRequest(model_name="digits", inputs=[tensor]))
                    waited = time.perf_counter() - began
                    await asyncio.gather(*posts)
                    return refused.value.code(), waited

            code, waited = run_async(fill_then_call())
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and waited < 1.0
    finally:
        slow.stop()


def test_sigterm_finishes_requests_in_flight(repository: Path, tmp_path: Path) -> None:
    slow = Server(
        repository / "digits",
        "--max-queue-delay-ms",
        "1500",
        "--max-batch-size",
        "64",
        "--warmup",
        log=tmp_path / "serve.log",
    )
    expected = direct(repository, "digits", DIGITS[:4])

    async def main():
        async with httpx.AsyncClient(timeout=30) as http:
            posts = [
                asyncio.ensure_future(
                    http.post(f"{slow.url}/v2/models/digits/infer", json=json_infer(DIGITS[i : i + 1]))
                )
                for i in range(4)
            ]
            await asyncio.sleep(0.5)  # queued: the batch waits 1.5 s for more
            slow.process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*posts)

    answers = run_async(main())
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    for i, answer in enumerate(answers):
        np.testing.assert_allclose(
            np.asarray(answer.json()["outputs"][0]["data"], "float32"), expected[i], rtol=1e-6, atol=1e-6
        )
    assert slow.stop() is not None
    log = slow.log.read_text()
    assert '"event": "batch"' in log  # structured batch logs
    built = [
        json.loads(line.split(": ", 1)[1])["batch"] for line in log.splitlines() if '"engine_built"' in line
    ]
    assert built == [1, 2, 4, 8, 16, 32, 64]  # --warmup: every batch the batcher forms


@pytest.mark.slow
def test_ray_serve_runs_two_cpu_replicas_behind_the_same_protocol(repository: Path, tmp_path: Path) -> None:
    ray_server = Server(repository / "digits", "--ray", "--replicas", "2", log=tmp_path / "serve.log")
    try:
        expected = direct(repository, "digits", DIGITS[:16])

        async def main():
            async with httpx.AsyncClient(timeout=60) as http:
                posts = [
                    http.post(f"{ray_server.url}/v2/models/digits/infer", json=json_infer(DIGITS[i : i + 1]))
                    for i in range(16)
                ]
                return await asyncio.gather(*posts)

        for i, answer in enumerate(run_async(main())):
            assert answer.status_code == 200, answer.text
            np.testing.assert_allclose(
                np.asarray(answer.json()["outputs"][0]["data"], "float32"), expected[i], rtol=1e-6, atol=1e-6
            )
        meta = httpx.get(f"{ray_server.url}/v2/models/digits").json()
        assert meta["inputs"][0]["shape"] == [-1, 8, 8, 1]
        assert json.dumps(meta)
    finally:
        ray_server.stop(timeout=120)


def test_serve_refuses_a_directory_without_artifacts(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kerasrt", "serve", str(tmp_path)], capture_output=True, text=True,
        env={**os.environ, "KERAS_BACKEND": "torch"},
    )  # fmt: skip
    assert done.returncode == 2 and "neither a kerasrt artifact nor a directory of them" in done.stderr
