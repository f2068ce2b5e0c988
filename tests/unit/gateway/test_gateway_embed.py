"""Embed through the real gateway, straight to a fake embedding model on a fake Triton, with the
request cache and usage in a real redis-server."""

from __future__ import annotations

import asyncio
import datetime

import grpc
import numpy as np
import pytest
from maas.gateway.v1 import admin_pb2
from maas.inference.v1 import inference_pb2
from tritonclient.grpc import service_pb2_grpc

from services.common.embedding import MAX_TEXTS, MAX_TOTAL_BYTES
from services.gateway.cache import LOOKUPS
from tests.support.embedding import DIMENSIONS, embedding_answer, embedding_signature, tokens_of, vector_of
from tests.unit.gateway.gateway_fakes import FakeInference, gateway_stack, route, serve

MAX_BATCH = 4


class EmbeddingTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.requests = []

    async def ModelInfer(self, request, context):
        self.requests.append(request)
        if request.inputs[0].shape[0] > MAX_BATCH:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "batch larger than max_batch_size")
        return embedding_answer(request)


def embedding_route(tenant: str, deployment: str, address: str, version: int = 1) -> inference_pb2.Route:
    published = route(tenant, deployment, address, cacheable=True, version=version)
    published.task = inference_pb2.SERVING_TASK_EMBED
    published.signature.CopyFrom(embedding_signature())
    published.max_batch_size = MAX_BATCH
    return published


@pytest.fixture
async def stack(tmp_path, redis_server):
    triton = EmbeddingTriton()
    server, address = await serve((service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, triton))
    try:
        async with gateway_stack(tmp_path, redis_url=redis_server.url) as started:
            await started.wait_for_routes()
            started.routing.publish(
                started.routing.routes
                + [embedding_route("acme", "minilm", address), embedding_route("other", "minilm", address)]
            )
            started.embedder, started.embedder_address = triton, address
            for _ in range(200):  # the new table reaches the gateway in the background
                if not await _missing(started):
                    break
                await asyncio.sleep(0.01)
            yield started
    finally:
        await server.stop(0)


async def _missing(stack) -> bool:
    try:
        await embed(stack, "reader", ["probe"], metadata=(("cache-control", "no-cache"),))
    except grpc.aio.AioRpcError as error:
        if error.code() is grpc.StatusCode.NOT_FOUND:
            return True
        raise
    stack.embedder.requests.clear()
    return False


async def embed(stack, who: str, texts: list[str], deployment: str = "minilm", metadata=()):
    request = inference_pb2.EmbedRequest(deployment=deployment, texts=texts)
    call = stack.inference_stub.Embed(request, metadata=stack.auth(who) + tuple(metadata))
    response = await call
    return response, await call.trailing_metadata()


def vectors(response: inference_pb2.EmbedResponse) -> np.ndarray:
    tensor = response.embeddings
    return np.frombuffer(tensor.raw, np.float32).reshape(tuple(tensor.shape))


def lookups(result: str) -> float:
    return LOOKUPS.labels(result)._value.get()


async def expect_error(stack, texts, code: grpc.StatusCode, deployment: str = "minilm") -> str:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await embed(stack, "reader", texts, deployment)
    assert error.value.code() == code, error.value.details()
    return error.value.details()


async def test_embed_splits_by_max_batch_size_and_keeps_the_order(stack):
    texts = [f"sentence number {i}" for i in range(10)]
    response, trailers = await embed(stack, "reader", texts)
    assert [list(r.inputs[0].shape) for r in stack.embedder.requests] == [[4, 1], [4, 1], [2, 1]]
    assert response.embeddings.shape == [10, DIMENSIONS]
    np.testing.assert_array_equal(vectors(response), np.stack([vector_of(t) for t in texts]))
    assert response.prompt_tokens == sum(tokens_of(t) for t in texts)
    assert (response.model, response.version) == ("digits", 1)
    assert ("x-maas-model-version", "1") in tuple(trailers)
    assert stack.inference.predicts == []  # the inference service was not on the path


