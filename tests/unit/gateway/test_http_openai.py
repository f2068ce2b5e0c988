"""The gateway's HTTP port, OpenAI API (/v1), in front of the fake decoupled Triton model of
gateway_fakes: the real gateway, the real uvicorn port, and the official `openai` client."""

from __future__ import annotations

import asyncio
import json

import httpx2
import openai
import pytest
from maas.inference.v1 import inference_pb2

from services.stack.ephemeral import free_port
from tests.unit.gateway.gateway_fakes import FakeInference, gateway_stack, route
from tests.unit.gateway.test_gateway_limits import set_quota


async def _list_deployments(self, request, context):
    return inference_pb2.ListDeploymentsResponse(
        deployments=[inference_pb2.Deployment(name="writer", model="digits", resolved_version=1)]
    )


@pytest.fixture
async def stack(tmp_path, redis_server, monkeypatch):
    monkeypatch.setattr(FakeInference, "ListDeployments", _list_deployments, raising=False)
    port = free_port()
    async with gateway_stack(
        tmp_path, redis_url=redis_server.url, gateway_http_addr=f"127.0.0.1:{port}"
    ) as started:
        await started.wait_for_routes()
        writer = route("acme", "writer", started.triton_address, task=inference_pb2.SERVING_TASK_GENERATE)
        started.routing.publish([*started.routing.routes, writer])
        started.http = f"http://127.0.0.1:{port}"
        async with httpx2.AsyncClient(base_url=started.http) as client:
            for _ in range(200):  # the gateway hears of the new route in the background
                ready = await client.get("/v2/models/writer/ready", headers=auth(started, "reader"))
                if ready.status_code == 200:
                    break
                await asyncio.sleep(0.01)
        yield started


def auth(stack, who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.keys[who]}"}


@pytest.fixture
async def http(stack):
    async with httpx2.AsyncClient(base_url=stack.http, timeout=10) as client:
        yield client


async def test_chat_completion_through_the_openai_client(stack):
    client = openai.AsyncOpenAI(base_url=stack.http + "/v1", api_key=stack.keys["reader"])
    answer = await client.chat.completions.create(
        model="writer", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
    )
    assert answer.choices[0].message.content == "abc"
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 3
    (sent,) = stack.triton.streams
    assert sent.parameters["chat"].string_param == "1"
    assert json.loads(sent.raw_input_contents[0][4:]) == [{"role": "user", "content": "hi"}]


async def test_streamed_completion_ends_with_usage_and_done(stack, http):
    body = {"model": "writer", "prompt": "hi", "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    response = await http.post("/v1/completions", json=body, headers=auth(stack, "reader"))
    assert response.status_code == 200
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "ab"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "writer", "prompt": "hi", "n": 2}, 400, "n"),
        ({"model": "writer", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "writer", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "writer", "prompt": "hi", "stop": ["x" * 100]}, 400, "stop"),
        ({"model": "writer", "prompt": ""}, 400, "prompt"),
        ({"model": "nope", "prompt": "hi"}, 404, None),
        ({"model": "mlp", "prompt": "hi"}, 400, None),
    ],
)
async def test_bad_requests_get_openai_errors(stack, http, body, status, param):
    response = await http.post("/v1/completions", json=body, headers=auth(stack, "reader"))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param


async def test_keys_are_checked(stack, http):
    body = {"model": "writer", "prompt": "hi"}
    assert (await http.post("/v1/completions", json=body)).status_code == 401
    bad = {"Authorization": "Bearer maas_nope_nope"}
    assert (await http.post("/v1/completions", json=body, headers=bad)).status_code == 401
    assert (await http.get("/v1/models", headers=auth(stack, "reader"))).json()["data"][0]["id"] == "writer"


async def test_token_quota_answers_429_with_retry_after(stack, http):
    await set_quota(stack, "acme", tokens_per_day=20)
    body = {"model": "writer", "prompt": "hi", "max_tokens": 30}
    response = await http.post("/v1/completions", json=body, headers=auth(stack, "reader"))
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["type"] == "rate_limit_error"


