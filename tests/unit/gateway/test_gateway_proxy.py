"""The pass-through to registry, inference and trainer: tenant assertion, the three call
shapes, status relay, deadlines, cancellation and a backend that is down."""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest
from maas.inference.v1 import inference_pb2
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc

from services.common.interceptors import INTERNAL_TOKEN_KEY, TENANT_KEY
from tests.unit.gateway.gateway_fakes import TOKEN, gateway_stack


@pytest.fixture
async def stack(tmp_path):
    async with gateway_stack(tmp_path) as started:
        yield started


async def test_unary_call_asserts_the_keys_tenant_not_the_clients(stack):
    metadata = (
        *stack.auth("reader"),
        (TENANT_KEY, "other"),
        (INTERNAL_TOKEN_KEY, "forged"),
        ("x-maas-anything", "dropped"),
        ("x-trace-id", "kept"),
    )
    response = await stack.registry_stub.GetModel(registry_pb2.GetModelRequest(name="m"), metadata=metadata)
    assert response.model.description == "acme"
    seen = stack.registry.metadata[-1]
    assert seen[TENANT_KEY] == "acme" and seen[INTERNAL_TOKEN_KEY] == TOKEN
    assert "authorization" not in seen and "x-maas-anything" not in seen
    assert seen["x-trace-id"] == "kept"
    assert seen["x-request-id"]


async def test_admin_acts_within_its_own_tenant(stack):
    response = await stack.registry_stub.GetModel(
        registry_pb2.GetModelRequest(name="m"), metadata=stack.auth("admin")
    )
    assert response.model.description == "acme"
    deployment = await stack.inference_stub.GetDeployment(
        inference_pb2.GetDeploymentRequest(name="d"), metadata=stack.auth("other")
    )
    assert deployment.deployment.message == "other"


