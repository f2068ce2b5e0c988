"""The data path across replicas: each deployment served by several (fake) Triton nodes, the least
busy one chosen per request, one retry on another replica when a replica cannot take a request,
streams retried only before their first response, canary replicas, and waking a deployment
scaled to zero."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from maas.inference.v1 import inference_pb2
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common.interceptors import INTERNAL_TOKEN_KEY
from tests.unit.gateway.gateway_fakes import TOKEN, FakeGenerator, Stack, gateway_stack, route, serve
from tests.unit.gateway.test_gateway_predict import predict_request

GENERATE = inference_pb2.SERVING_TASK_GENERATE


@pytest.fixture
async def stack(tmp_path):
    # One Triton call per call, so that a replica's requests are the calls it served (joining
    # calls into batches has its own tests: test_gateway_coalesce.py).
    async with gateway_stack(tmp_path, gateway_coalesce=False) as started:
        await started.wait_for_routes()
        yield started


@pytest.fixture
async def nodes(stack) -> list[tuple[FakeGenerator, str]]:
    """Three Triton nodes: the stack's own and two more."""
    found = [(stack.triton, stack.triton_address)]
    servers = []
    for _ in range(2):
        triton = FakeGenerator()
        server, address = await serve((service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, triton))
        servers.append(server)
        found.append((triton, address))
    yield found
    for server in servers:
        await server.stop(0)


def replace(stack: Stack, *routes: inference_pb2.Route) -> None:
    """Publish `routes` in place of those of the same deployments."""
    names = {r.deployment for r in routes}
    stack.routing.publish([r for r in stack.routing.routes if r.deployment not in names] + list(routes))


async def publish(stack: Stack, *routes: inference_pb2.Route) -> None:
    """Replace the routes of the same deployments, and wait until the gateway has them (each
    with a version the gateway's table does not have yet)."""
    replace(stack, *routes)
    oip = service_pb2_grpc.GRPCInferenceServiceStub(stack.channel)
    for wanted in routes:
        request = service_pb2.ModelMetadataRequest(name=wanted.deployment)
        for _ in range(300):
            try:
                metadata = await oip.ModelMetadata(request, metadata=stack.auth("reader"))
                if metadata.versions == [str(wanted.version)]:
                    break
            except grpc.aio.AioRpcError:
                pass  # NOT_FOUND until the gateway has a new deployment
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"the gateway never received the route of {wanted.deployment!r}")


def predict(stack: Stack, deployment: str = "mlp", request_id: str = "", timeout: float = 10):
    metadata = stack.auth("reader") + ((("x-request-id", request_id),) if request_id else ())
    request = predict_request(deployment, np.zeros((1, 4), np.float32))
    return stack.inference_stub.Predict(request, metadata=metadata, timeout=timeout)


def generate(stack: Stack):
    request = inference_pb2.GenerateRequest(deployment="writer", prompt="hi", max_tokens=3)
    return stack.inference_stub.Generate(request, metadata=stack.auth("reader"))


async def test_requests_spread_across_the_replicas(stack, nodes):
    (a, a_address), (b, b_address), _ = nodes
    await publish(stack, route("acme", "mlp", a_address, version=2, replica_addresses=[a_address, b_address]))
    await asyncio.gather(*(predict(stack) for _ in range(40)))
    assert len(a.requests) + len(b.requests) == 40
    assert len(a.requests) >= 5 and len(b.requests) >= 5


async def test_a_slow_replica_gets_fewer_requests(stack, nodes):
    (fast, fast_address), (slow, slow_address), _ = nodes
    slow.delay = 0.5
    await publish(
        stack, route("acme", "mlp", fast_address, version=2, replica_addresses=[fast_address, slow_address])
    )
    calls = []
    for _ in range(30):  # a request every 20 ms: the slow replica stays busy, the fast one idle
        calls.append(asyncio.ensure_future(predict(stack)))
        await asyncio.sleep(0.02)
    await asyncio.gather(*calls)
    assert len(fast.requests) + len(slow.requests) == 30
    assert len(slow.requests) <= 7, (len(fast.requests), len(slow.requests))


@pytest.mark.parametrize("failure", ["unavailable", "not_loaded"])
async def test_a_replica_that_cannot_serve_is_retried_once_on_another(stack, nodes, failure):
    (good, good_address), (bad, bad_address), _ = nodes
    setattr(bad, failure, True)
    await publish(
        stack, route("acme", "mlp", good_address, version=2, replica_addresses=[good_address, bad_address])
    )
    answers = await asyncio.gather(*(predict(stack) for _ in range(20)))
    assert all(answer.version == 2 for answer in answers)
    # Every request answered by the good replica; those that met the bad one first, once more.
    assert len(good.requests) == 20 and len(bad.requests) >= 1


