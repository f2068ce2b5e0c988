"""The gRPC edge: proto translation and status codes, in-process on port 0 with the fakes."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from maas.common.v1 import common_pb2
from maas.inference.v1 import inference_pb2, inference_pb2_grpc

from services.common.channels import internal_metadata
from services.common.interceptors import internal_token_authenticator
from services.common.server import App, ServerSpec, Servicer, running
from services.inference.load import LoadReporter
from services.inference.servicer import InferenceServicer, RoutingServicer
from tests.unit.inference.inference_fakes import TENANT, WEIGHTS

TOKEN = "unit-token"
METADATA = internal_metadata(TOKEN, TENANT)


@pytest.fixture
async def stubs(deployments, triton):
    spec = ServerSpec(
        service="inference",
        address="127.0.0.1:0",
        servicers=[
            Servicer(
                inference_pb2_grpc.add_InferenceServiceServicer_to_server,
                # No Triton metrics endpoint: pending requests read as 0.
                InferenceServicer(deployments, LoadReporter(deployments, triton, ["http://127.0.0.1:9/metrics"], 0)),
                "maas.inference.v1.InferenceService",
            ),
            Servicer(
                inference_pb2_grpc.add_RoutingServiceServicer_to_server,
                RoutingServicer(deployments),
                "maas.inference.v1.RoutingService",
            ),
        ],
        authenticate=internal_token_authenticator(TOKEN),
    )
    async with running(App(spec)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield (
                inference_pb2_grpc.InferenceServiceStub(channel),
                inference_pb2_grpc.RoutingServiceStub(channel),
            )


async def create(stub, **fields) -> inference_pb2.Deployment:
    fields.setdefault("name", "web")
    fields.setdefault("model", "digits")
    request = inference_pb2.CreateDeploymentRequest(deployment=inference_pb2.Deployment(**fields))
    return (await stub.CreateDeployment(request, metadata=METADATA)).deployment


async def wait_ready(stub, name: str = "web") -> inference_pb2.Deployment:
    for _ in range(500):
        found = (
            await stub.GetDeployment(inference_pb2.GetDeploymentRequest(name=name), metadata=METADATA)
        ).deployment
        if found.state == inference_pb2.DEPLOYMENT_STATE_READY:
            return found
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} never became READY: {found.message}")


async def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    return failure.value.code()


async def test_create_get_update_list_delete_in_protos(stubs):
    stub, _ = stubs
    created = await create(stub, version=1, device=inference_pb2.DEVICE_CPU, instances=2, cacheable=True)
    assert created.state == inference_pb2.DEPLOYMENT_STATE_LOADING
    assert (created.WhichOneof("target"), created.version, created.resolved_version) == ("version", 1, 1)
    assert (created.device, created.instances, created.max_batch_size, created.cacheable) == (
        inference_pb2.DEVICE_CPU,
        2,
        8,
        True,
    )
    assert created.signature.inputs[0].name == "x" and created.create_time.seconds > 0
    ready = await wait_ready(stub)
    assert ready.message == ""

    request = inference_pb2.UpdateDeploymentRequest(
        deployment=inference_pb2.Deployment(
            name="web", alias="production", device=inference_pb2.DEVICE_UNSPECIFIED
        ),
        update_mask=FieldMask(paths=["alias", "device"]),
    )
    updated = (await stub.UpdateDeployment(request, metadata=METADATA)).deployment
    assert (updated.WhichOneof("target"), updated.alias, updated.device) == (
        "alias",
        "production",
        inference_pb2.DEVICE_AUTO,
    )

    await create(stub, name="second", version=2)
    first = await stub.ListDeployments(inference_pb2.ListDeploymentsRequest(page_size=1), metadata=METADATA)
    assert [d.name for d in first.deployments] == ["second"] and first.next_page_token
    rest = await stub.ListDeployments(
        inference_pb2.ListDeploymentsRequest(page_size=1, page_token=first.next_page_token), metadata=METADATA
    )
    assert [d.name for d in rest.deployments] == ["web"] and not rest.next_page_token

    await stub.DeleteDeployment(inference_pb2.DeleteDeploymentRequest(name="web"), metadata=METADATA)
    assert await code_of(
        stub.GetDeployment(inference_pb2.GetDeploymentRequest(name="web"), metadata=METADATA)
    ) == (grpc.StatusCode.NOT_FOUND)


async def test_predict_over_grpc(stubs):
    stub, _ = stubs
    await create(stub, version=1)
    await wait_ready(stub)
    x = np.ones((2, 4), dtype=np.float32)
    tensor = common_pb2.Tensor(name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=[2, 4], raw=x.tobytes())
    request = inference_pb2.PredictRequest(deployment="web", inputs=[tensor])
    call = stub.Predict(request, metadata=METADATA)
    response = await call
    assert dict(await call.trailing_metadata())["x-maas-model-version"] == "1"
    np.testing.assert_allclose(np.frombuffer(response.outputs[0].raw, np.float32).reshape(2, 3), x @ WEIGHTS)
    other_tenant = internal_metadata(TOKEN, "other")
    assert await code_of(stub.Predict(request, metadata=other_tenant)) == grpc.StatusCode.NOT_FOUND
    request.inputs[0].shape[:] = [2, 5]
    assert await code_of(stub.Predict(request, metadata=METADATA)) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "fields, code",
    [
        (dict(name="Bad Name", version=1), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(version=1, instances=100), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(version=1, device=42), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(alias=""), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(model="unknown", version=1), grpc.StatusCode.NOT_FOUND),
        (dict(version=5), grpc.StatusCode.NOT_FOUND),
        (dict(version=1, device=inference_pb2.DEVICE_GPU), grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
async def test_create_maps_bad_requests_to_status_codes(stubs, fields, code):
    stub, _ = stubs
    assert await code_of(create(stub, **fields)) == code


async def test_duplicates_and_credentials(stubs):
    stub, _ = stubs
    await create(stub, version=1)
    assert await code_of(create(stub, version=1)) == grpc.StatusCode.ALREADY_EXISTS
    request = inference_pb2.GetDeploymentRequest(name="web")
    assert await code_of(stub.GetDeployment(request)) == grpc.StatusCode.UNAUTHENTICATED
    assert (
        await code_of(stub.GetDeployment(request, metadata=((METADATA[0]),)))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    wrong_token = internal_metadata("wrong", TENANT)
    assert await code_of(stub.GetDeployment(request, metadata=wrong_token)) == grpc.StatusCode.UNAUTHENTICATED


async def test_watch_routes_streams_every_tenants_routes(stubs):
    stub, routing = stubs
    watch = routing.WatchRoutes(inference_pb2.WatchRoutesRequest(), metadata=((METADATA[0]),))
    assert list((await watch.read()).routes) == []
    await create(stub, version=1, cacheable=True, max_batch_size=4)
    while True:
        message = await asyncio.wait_for(watch.read(), 2)
        if message.routes and message.routes[0].ready:
            break
    (route,) = message.routes
    assert (route.tenant, route.deployment, route.model, route.version) == (TENANT, "web", "digits", 1)
    assert route.triton_model.startswith("m_") and route.triton_address == "127.0.0.1:8001"
    assert (route.max_batch_size, route.cacheable) == (4, True)
    assert route.signature.outputs[0].name == "y"
    watch.cancel()


async def test_deployment_load_over_grpc(stubs, triton):
    stub, _ = stubs
    await create(stub, version=1, instances=2)
    ready = await wait_ready(stub)
    assert ready.state == inference_pb2.DEPLOYMENT_STATE_READY
    request = inference_pb2.GetDeploymentLoadRequest(name="web")
    load = await stub.GetDeploymentLoad(request, metadata=METADATA)
    assert (load.name, load.instances, len(load.versions)) == ("web", 2, 1)
    [version] = load.versions
    # Readers see deployment names only: no field holds Triton's internal model name.
    assert "m_" not in str(load)
    [triton_model] = triton.loaded
    triton.counts[triton_model] = (12, 3)
    [version] = (await stub.GetDeploymentLoad(request, metadata=METADATA)).versions
    assert (version.version, version.success_count, version.failure_count) == (1, 12, 3)
    assert version.average_batch_size == 1.0
    missing = inference_pb2.GetDeploymentLoadRequest(name="nope")
    assert await code_of(stub.GetDeploymentLoad(missing, metadata=METADATA)) is grpc.StatusCode.NOT_FOUND
    bad = inference_pb2.GetDeploymentLoadRequest(name="")
    assert await code_of(stub.GetDeploymentLoad(bad, metadata=METADATA)) is grpc.StatusCode.INVALID_ARGUMENT
