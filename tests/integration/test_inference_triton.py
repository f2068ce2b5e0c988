"""The inference service against the real tritonserver from the nvidia-pytriton wheel.

A small fake registry (in this file) serves a TorchScript and an ONNX export of an MLP trained
here on scikit-learn's digits. The test deploys both, predicts, survives a kill -9 of Triton and
a restart of the whole service, and deletes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import time
import urllib.request
import warnings
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from maas.common.v1 import common_pb2
from maas.inference.v1 import inference_pb2, inference_pb2_grpc
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from prometheus_client import REGISTRY
from sklearn.datasets import load_digits
from tritonclient.grpc.aio import InferenceServerClient

from services.common.channels import internal_metadata, tenant_of
from services.common.server import running
from services.inference.config import InferenceSettings
from services.inference.load import pending_by_model
from services.inference.server import create_app
from services.inference.triton import TritonClient

# torch marks TorchScript deprecated; it is still the registry's format.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*")]

TOKEN = "integration-token"
TENANT = "acme"
CHUNK = 16 * 1024  # small, so that downloads take several messages


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_digits_mlp() -> tuple[torch.nn.Module, np.ndarray]:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(5):
        for start in range(0, len(x), 64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[start : start + 64]), y[start : start + 64])
            loss.backward()
            optimizer.step()
    return model.eval(), x.numpy()


def signature(output: str) -> common_pb2.Signature:
    return common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=[64])],
        outputs=[common_pb2.TensorSpec(name=output, datatype=common_pb2.DATA_TYPE_FP32, shape=[10])],
    )


class FakeRegistry(registry_pb2_grpc.RegistryServiceServicer):
    """Versions of one tenant's models, with their artifacts in memory."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, int], tuple[registry_pb2.Version, bytes]] = {}
        self.downloads = 0

    def add(self, model: str, number: int, fmt: int, sig: common_pb2.Signature, artifact: bytes) -> None:
        version = registry_pb2.Version(
            model=model,
            version=number,
            format=fmt,
            signature=sig,
            sha256=hashlib.sha256(artifact).hexdigest(),
            size_bytes=len(artifact),
            state=registry_pb2.VERSION_STATE_READY,
        )
        self.versions[(model, number)] = (version, artifact)

    async def _find(self, context, model: str, number: int):
        if tenant_of(context) != TENANT or (model, number) not in self.versions:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"version {number} of model {model!r} not found")
        return self.versions[(model, number)]

    async def GetVersion(self, request, context):
        version, _ = await self._find(context, request.model, request.version)
        return registry_pb2.GetVersionResponse(version=version)

    async def DownloadVersion(self, request, context):
        version, artifact = await self._find(context, request.model, request.version)
        self.downloads += 1
        yield registry_pb2.DownloadVersionResponse(version=version)
        for start in range(0, len(artifact), CHUNK):
            yield registry_pb2.DownloadVersionResponse(chunk=artifact[start : start + CHUNK])


def fp32_tensor(name: str, array: np.ndarray) -> common_pb2.Tensor:
    return common_pb2.Tensor(
        name=name,
        datatype=common_pb2.DATA_TYPE_FP32,
        shape=array.shape,
        raw=array.astype(np.float32).tobytes(),
    )


def as_array(tensor: common_pb2.Tensor) -> np.ndarray:
    return np.frombuffer(tensor.raw, dtype=np.float32).reshape(tuple(tensor.shape))


async def wait_for_state(
    stub, name: str, state: int, metadata, timeout: float = 60.0
) -> inference_pb2.Deployment:
    deadline = time.monotonic() + timeout
    while True:
        deployment = (
            await stub.GetDeployment(inference_pb2.GetDeploymentRequest(name=name), metadata=metadata)
        ).deployment
        if deployment.state == state:
            return deployment
        assert deployment.state != inference_pb2.DEPLOYMENT_STATE_FAILED, deployment.message
        assert time.monotonic() < deadline, f"{name} still {deployment.state}: {deployment.message}"
        await asyncio.sleep(0.1)


