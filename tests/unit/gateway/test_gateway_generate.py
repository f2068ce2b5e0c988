"""The gateway's Generate and OIP ModelStreamInfer in front of a fake decoupled Triton model:
streaming, validation, task checks, cancellation and token reservation and settlement."""

from __future__ import annotations

import asyncio
import struct

import grpc
import pytest
from maas.inference.v1 import inference_pb2
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common.generation import Sampling, stream_request
from tests.unit.gateway.gateway_fakes import gateway_stack, route
from tests.unit.gateway.test_gateway_limits import set_quota


@pytest.fixture
async def stack(tmp_path, redis_server):
    # Token quotas need Redis: a gateway never told a counter's value by Redis refuses to guess it.
    async with gateway_stack(tmp_path, redis_url=redis_server.url) as started:
        await started.wait_for_routes()
        writer = route("acme", "writer", started.triton_address, task=inference_pb2.SERVING_TASK_GENERATE)
        started.routing.publish([*started.routing.routes, writer])
        oip = service_pb2_grpc.GRPCInferenceServiceStub(started.channel)
        ready = service_pb2.ModelReadyRequest(name="writer")
        for _ in range(200):  # the gateway hears of the new route in the background
            if (await oip.ModelReady(ready, metadata=started.auth("reader"))).ready:
                break
            await asyncio.sleep(0.01)
        yield started


def generate(stack, who: str = "reader", **fields):
    fields.setdefault("deployment", "writer")
    fields.setdefault("prompt", "hi")
    return stack.inference_stub.Generate(inference_pb2.GenerateRequest(**fields), metadata=stack.auth(who))


async def collect(call) -> list[inference_pb2.GenerateResponse]:
    return [message async for message in call]


async def test_tokens_stream_from_triton_with_the_version_named(stack):
    call = generate(stack, max_tokens=4, temperature=0.0, seed=9, stop=["zz"])
    *tokens, final = await collect(call)
    assert [t.text for t in tokens] == ["a", "b", "c", "d"]
    assert final.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert (final.prompt_tokens, final.completion_tokens, final.model, final.version) == (2, 4, "digits", 1)
    assert dict(await call.trailing_metadata())["x-maas-model-version"] == "1"
    (sent,) = stack.triton.streams
    assert sent.model_name == "acme--writer--1"
    assert sent.parameters["seed"].int64_param == 9 and sent.parameters["temperature"].double_param == 0.0


@pytest.mark.parametrize(
    ("fields", "code", "complaint"),
    [
        ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "must not be empty"),
        ({"top_p": 0.0}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"prompt": "a~b"}, grpc.StatusCode.INVALID_ARGUMENT, "'~' is not known"),
        ({"deployment": "mlp"}, grpc.StatusCode.FAILED_PRECONDITION, "use Predict"),
        ({"deployment": "nope"}, grpc.StatusCode.NOT_FOUND, "not found"),
        ({"deployment": "Bad Name"}, grpc.StatusCode.INVALID_ARGUMENT, "deployment"),
    ],
)
async def test_bad_requests_are_refused(stack, fields, code, complaint):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await collect(generate(stack, **fields))
    assert error.value.code() == code and complaint in error.value.details()


async def test_predict_on_a_generation_deployment_says_to_call_generate(stack):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.inference_stub.Predict(
            inference_pb2.PredictRequest(deployment="writer"), metadata=stack.auth("reader")
        )
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "use Generate" in error.value.details()


async def test_tokens_are_reserved_then_settled_to_what_was_used(stack):
    await set_quota(stack, "acme", tokens_per_day=30)
    stack.triton.stop_after = 3
    # Each call reserves 2 + 20 = 22 and settles to 2 + 3 = 5; without settlement the second
    # call would find 22 + 22 > 30.
    for _ in range(2):
        *_, final = await collect(generate(stack, max_tokens=20))
        assert final.finish_reason == inference_pb2.FINISH_REASON_STOP
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await collect(generate(stack, max_tokens=25))  # 10 used + 27 > 30
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens per day" in error.value.details()


async def test_a_cancelled_call_cancels_triton_and_settles_what_was_streamed(stack):
    await set_quota(stack, "acme", tokens_per_day=100)
    stack.triton.delay = 0.02
    call = generate(stack, max_tokens=90)
    received = 0
    async for _ in call:
        received += 1
        if received == 3:
            call.cancel()
            break
    await asyncio.wait_for(stack.triton.cancelled.wait(), 2)
    await asyncio.sleep(0.2)  # the settlement runs as the handler unwinds
    stack.triton.delay = 0.0
    # Settled to about 2 + 3; unsettled, the 92 reserved would leave no room for 92 more.
    await collect(generate(stack, max_tokens=90))


async def test_the_deadline_ends_the_stream_and_triton_stops(stack):
    stack.triton.delay = 0.05
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await collect(
            stack.inference_stub.Generate(
                inference_pb2.GenerateRequest(deployment="writer", prompt="hi", max_tokens=100),
                metadata=stack.auth("reader"),
                timeout=0.3,
            )
        )
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(stack.triton.cancelled.wait(), 2)


def oip_request(deployment: str, prompt: str, request_id: str, **settings) -> service_pb2.ModelInferRequest:
    return stream_request(prompt, Sampling(**settings), deployment, request_id)


async def test_model_stream_infer_serves_several_requests_on_one_stream(stack):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(stack.channel)

    async def requests():
        yield oip_request("writer", "hi", "one", max_tokens=2)
        yield oip_request("writer", "hey", "two", max_tokens=3)
        yield oip_request("writer", "", "three")
        yield oip_request("mlp", "hi", "four")

    responses = [r async for r in stub.ModelStreamInfer(requests(), metadata=stack.auth("reader"))]
    by_id: dict[str, list] = {}
    for response in responses:
        by_id.setdefault(response.infer_response.id, []).append(response)
    assert len(by_id["one"]) == 3 and len(by_id["two"]) == 4
    last = by_id["two"][-1].infer_response
    assert (last.model_name, last.model_version) == ("writer", "1")
    outputs = {t.name: last.raw_output_contents[i] for i, t in enumerate(last.outputs)}
    assert struct.unpack("<q", outputs["completion_tokens"])[0] == 3
    assert "must not be empty" in by_id["three"][0].error_message
    assert "use Predict" in by_id["four"][0].error_message
    assert {r.model_name for r in stack.triton.streams} == {"acme--writer--1"}


async def test_model_stream_infer_needs_a_key(stack):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(stack.channel)

    async def requests():
        yield oip_request("writer", "hi", "one")

    with pytest.raises(grpc.aio.AioRpcError) as error:
        _ = [r async for r in stub.ModelStreamInfer(requests())]
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