async def test_a_client_that_goes_away_cancels_the_generation(stack):
    stack.triton.delay = 0.05
    body = {"model": "writer", "prompt": "hi", "max_tokens": 500, "stream": True}
    async with httpx2.AsyncClient(base_url=stack.http) as client:
        async with client.stream("POST", "/v1/completions", json=body, headers=auth(stack, "reader")) as events:
            async for line in events.aiter_lines():
                if line.startswith("data: "):
                    break  # one token, then hang up
    await asyncio.wait_for(stack.triton.cancelled.wait(), 10)


async def test_two_tenants_stream_at_once(stack):
    other = route("other", "writer", stack.triton_address, task=inference_pb2.SERVING_TASK_GENERATE)
    stack.routing.publish([*stack.routing.routes, other])
    stack.triton.delay = 0.01

    async def chat(who: str) -> str:
        client = openai.AsyncOpenAI(base_url=stack.http + "/v1", api_key=stack.keys[who])
        for _ in range(200):  # until the gateway heard of the second route
            try:
                stream = await client.chat.completions.create(
                    model="writer", messages=[{"role": "user", "content": who}], max_tokens=20, stream=True
                )
                break
            except openai.NotFoundError:
                await asyncio.sleep(0.01)
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

    assert await asyncio.gather(chat("reader"), chat("other")) == ["abcdefghijklmnopqrst"] * 2
    models = {stream.model_name for stream in stack.triton.streams}
    assert models == {"acme--writer--1", "other--writer--1"}


async def test_sync_client_and_a_model_error_as_400(stack):
    def call() -> None:
        client = openai.OpenAI(base_url=stack.http + "/v1", api_key=stack.keys["reader"], max_retries=0)
        client.completions.create(model="writer", prompt="a~b")

    with pytest.raises(openai.BadRequestError) as error:
        await asyncio.to_thread(call)
    assert "'~' is not known" in str(error.value)


@pytest.mark.parametrize(
    ("content", "status", "complaint"),
    [
        (b'{"model": "writer", "prompt": "\xff\xfe"}', 400, "JSON"),
        (b'{"model": "writer", "prompt": "hi", "stop": "' + b"x" * 10_000_000 + b'"}', 400, "stop"),
        (b"[1, 2]", 400, ""),
        (b'{"model": 7, "prompt": "hi"}', 400, "model"),
        (b'{"model": "writer", "prompt": [1, 2]}', 400, "prompt"),
        (b'{"model": "writer", "prompt": "hi", "seed": 99999999999999999999999}', 400, "seed"),
        (b'{"model": "writer", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ],
)
async def test_hostile_bodies(stack, http, content, status, complaint):
    headers = {**auth(stack, "reader"), "content-type": "application/json"}
    response = await http.post("/v1/completions", content=content, headers=headers)
    assert response.status_code == status, response.text
    assert complaint in response.json()["error"]["message"]


async def test_a_body_over_the_limit_is_refused_before_it_is_read(tmp_path, redis_server):
    port = free_port()
    async with gateway_stack(
        tmp_path, redis_url=redis_server.url, gateway_http_addr=f"127.0.0.1:{port}", max_message_bytes=1000
    ) as stack, httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        response = await client.post("/v1/completions", content=b"x" * 2000, headers=auth(stack, "reader"))
        assert response.status_code == 413

        async def chunks():
            for _ in range(4):
                yield b"x" * 500

        chunked = await client.post("/v1/completions", content=chunks(), headers=auth(stack, "reader"))
        assert chunked.status_code == 413 and chunked.json()["error"]["type"] == "invalid_request_error"


async def test_chat_messages_are_checked(stack, http):
    too_many = [{"role": "user", "content": "x"}] * 257
    for messages, param in (
        ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
        (too_many, None),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
         "messages[0].content[0].type"),
        ([], "messages"),
    ):
        body = {"model": "writer", "messages": messages}
        response = await http.post("/v1/chat/completions", json=body, headers=auth(stack, "reader"))
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