async def test_backend_status_codes_are_relayed(stack):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.registry_stub.GetModel(
            registry_pb2.GetModelRequest(name="missing"), metadata=stack.auth("reader")
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert error.value.details() == "model 'missing' not found"
    # A connected backend's own UNAVAILABLE keeps its message.
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.registry_stub.GetModel(
            registry_pb2.GetModelRequest(name="busy"), metadata=stack.auth("reader")
        )
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "compacting" in error.value.details()


async def test_deadline_is_propagated(stack):
    await stack.registry_stub.GetModel(
        registry_pb2.GetModelRequest(name="m"), metadata=stack.auth("reader"), timeout=3
    )
    assert 1 < stack.registry.time_remaining[-1] < 3.1  # grpc rounds deadlines a little
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.registry_stub.GetModel(
            registry_pb2.GetModelRequest(name="slow"), metadata=stack.auth("reader"), timeout=0.3
        )
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def upload_parts(model: str, chunks: list[bytes]):
    yield registry_pb2.UploadVersionRequest(header=registry_pb2.VersionHeader(model=model))
    for chunk in chunks:
        yield registry_pb2.UploadVersionRequest(chunk=chunk)


def blocking_upload(stack, model: str, chunks: list[bytes]):
    """Upload with the blocking client: grpc.aio's own client can misreport an early rejection
    as INTERNAL (grpc/grpc#36066), which is not what these tests are about."""
    with grpc.insecure_channel(f"127.0.0.1:{stack.port}") as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        try:
            return registry.UploadVersion(
                upload_parts(model, chunks), metadata=stack.auth("developer"), timeout=5
            )
        except grpc.RpcError as error:
            return error


async def test_client_streaming_upload(stack):
    chunks = [b"a" * 1000, b"b" * 500]
    response = await asyncio.to_thread(blocking_upload, stack, "m", chunks)
    assert response.version.size_bytes == 1500
    assert response.version.sha256 == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert response.version.precision == "acme"  # the fake echoes the tenant it saw
    assert 1 < stack.registry.time_remaining[-1] < 5.1


async def test_early_upload_rejection_keeps_its_status(stack):
    """The backend rejects the header while the gateway is still forwarding chunks."""
    chunks = [b"c" * 65536] * 50
    for _ in range(30):
        error = await asyncio.to_thread(blocking_upload, stack, "bad", chunks)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == "model 'bad' has no signature"


async def test_cancelled_upload_ends_at_the_backend(stack):
    sent_one = asyncio.Event()

    async def parts():
        yield registry_pb2.UploadVersionRequest(header=registry_pb2.VersionHeader(model="m"))
        sent_one.set()
        await asyncio.sleep(30)

    call = stack.registry_stub.UploadVersion(parts(), metadata=stack.auth("developer"))
    await sent_one.wait()
    await asyncio.sleep(0.1)
    call.cancel()
    await asyncio.wait_for(stack.registry.upload_ended.wait(), timeout=2)


async def test_server_streaming_download(stack):
    call = stack.registry_stub.DownloadVersion(
        registry_pb2.DownloadVersionRequest(model="m", version=2), metadata=stack.auth("developer"), timeout=5
    )
    messages = [message async for message in call]
    assert messages[0].version.version == 2 and messages[0].version.precision == "acme"
    assert b"".join(m.chunk for m in messages[1:]) == b"abcdef"
    assert 1 < stack.registry.time_remaining[-1] < 5.1

    call = stack.registry_stub.DownloadVersion(
        registry_pb2.DownloadVersionRequest(model="missing"), metadata=stack.auth("developer")
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        _ = [message async for message in call]
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_client_cancellation_reaches_the_backend(stack):
    call = stack.registry_stub.DownloadVersion(
        registry_pb2.DownloadVersionRequest(model="endless"), metadata=stack.auth("developer")
    )
    for _ in range(3):
        await call.read()
    call.cancel()
    await asyncio.wait_for(stack.registry.download_cancelled.wait(), timeout=2)


async def test_backend_down_is_unavailable(stack):
    trainer = trainer_pb2_grpc.TrainerServiceStub(stack.channel)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await trainer.GetJob(trainer_pb2.GetJobRequest(), metadata=stack.auth("reader"), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error.value.details() == "trainer is unavailable, retry later"
    call = trainer.WatchJob(trainer_pb2.WatchJobRequest(), metadata=stack.auth("reader"), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        _ = [message async for message in call]
    assert error.value.details() == "trainer is unavailable, retry later"


async def test_routing_service_is_not_exposed(stack):
    watch = stack.channel.unary_stream(
        "/maas.inference.v1.RoutingService/WatchRoutes",
        request_serializer=inference_pb2.WatchRoutesRequest.SerializeToString,
        response_deserializer=inference_pb2.WatchRoutesResponse.FromString,
    )
    call = watch(inference_pb2.WatchRoutesRequest(), metadata=stack.auth("admin"))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        _ = [message async for message in call]
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("path", "request_message", "response_class"),
    [
        (
            "/maas.registry.v1.RegistryService/GetStorageUsage",
            registry_pb2.GetStorageUsageRequest(start_day="2026-01-01", end_day="2026-01-31"),
            registry_pb2.GetStorageUsageResponse,
        ),
        (
            "/maas.inference.v1.InferenceService/GetReplicaUsage",
            inference_pb2.GetReplicaUsageRequest(start_day="2026-01-01", end_day="2026-01-31"),
            inference_pb2.GetReplicaUsageResponse,
        ),
    ],
)
async def test_billings_internal_usage_calls_are_refused_to_every_client(stack, path, request_message, response_class):
    call = stack.channel.unary_unary(
        path, request_serializer=type(request_message).SerializeToString, response_deserializer=response_class.FromString
    )
    calls_before = len(stack.registry.metadata) + len(stack.inference.metadata)
    for role in ("reader", "developer", "admin"):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call(request_message, metadata=stack.auth(role), timeout=5)
        # The gateway serves no such method (as the RoutingService's), and grants it no role.
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert len(stack.registry.metadata) + len(stack.inference.metadata) == calls_before, "a backend was called"
