"""External Triton nodes (MAAS_TRITON_URLS) with real tritonservers this test starts itself: the
inference service shares no folder with them, so every model reaches them in the load request;
a deployment's two replicas land on both and serve; a node that stops answering is DOWN within
2 s and its replica leaves the route."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from maas.inference.v1 import inference_pb2, inference_pb2_grpc
from maas.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.channels import internal_metadata
from services.common.server import running
from services.inference.config import InferenceSettings
from services.inference.server import create_app
from services.inference.triton import TritonClient, TritonLaunch, TritonSupervisor
from tests.integration.test_inference_triton import (
    TENANT,
    TOKEN,
    FakeRegistry,
    fp32_tensor,
    free_port,
    signature,
    train_digits_mlp,
    wait_for_state,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*")]

TRITON_TOKEN = "external-node-token"


async def nothing() -> None:
    return None


@contextlib.asynccontextmanager
async def external_triton(directory: Path):
    """A tritonserver the inference service does not run: its own folder, its own ports."""
    grpc_port = free_port()
    supervisor = TritonSupervisor(
        launch=TritonLaunch(
            directory=directory, grpc_port=grpc_port, http_port=free_port(), metrics_port=free_port(), token=TRITON_TOKEN
        ),
        client=TritonClient(f"127.0.0.1:{grpc_port}", TRITON_TOKEN),
        external=False,
        start_timeout=60,
        on_start=nothing,
        on_exit=nothing,
    )
    await supervisor.start()
    try:
        yield supervisor
    finally:
        await supervisor.stop()


async def test_models_reach_external_nodes_in_the_load_request_and_a_silent_node_goes_down(tmp_path: Path):
    model, samples = train_digits_mlp()
    artifact = tmp_path / "mlp.pt"
    torch.jit.script(model).save(str(artifact))
    registry = FakeRegistry()
    registry.add("digits", 1, registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, signature("logits"), artifact.read_bytes())
    registry_server = grpc.aio.server()
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(registry, registry_server)
    registry_port = registry_server.add_insecure_port("127.0.0.1:0")
    await registry_server.start()
    metadata = internal_metadata(TOKEN, TENANT)
    try:
        async with external_triton(tmp_path / "a") as node_a, external_triton(tmp_path / "b") as node_b:
            addresses = [node_a.client.address, node_b.client.address]
            settings = InferenceSettings(
                home=tmp_path / "home",
                inference_addr="127.0.0.1:0",
                registry_addr=f"127.0.0.1:{registry_port}",
                internal_token=TOKEN,
                triton_token=TRITON_TOKEN,
                triton_urls=",".join(addresses),
                gpu_available=False,
            )
            async with running(await create_app(settings)) as server:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                    stub = inference_pb2_grpc.InferenceServiceStub(channel)
                    fleet = inference_pb2_grpc.FleetServiceStub(channel)
                    await stub.CreateDeployment(
                        inference_pb2.CreateDeploymentRequest(
                            deployment=inference_pb2.Deployment(name="digits", model="digits", version=1, min_replicas=2)
                        ),
                        metadata=metadata,
                    )
                    ready = await wait_for_state(stub, "digits", inference_pb2.DEPLOYMENT_STATE_READY, metadata)
                    assert sorted(r.node for r in ready.replicas) == ["127.0.0.1-" + a.split(":")[1] for a in sorted(addresses)]
                    # Nothing was written where the nodes keep their models: the files came in the request.
                    assert [p for p in (tmp_path / "a" / "models").iterdir()] == []
                    assert [p for p in (tmp_path / "b" / "models").iterdir()] == []
                    request = inference_pb2.PredictRequest(deployment="digits", inputs=[fp32_tensor("x", samples[:8])])
                    with torch.inference_mode():
                        expected = model(torch.from_numpy(samples[:8])).numpy()
                    for _ in range(6):
                        answer = await stub.Predict(request, metadata=metadata)
                        got = np.frombuffer(answer.outputs[0].raw, np.float32).reshape(8, 10)
                        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

                    await node_b.stop()
                    stopped = time.monotonic()
                    down = "127.0.0.1-" + node_b.client.address.split(":")[1]
                    while True:
                        nodes = {n.name: n for n in (await fleet.ListNodes(inference_pb2.ListNodesRequest(), metadata=metadata)).nodes}
                        if nodes[down].state == inference_pb2.NODE_STATE_DOWN:
                            break
                        assert time.monotonic() - stopped < 2.0, "the silent node was not DOWN within 2 s"
                        await asyncio.sleep(0.05)
                    shown = (await stub.GetDeployment(inference_pb2.GetDeploymentRequest(name="digits"), metadata=metadata)).deployment
                    assert down not in [r.node for r in shown.replicas]
                    assert (await stub.Predict(request, metadata=metadata)).version == 1
    finally:
        await registry_server.stop(None)
