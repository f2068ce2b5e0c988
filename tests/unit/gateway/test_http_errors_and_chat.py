"""The gRPC status -> HTTP mapping of the HTTP port, the in-process context, and chat on gRPC
Generate (GenerateRequest.messages) in front of the fake decoupled Triton model."""

from __future__ import annotations

import json

import grpc
import pytest
from maas.inference.v1 import inference_pb2

from services.common.errors import InvalidArgument
from services.common.generation import MAX_MESSAGES, MAX_PROMPT_CHARS, Sampling, check_messages
from services.gateway.generate import TokenAccount
from services.gateway.http.dispatch import InProcessContext, RpcFailed, caller_metadata
from services.gateway.http.errors import http_error_of, openai_body
from tests.unit.gateway.test_gateway_generate import collect, generate, stack  # noqa: F401  (fixture)


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
        (grpc.StatusCode.FAILED_PRECONDITION, 400, "invalid_request_error"),
        (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
        (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
        (grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
        (grpc.StatusCode.UNAVAILABLE, 503, "server_error"),
        (grpc.StatusCode.INTERNAL, 500, "server_error"),
    ],
)
def test_statuses_map_once(code, status, kind):
    error = http_error_of(RpcFailed(code, "no"))
    assert error.status == status
    assert openai_body(error)["error"] == {"message": "no", "type": kind, "param": None, "code": code.name.lower()}


def test_a_rate_limit_carries_retry_after_and_its_headers():
    trailers = (("x-ratelimit-limit", "10"), ("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "3"))
    error = http_error_of(RpcFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, "tokens per day exhausted", trailers))
    assert error.headers["retry-after"] == "3" and error.headers["x-ratelimit-limit"] == "10"


def test_the_param_is_the_http_name_of_the_field_a_message_starts_with():
    error = http_error_of(RpcFailed(grpc.StatusCode.INVALID_ARGUMENT, "texts[2] is empty"), {"texts": "input"})
    assert error.param == "input[2]"
    assert http_error_of(RpcFailed(grpc.StatusCode.INVALID_ARGUMENT, "the model is odd"), {"texts": "input"}).param is None


async def test_the_in_process_context_keeps_the_status_it_aborted_with():
    context = InProcessContext((("authorization", "Bearer k"),), timeout=5)
    assert 0 < context.time_remaining() <= 5
    with pytest.raises(RpcFailed) as raised:
        await context.abort(grpc.StatusCode.NOT_FOUND, "gone")
    assert context.code() is grpc.StatusCode.NOT_FOUND and raised.value.details == "gone"
    assert InProcessContext(()).time_remaining() is None


def test_x_api_key_becomes_a_bearer_key():
    assert ("authorization", "Bearer k") in caller_metadata({"x-api-key": "k"}, "r")
    assert ("authorization", "Bearer a") in caller_metadata({"authorization": "Bearer a", "x-api-key": "b"}, "r")
    assert [key for key, _ in caller_metadata({}, "r")] == ["x-request-id"]


def test_messages_are_checked():
    assert json.loads(check_messages([("system", "be brief"), ("user", "é")])) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "é"},
    ]
    with pytest.raises(InvalidArgument, match="messages\\[1\\].role"):
        check_messages([("user", "a"), ("root", "b")])
    with pytest.raises(InvalidArgument, match="at most"):
        check_messages([("user", "a")] * (MAX_MESSAGES + 1))
    with pytest.raises(InvalidArgument, match="characters together"):
        check_messages([("user", "a" * MAX_PROMPT_CHARS), ("user", "b")])


def test_the_reservation_counts_utf8_bytes():
    # A byte-level tokenizer may give each byte of "é" a token of its own.
    assert TokenAccount("é" * 10, Sampling(max_tokens=5)).reserved == 25


def test_a_stream_cut_short_is_billed_the_prompt_tokens_the_runner_counted_early():
    conversation = json.dumps([{"role": "user", "content": "hello there"}])
    account = TokenAccount(conversation, Sampling(max_tokens=5))
    assert account.prompt_tokens == len(conversation)  # the bound, until the runner says
    account.saw(inference_pb2.GenerateResponse(text="Hi", prompt_tokens=9), 1)
    account.saw(inference_pb2.GenerateResponse(text="!"), 1)
    assert (account.prompt_tokens, account.completion_tokens, account.finished) == (9, 2, False)


async def test_generate_sends_messages_as_chat(stack):  # noqa: F811
    messages = [inference_pb2.ChatMessage(role="user", content="hi")]
    *tokens, final = await collect(generate(stack, prompt="", messages=messages, max_tokens=2))
    assert "".join(t.text for t in tokens) == "ab" and final.completion_tokens == 2
    (sent,) = stack.triton.streams
    assert sent.parameters["chat"].string_param == "1"
    assert json.loads(sent.raw_input_contents[0][4:].decode()) == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"prompt": "hi", "messages": [inference_pb2.ChatMessage(role="user", content="x")]}, "not both"),
        ({"prompt": "", "messages": [inference_pb2.ChatMessage(role="robot", content="x")]}, "role"),
        ({"prompt": "", "messages": [inference_pb2.ChatMessage(role="user")] * 300}, "at most 256"),
    ],
)
async def test_bad_conversations_are_refused(stack, fields, complaint):  # noqa: F811
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await collect(generate(stack, **fields))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and complaint in error.value.details()