async def predict_until_served(
    stub, request, metadata, timeout: float = 60.0
) -> inference_pb2.PredictResponse:
    """Predict, retrying UNAVAILABLE while the deployment reloads."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await stub.Predict(request, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_deploy_predict_survive_restarts_and_delete(tmp_path: Path) -> None:
    model, samples = train_digits_mlp()
    with torch.inference_mode():
        expected = model(torch.from_numpy(samples[:16])).numpy()
    torchscript_path = tmp_path / "mlp.pt"
    torch.jit.script(model).save(str(torchscript_path))
    onnx_path = tmp_path / "mlp.onnx"
    # The registry keeps one file per version: the TorchScript-based exporter writes a single
    # self-contained .onnx (the dynamo exporter would add a .onnx.data file and needs onnxscript).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.from_numpy(samples[:2]),),
            str(onnx_path),
            dynamo=False,
            input_names=["x"],
            output_names=["probs"],
            dynamic_axes={"x": {0: "batch"}, "probs": {0: "batch"}},
        )
    registry = FakeRegistry()
    registry.add(
        "digits",
        1,
        registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
        signature("logits"),
        torchscript_path.read_bytes(),
    )
    registry.add("digits", 2, registry_pb2.ARTIFACT_FORMAT_ONNX, signature("probs"), onnx_path.read_bytes())

    registry_server = grpc.aio.server()
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(registry, registry_server)
    registry_port = registry_server.add_insecure_port("127.0.0.1:0")
    await registry_server.start()

    triton_grpc_port = free_port()
    settings = InferenceSettings(
        home=tmp_path / "home",
        inference_addr="127.0.0.1:0",
        registry_addr=f"127.0.0.1:{registry_port}",
        internal_token=TOKEN,
        triton_grpc_port=triton_grpc_port,
        triton_http_port=free_port(),
        triton_metrics_port=free_port(),
        gpu_available=False,
        load_refresh_seconds=0.5,
    )
    metadata = internal_metadata(TOKEN, TENANT)
    triton_control = InferenceServerClient(f"127.0.0.1:{triton_grpc_port}")
    batch = inference_pb2.PredictRequest(deployment="digits-ts", inputs=[fp32_tensor("x", samples[:16])])
    try:
        async with running(await create_app(settings)) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                routing = inference_pb2_grpc.RoutingServiceStub(channel)

                started = time.perf_counter()
                for name, version, max_batch_size in (("digits-ts", 1, 16), ("digits-onnx", 2, 0)):
                    created = await stub.CreateDeployment(
                        inference_pb2.CreateDeploymentRequest(
                            deployment=inference_pb2.Deployment(
                                name=name, model="digits", version=version, max_batch_size=max_batch_size
                            )
                        ),
                        metadata=metadata,
                    )
                    assert created.deployment.state == inference_pb2.DEPLOYMENT_STATE_LOADING
                await wait_for_state(stub, "digits-ts", inference_pb2.DEPLOYMENT_STATE_READY, metadata)
                ready = await wait_for_state(
                    stub, "digits-onnx", inference_pb2.DEPLOYMENT_STATE_READY, metadata
                )
                print(f"both deployments READY {time.perf_counter() - started:.1f} s after create")
                load_request = inference_pb2.GetDeploymentLoadRequest(name="digits-ts")
                load_before = (await stub.GetDeploymentLoad(load_request, metadata=metadata)).versions[0]
                assert (ready.resolved_version, ready.instances, ready.max_batch_size) == (2, 1, 8)

                response = await stub.Predict(batch, metadata=metadata)
                assert (response.model, response.version) == ("digits", 1)
                assert response.outputs[0].name == "logits"
                np.testing.assert_allclose(as_array(response.outputs[0]), expected, rtol=1e-4, atol=1e-5)

                onnx_request = inference_pb2.PredictRequest(
                    deployment="digits-onnx", inputs=[fp32_tensor("x", samples[:8])]
                )
                onnx_response = await stub.Predict(onnx_request, metadata=metadata)
                assert (onnx_response.version, onnx_response.outputs[0].name) == (2, "probs")
                np.testing.assert_allclose(
                    as_array(onnx_response.outputs[0]), expected[:8], rtol=1e-4, atol=1e-5
                )

                # 32 concurrent single-sample requests: Triton batches them, each answer is its own.
                singles = [
                    inference_pb2.PredictRequest(
                        deployment="digits-ts", inputs=[fp32_tensor("x", samples[i : i + 1])]
                    )
                    for i in range(32)
                ]
                started = time.perf_counter()
                answers = await asyncio.gather(*(stub.Predict(r, metadata=metadata) for r in singles))
                print(f"32 concurrent Predicts in {(time.perf_counter() - started) * 1000:.1f} ms")
                with torch.inference_mode():
                    expected_singles = model(torch.from_numpy(samples[:32])).numpy()
                for index, answer in enumerate(answers):
                    np.testing.assert_allclose(
                        as_array(answer.outputs[0])[0], expected_singles[index], rtol=1e-4, atol=1e-5
                    )

                latencies = []
                for _ in range(50):
                    started = time.perf_counter()
                    await stub.Predict(singles[0], metadata=metadata)
                    latencies.append(time.perf_counter() - started)
                print(f"sequential Predict p50 {np.median(latencies) * 1000:.2f} ms")

                # Wrong input and another tenant's deployment are refused at the edge.
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    bad = inference_pb2.PredictRequest(
                        deployment="digits-ts", inputs=[fp32_tensor("x", samples[:2, :10])]
                    )
                    await stub.Predict(bad, metadata=metadata)
                assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                with pytest.raises(grpc.aio.AioRpcError) as hidden:
                    await stub.Predict(batch, metadata=internal_metadata(TOKEN, "other-tenant"))
                assert hidden.value.code() is grpc.StatusCode.NOT_FOUND

                watch = routing.WatchRoutes(inference_pb2.WatchRoutesRequest(), metadata=metadata)
                first = await watch.read()
                routes = {route.deployment: route for route in first.routes}
                assert (
                    routes["digits-ts"].ready
                    and routes["digits-ts"].triton_address == f"127.0.0.1:{triton_grpc_port}"
                )
                assert routes["digits-ts"].tenant == TENANT and routes["digits-ts"].version == 1
                triton_model = routes["digits-ts"].triton_model
                assert await triton_control.is_model_ready(triton_model)
                # What the canary check reads: Triton's own request counts for a model.
                counter = TritonClient(f"127.0.0.1:{triton_grpc_port}")
                succeeded, failed = await counter.request_counts(triton_model)
                await counter.close()
                assert succeeded >= 50 and failed == 0
                # GetDeploymentLoad reads the same statistics, and Triton's metrics endpoint
                # exports the pending-request gauge for the model.
                [load] = (await stub.GetDeploymentLoad(load_request, metadata=metadata)).versions
                assert load.version == 1 and triton_model not in str(load)
                assert load.success_count - load_before.success_count >= 83 and load.failure_count == 0
                assert 0 < load.execution_count <= load.success_count and load.average_batch_size >= 1
                assert load.average_queue_ms > 0 and load.average_compute_ms > 0
                metrics = urllib.request.urlopen(f"http://127.0.0.1:{settings.triton_metrics_port}/metrics", timeout=5).read().decode()
                assert triton_model in pending_by_model(metrics)
                labels = {"tenant": TENANT, "deployment": "digits-ts"}
                for _ in range(50):  # the gauges refresh every load_refresh_seconds; idle now
                    if REGISTRY.get_sample_value("maas_inference_pending_requests", labels) == 0:
                        break
                    await asyncio.sleep(0.1)
                assert REGISTRY.get_sample_value("maas_inference_pending_requests", labels) == 0
                assert REGISTRY.get_sample_value("maas_inference_batch_size", labels) is not None

                # kill -9 Triton: the supervisor restarts it and the deployments come back by themselves.
                pid_file = settings.directory / "nodes" / "triton-0" / "triton.pid"
                old_pid = int(pid_file.read_text())
                started = time.perf_counter()
                os.kill(old_pid, signal.SIGKILL)
                # The watch reports the routes not ready, then ready again.
                while True:
                    update = await asyncio.wait_for(watch.read(), timeout=30)
                    if not {r.deployment: r for r in update.routes}["digits-ts"].ready:
                        break
                response = await predict_until_served(stub, batch, metadata)
                print(f"Predict answered again {time.perf_counter() - started:.1f} s after kill -9 of Triton")
                np.testing.assert_allclose(as_array(response.outputs[0]), expected, rtol=1e-4, atol=1e-5)
                assert int(pid_file.read_text()) != old_pid
                # The killed server's model stubs went with it: its process group is empty.
                with pytest.raises(ProcessLookupError):
                    os.killpg(old_pid, 0)
                await wait_for_state(stub, "digits-ts", inference_pb2.DEPLOYMENT_STATE_READY, metadata)
                watch.cancel()
        assert registry.downloads == 2  # the artifact cache kept them across the Triton restart

        # A new service process on the same directories reconciles: the deployments return.
        started = time.perf_counter()
        async with running(await create_app(settings)) as server:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                response = await predict_until_served(stub, batch, metadata)
                print(f"Predict answered {time.perf_counter() - started:.1f} s after the service restarted")
                np.testing.assert_allclose(as_array(response.outputs[0]), expected, rtol=1e-4, atol=1e-5)
                await wait_for_state(stub, "digits-onnx", inference_pb2.DEPLOYMENT_STATE_READY, metadata)
                assert registry.downloads == 2

                await stub.DeleteDeployment(
                    inference_pb2.DeleteDeploymentRequest(name="digits-ts"), metadata=metadata
                )
                assert not await triton_control.is_model_ready(triton_model)
                assert triton_model not in {
                    m.name for m in (await triton_control.get_model_repository_index()).models
                }
                with pytest.raises(grpc.aio.AioRpcError) as gone:
                    await stub.Predict(batch, metadata=metadata)
                assert gone.value.code() is grpc.StatusCode.NOT_FOUND
                listed = await stub.ListDeployments(inference_pb2.ListDeploymentsRequest(), metadata=metadata)
                assert [d.name for d in listed.deployments] == ["digits-onnx"]
    finally:
        await triton_control.close()
        await registry_server.stop(0)