async def test_when_every_replica_fails_the_caller_hears_unavailable_after_two_tries(stack, nodes):
    for triton, _ in nodes:
        triton.unavailable = True
    addresses = [address for _, address in nodes]
    await publish(stack, route("acme", "mlp", addresses[0], version=2, replica_addresses=addresses))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await predict(stack)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "retry later" in error.value.details()
    assert sum(len(triton.requests) for triton, _ in nodes) == 2  # the first try and one retry


async def test_a_model_error_is_not_retried(stack, nodes):
    addresses = [address for _, address in nodes]
    await publish(stack, route("acme", "broken", addresses[0], version=2, replica_addresses=addresses))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await predict(stack, "broken")
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert sum(len(triton.requests) for triton, _ in nodes) == 1


async def test_the_open_inference_protocol_retries_too(stack, nodes):
    (good, good_address), (bad, bad_address), _ = nodes
    bad.unavailable = True
    await publish(
        stack, route("acme", "mlp", good_address, version=2, replica_addresses=[bad_address, good_address])
    )
    oip = service_pb2_grpc.GRPCInferenceServiceStub(stack.channel)
    request = service_pb2.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.zeros((1, 4), np.float32).tobytes())
    for _ in range(20):
        response = await oip.ModelInfer(request, metadata=stack.auth("reader"))
        assert response.model_version == "2"
    assert len(good.requests) == 20 and len(bad.requests) >= 1


@pytest.mark.parametrize("failure", ["unavailable", "not_loaded"])
async def test_a_stream_failing_before_its_first_response_is_retried(stack, nodes, failure):
    (good, good_address), (bad, bad_address), _ = nodes
    setattr(bad, failure, True)
    writer = route(
        "acme",
        "writer",
        good_address,
        version=2,
        task=GENERATE,
        replica_addresses=[good_address, bad_address],
    )
    await publish(stack, writer)
    for _ in range(20):
        *tokens, final = [message async for message in generate(stack)]
        assert [t.text for t in tokens] == ["a", "b", "c"] and final.completion_tokens == 3
    assert len(good.streams) == 20 and len(bad.streams) >= 1


async def test_a_stream_failing_after_its_first_token_is_not_retried(stack, nodes):
    addresses = [address for _, address in nodes]
    for triton, _ in nodes:
        triton.fail_after = 1
    await publish(
        stack, route("acme", "writer", addresses[0], version=2, task=GENERATE, replica_addresses=addresses)
    )
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for message in generate(stack):
            received.append(message.text)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert received == ["a"]  # no second stream: the caller would have seen its tokens twice
    assert sum(len(triton.streams) for triton, _ in nodes) == 1


async def test_the_canary_share_goes_to_the_canarys_replicas(stack, nodes):
    (main, main_address), (canary, canary_address), (other, other_address) = nodes
    canaried = route("acme", "mlp", main_address, version=3, replica_addresses=[main_address, other_address])
    canaried.canary.CopyFrom(
        inference_pb2.CanaryRoute(
            version=4, triton_model="acme--mlp--4", weight_percent=30, replica_addresses=[canary_address]
        )
    )
    await publish(stack, canaried)
    answers = [(await predict(stack, request_id=f"request-{number}")).version for number in range(100)]
    assert 10 < answers.count(4) < 60
    assert {r.model_name for r in canary.requests} == {"acme--mlp--4"}
    assert len(canary.requests) == answers.count(4)
    assert {r.model_name for r in main.requests + other.requests} == {"acme--mlp--3"}


async def test_a_deployment_scaled_to_zero_is_woken_once_then_serves(stack, nodes):
    (a, a_address), _, _ = nodes
    await publish(stack, route("acme", "sleeper", "", ready=False, scaled_to_zero=True))
    waiting = [asyncio.ensure_future(predict(stack, "sleeper")) for _ in range(5)]
    for _ in range(200):
        if stack.routing.wakes:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # time for any duplicate wake to arrive
    assert not any(call.done() for call in waiting)
    assert stack.routing.wakes == [inference_pb2.WakeRequest(tenant="acme", deployment="sleeper")]
    assert stack.routing.wake_metadata[0][INTERNAL_TOKEN_KEY] == TOKEN

    replace(stack, route("acme", "sleeper", a_address, version=2, replica_addresses=[a_address]))
    answers = await asyncio.gather(*waiting)
    assert [answer.version for answer in answers] == [2] * 5
    assert len(stack.routing.wakes) == 1


async def test_a_deployment_that_stays_scaled_to_zero_times_out_saying_why(stack):
    await publish(stack, route("acme", "sleeper", "", ready=False, scaled_to_zero=True))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await predict(stack, "sleeper", timeout=0.5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "scaled to zero" in error.value.details()
    assert len(stack.routing.wakes) == 1