async def test_identical_calls_hit_the_cache_within_the_tenant_only(stack):
    hits = lookups("hit")
    first, _ = await embed(stack, "reader", ["a cached sentence", "and another"])
    await asyncio.sleep(0.1)  # the cache write lands in the background
    second, trailers = await embed(stack, "developer", ["a cached sentence", "and another"])
    assert second == first and lookups("hit") - hits == 1
    assert ("x-maas-model-version", "1") in tuple(trailers)
    assert len(stack.embedder.requests) == 1
    # Another order of the same texts is another answer; another tenant never sees acme's entry.
    await embed(stack, "reader", ["and another", "a cached sentence"])
    await embed(stack, "other", ["a cached sentence", "and another"])
    assert [r.model_name for r in stack.embedder.requests[1:]] == ["acme--minilm--1", "other--minilm--1"]
    await embed(
        stack, "reader", ["a cached sentence", "and another"], metadata=(("cache-control", "no-cache"),)
    )
    assert len(stack.embedder.requests) == 4


async def test_a_new_version_does_not_serve_the_old_versions_entries(stack):
    await embed(stack, "reader", ["versioned"])
    await asyncio.sleep(0.1)
    stack.routing.publish(
        [r for r in stack.routing.routes if (r.tenant, r.deployment) != ("acme", "minilm")]
        + [embedding_route("acme", "minilm", stack.embedder_address, version=2)]
    )
    for _ in range(200):
        response, _ = await embed(stack, "reader", ["versioned"])
        if response.version == 2:
            break
        await asyncio.sleep(0.01)
    assert response.version == 2
    assert stack.embedder.requests[-1].model_name == "acme--minilm--2"


async def test_prompt_tokens_and_cache_hits_are_metered(stack):
    texts = ["count my tokens please"]
    for _ in range(2):
        await embed(stack, "admin", texts)
        await asyncio.sleep(0.1)
    usage = await stack.admin.GetUsage(
        admin_pb2.GetUsageRequest(api_key_id=stack.key_ids["admin"]), metadata=stack.auth("reader")
    )
    [row] = usage.rows
    assert row.day == datetime.datetime.now(datetime.UTC).date().isoformat()
    # Tokens count what the model read: the second call was a cache hit.
    assert (row.requests, row.cache_hits, row.tokens) == (2, 1, tokens_of(texts[0]))


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        ([], "texts is empty"),
        (["fine", ""], "texts[1] is empty"),
        (["x"] * (MAX_TEXTS + 1), f"at most {MAX_TEXTS}"),
        (["y" * (MAX_TOTAL_BYTES // 2 + 1)] * 2, "split them across calls"),
    ],
)
async def test_bad_texts_are_refused_before_triton(stack, texts, message):
    details = await expect_error(stack, texts, grpc.StatusCode.INVALID_ARGUMENT)
    assert message in details
    assert stack.embedder.requests == []


async def test_wrong_deployments_are_refused(stack):
    assert "not found" in await expect_error(stack, ["hi"], grpc.StatusCode.NOT_FOUND, "nope")
    assert "invalid deployment name" in await expect_error(
        stack, ["hi"], grpc.StatusCode.INVALID_ARGUMENT, "Bad!"
    )
    details = await expect_error(stack, ["hi"], grpc.StatusCode.FAILED_PRECONDITION, "mlp")
    assert "PREDICT task" in details and "Predict" in details
    assert stack.embedder.requests == []


async def test_embed_goes_through_the_inference_service_until_routes_arrive(tmp_path, monkeypatch):
    forwarded = []

    async def inference_embed(self, request, context):
        forwarded.append((request, dict(context.invocation_metadata())))
        return inference_pb2.EmbedResponse(prompt_tokens=7, model="served-by-inference", version=3)

    monkeypatch.setattr(FakeInference, "Embed", inference_embed, raising=False)
    async with gateway_stack(tmp_path, routes_available=False) as stack:
        response, _ = await embed(stack, "reader", ["hello"])
        assert (response.model, response.prompt_tokens) == ("served-by-inference", 7)
        [(request, metadata)] = forwarded
        assert list(request.texts) == ["hello"] and metadata["x-maas-tenant"] == "acme"
        # The texts are checked before anything is forwarded.
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await embed(stack, "reader", [""])
        assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT and len(forwarded) == 1
