"""The one interceptor: error mapping (every branch), authentication hook, request ids, metrics."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from prometheus_client import REGISTRY

from services.common import errors
from services.common.interceptors import (
    INTERNAL_TOKEN_KEY,
    STATUS_OF_ERROR,
    internal_token_authenticator,
    status_of,
)
from services.common.logs import request_id_var
from services.common.server import App, ServerSpec, Servicer, running


def test_every_domain_error_has_a_status() -> None:
    domain_errors = {cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.MaasError)}
    assert domain_errors - {errors.MaasError} == set(STATUS_OF_ERROR)


@pytest.mark.parametrize("error_class, code", list(STATUS_OF_ERROR.items()))
def test_status_of_maps_each_error(error_class: type[errors.MaasError], code: grpc.StatusCode) -> None:
    assert status_of(error_class("x")) is code


def test_subclasses_inherit_their_parents_status() -> None:
    class ModelMissing(errors.NotFound):
        pass

    assert status_of(ModelMissing("gone")) is grpc.StatusCode.NOT_FOUND


def test_unexpected_exceptions_are_internal() -> None:
    assert status_of(AttributeError("boom")) is grpc.StatusCode.INTERNAL
    assert status_of(errors.MaasError("bare base class")) is grpc.StatusCode.INTERNAL


async def _fail(error: Exception) -> None:
    raise error


class ScriptedTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    """Each RPC does what its request's id says: raise a domain error, crash, abort, or stream."""

    async def GetJob(self, request, context):  # noqa: N802
        if request.id == "missing":
            raise errors.NotFound("job missing not found")
        if request.id == "crash":
            raise KeyError("secret internals")
        if request.id.startswith("grouped"):
            # A TaskGroup wraps what its tasks raise in an ExceptionGroup.
            async with asyncio.TaskGroup() as group:
                group.create_task(_fail(errors.NotFound("job grouped not found")))
                if request.id == "grouped-twice":
                    group.create_task(_fail(errors.Unavailable("and something else")))
        if request.id == "abort":
            await context.abort(grpc.StatusCode.ABORTED, "handler aborted itself")
        return trainer_pb2.GetJobResponse(job=trainer_pb2.Job(id=request_id_var.get()))

    async def WatchJob(self, request, context):  # noqa: N802
        yield trainer_pb2.WatchJobResponse()
        if request.id == "fail-midway":
            raise errors.Unavailable("worker went away")
        yield trainer_pb2.WatchJobResponse()


@pytest.fixture
async def stub(request):
    token = getattr(request, "param", "")
    spec = ServerSpec(
        service="test",
        address="127.0.0.1:0",
        servicers=[Servicer(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, ScriptedTrainer(),
                            "maas.trainer.v1.TrainerService")],
        authenticate=internal_token_authenticator(token) if token else None,
    )
    async with running(App(spec)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield trainer_pb2_grpc.TrainerServiceStub(channel), channel


async def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details()


async def test_domain_error_becomes_its_status(stub) -> None:
    trainer, _ = stub
    code, details = await code_of(trainer.GetJob(trainer_pb2.GetJobRequest(id="missing")))
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, "job missing not found")


async def test_crash_is_internal_and_hides_details(stub) -> None:
    trainer, _ = stub
    code, details = await code_of(
        trainer.GetJob(trainer_pb2.GetJobRequest(id="crash"), metadata=(("x-request-id", "req-42"),))
    )
    assert code is grpc.StatusCode.INTERNAL
    assert "req-42" in details and "secret internals" not in details


async def test_handler_abort_passes_through(stub) -> None:
    trainer, _ = stub
    code, details = await code_of(trainer.GetJob(trainer_pb2.GetJobRequest(id="abort")))
    assert (code, details) == (grpc.StatusCode.ABORTED, "handler aborted itself")


async def test_request_id_is_taken_from_metadata(stub) -> None:
    trainer, _ = stub
    reply = await trainer.GetJob(trainer_pb2.GetJobRequest(id="ok"), metadata=(("x-request-id", "abc"),))
    assert reply.job.id == "abc"
    generated = await trainer.GetJob(trainer_pb2.GetJobRequest(id="ok"))
    assert len(generated.job.id) == 32


async def test_stream_error_after_messages(stub) -> None:
    trainer, _ = stub
    received = 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in trainer.WatchJob(trainer_pb2.WatchJobRequest(id="fail-midway")):
            received += 1
    assert received == 1
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_metrics_count_by_method_and_code(stub) -> None:
    trainer, _ = stub
    labels = {"service": "test", "method": "/maas.trainer.v1.TrainerService/GetJob", "code": "NOT_FOUND"}
    before = REGISTRY.get_sample_value("maas_grpc_requests_total", labels) or 0
    await code_of(trainer.GetJob(trainer_pb2.GetJobRequest(id="missing")))
    assert REGISTRY.get_sample_value("maas_grpc_requests_total", labels) == before + 1
    assert REGISTRY.get_sample_value("maas_grpc_request_duration_seconds_count", labels) == before + 1


@pytest.mark.parametrize("stub", ["s3cret"], indirect=True)
async def test_internal_token_is_required_but_health_is_open(stub) -> None:
    trainer, channel = stub
    code, details = await code_of(trainer.GetJob(trainer_pb2.GetJobRequest(id="ok")))
    assert code is grpc.StatusCode.UNAUTHENTICATED and "internal" in details
    code, _ = await code_of(trainer.GetJob(trainer_pb2.GetJobRequest(id="ok"), metadata=((INTERNAL_TOKEN_KEY, "nope"),)))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    reply = await trainer.GetJob(trainer_pb2.GetJobRequest(id="ok"), metadata=((INTERNAL_TOKEN_KEY, "s3cret"),))
    assert reply.job.id
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_undecodable_bytes_are_invalid_argument(stub) -> None:
    _, channel = stub
    raw = channel.unary_unary("/maas.trainer.v1.TrainerService/GetJob")
    # Field 1 claims 100 bytes of string that never come: not a GetJobRequest.
    code, details = await code_of(raw(b"\x0a\x64abc"))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in details and "GetJob" in details
    streaming = channel.unary_stream("/maas.trainer.v1.TrainerService/WatchJob")
    code, _ = await code_of(streaming(b"\xff\xff\xff").read())
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    # Decodable bytes still reach the handler.
    reply = await raw(trainer_pb2.GetJobRequest(id="ok").SerializeToString())
    assert trainer_pb2.GetJobResponse.FromString(reply).job.id



async def test_a_domain_error_inside_a_task_group_keeps_its_status(stub) -> None:
    trainer, _ = stub
    code, details = await code_of(trainer.GetJob(trainer_pb2.GetJobRequest(id="grouped")))
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, "job grouped not found")
    code, _ = await code_of(trainer.GetJob(trainer_pb2.GetJobRequest(id="grouped-twice")))
    assert code is grpc.StatusCode.INTERNAL  # two different failures: no one status says it
