"""The OpenAI-compatible API (/v1): models, completions, chat completions and embeddings. The
model name is the deployment's. Each route translates its JSON into the gateway's own gRPC request
(InferenceService Generate, Embed, ListDeployments, GetDeployment) and the answer back; streams are
server-sent events ending in `data: [DONE]`."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from maas.inference.v1 import inference_pb2
from pydantic import BaseModel, ConfigDict, Field

from services.common.generation import is_final
from services.common.interceptors import REQUEST_ID_KEY, new_request_id
from services.gateway.http.dispatch import InProcessCalls, Metadata, RpcFailed, caller_metadata
from services.gateway.http.errors import HttpError, http_error_of, openai_body

SERVICE = "/maas.inference.v1.InferenceService"
GENERATE, EMBED = f"{SERVICE}/Generate", f"{SERVICE}/Embed"
LIST_DEPLOYMENTS, GET_DEPLOYMENT = f"{SERVICE}/ListDeployments", f"{SERVICE}/GetDeployment"
FINISH_REASONS = {inference_pb2.FINISH_REASON_STOP: "stop", inference_pb2.FINISH_REASON_LENGTH: "length"}
INT32 = {"ge": -(2**31), "le": 2**31 - 1}
INT64 = {"ge": -(2**63), "le": 2**63 - 1}
# GenerateRequest's fields -> their names here, for the `param` of a refusal.
GENERATE_FIELDS = {
    name: name for name in ("prompt", "messages", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop")
}
EMBED_FIELDS = {"texts": "input"}


class _Body(BaseModel):
    # Fields OpenAI has and the gateway does without (user, metadata, ...) are ignored, as
    # OpenAI ignores what it does not know; JSON types are checked strictly.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampled(_Body):
    model: str
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, **INT32)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = Field(0, **INT32)  # an extension: OpenAI has none
    seed: int | None = Field(None, **INT64)
    stop: str | list[str] | None = None
    logprobs: Any = None
    echo: bool = False
    best_of: int | None = None


class CompletionRequest(_Sampled):
    prompt: str | list[str]


class ContentPart(_Body):
    type: str
    text: str = ""


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_Sampled):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, **INT32)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class EmbeddingRequest(_Body):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


def _refuse_unsupported(body: _Sampled) -> None:
    """Options a client relies on that the gateway cannot honour: refused, not silently dropped."""
    if body.n != 1:
        raise HttpError(400, f"n must be 1: one choice per request, got {body.n}", "n")
    if body.best_of not in (None, 1):
        raise HttpError(400, "best_of is not supported: leave it unset or 1", "best_of")
    if body.logprobs not in (None, False, 0):
        raise HttpError(400, "logprobs are not available from this gateway: leave logprobs unset", "logprobs")
    if body.echo:
        raise HttpError(400, "echo is not supported: leave it false", "echo")
    if isinstance(body, ChatRequest):
        if body.tools:
            raise HttpError(400, "tools are not supported: send messages without tools", "tools")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise HttpError(400, "only response_format {\"type\": \"text\"} is supported", "response_format")


def _generate_request(body: _Sampled, max_tokens: int | None) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(deployment=body.model, top_k=body.top_k)
    if max_tokens is not None:
        request.max_tokens = max_tokens
    if body.temperature is not None:
        request.temperature = body.temperature
    if body.top_p is not None:
        request.top_p = body.top_p
    if body.seed is not None:
        request.seed = body.seed
    if body.stop is not None:
        request.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    return request


def _chat_content(index: int, message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part_index, part in enumerate(message.content):
        if part.type != "text":
            raise HttpError(
                400,
                f"messages[{index}].content[{part_index}] is a {part.type[:40]!r} part: only text parts are supported",
                f"messages[{index}].content[{part_index}].type",
            )
        texts.append(part.text)
    return "".join(texts)


class OpenAiRoutes:
    def __init__(self, calls: InProcessCalls) -> None:
        self.calls = calls
        self.router = APIRouter(prefix="/v1")
        self.router.add_api_route("/models", self.list_models, methods=["GET"])
        self.router.add_api_route("/models/{model}", self.get_model, methods=["GET"])
        self.router.add_api_route("/completions", self.completions, methods=["POST"])
        self.router.add_api_route("/chat/completions", self.chat_completions, methods=["POST"])
        self.router.add_api_route("/embeddings", self.embeddings, methods=["POST"])

    async def list_models(self, request: Request) -> dict:
        metadata, _ = _caller(request)
        models, page_token = [], ""
        while True:
            page = await _unary(
                self.calls,
                LIST_DEPLOYMENTS,
                inference_pb2.ListDeploymentsRequest(page_size=100, page_token=page_token),
                inference_pb2.ListDeploymentsResponse,
                metadata,
            )
            models.extend(_model_of(deployment) for deployment in page.deployments)
            if not (page_token := page.next_page_token):
                return {"object": "list", "data": models}

    async def get_model(self, model: str, request: Request) -> dict:
        metadata, _ = _caller(request)
        answer = await _unary(
            self.calls,
            GET_DEPLOYMENT,
            inference_pb2.GetDeploymentRequest(name=model),
            inference_pb2.GetDeploymentResponse,
            metadata,
        )
        return _model_of(answer.deployment)

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        _refuse_unsupported(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise HttpError(400, f"send one prompt per request, got {len(prompts)}", "prompt")
        generate = _generate_request(body, body.max_tokens)
        generate.prompt = prompts[0]
        return await self._generate(generate, body, request, chat=False)

    async def chat_completions(self, body: ChatRequest, request: Request) -> Any:
        _refuse_unsupported(body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        generate = _generate_request(body, max_tokens)
        if not body.messages:
            raise HttpError(400, "messages must not be empty", "messages")
        for index, message in enumerate(body.messages):
            generate.messages.add(role=message.role, content=_chat_content(index, message))
        return await self._generate(generate, body, request, chat=True)

    async def _generate(
        self, generate: inference_pb2.GenerateRequest, body: _Sampled, request: Request, chat: bool
    ) -> Any:
        metadata, request_id = _caller(request)
        completion = Completion(body.model, request_id, chat)
        responses = self.calls.stream(GENERATE, generate, inference_pb2.GenerateResponse, metadata)
        try:
            # The first message before any byte of the answer: a refusal gets its own status.
            first = await anext(responses)
        except RpcFailed as error:
            await responses.aclose()
            raise http_error_of(error, GENERATE_FIELDS) from None
        except StopAsyncIteration:
            raise HttpError(502, "the model ended the generation without an answer") from None
        headers = {"x-request-id": request_id}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            events = completion.events(first, responses, usage)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        try:
            completion.add(first)
            async for message in responses:
                completion.add(message)
        except RpcFailed as error:
            raise http_error_of(error, GENERATE_FIELDS) from None
        return JSONResponse(completion.whole(), headers=headers)

    async def embeddings(self, body: EmbeddingRequest, request: Request) -> Any:
        metadata, request_id = _caller(request)
        texts = [body.input] if isinstance(body.input, str) else body.input
        answer = await _unary(
            self.calls,
            EMBED,
            inference_pb2.EmbedRequest(deployment=body.model, texts=texts),
            inference_pb2.EmbedResponse,
            metadata,
            EMBED_FIELDS,
        )
        shape = tuple(answer.embeddings.shape)
        vectors = np.frombuffer(answer.embeddings.raw, dtype="<f4").reshape(shape)
        if body.dimensions is not None and body.dimensions != shape[1]:
            raise HttpError(
                400, f"dimensions: deployment {body.model!r} answers {shape[1]} dimensions", "dimensions"
            )
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": base64.b64encode(row.tobytes()).decode()
                if body.encoding_format == "base64"
                else row.tolist(),
            }
            for index, row in enumerate(vectors)
        ]
        usage = {"prompt_tokens": answer.prompt_tokens, "total_tokens": answer.prompt_tokens}
        return JSONResponse(
            {"object": "list", "data": data, "model": body.model, "usage": usage},
            headers={"x-request-id": request_id},
        )


class Completion:
    """One generation's answer, as a whole (chat.completion, text_completion) or as chunks."""

    def __init__(self, model: str, request_id: str, chat: bool) -> None:
        self.model = model
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.text: list[str] = []
        self.final: inference_pb2.GenerateResponse | None = None
        self.version = 0

    def add(self, message: inference_pb2.GenerateResponse) -> None:
        self.text.append(message.text)
        self.version = message.version
        if is_final(message):
            self.final = message

    @property
    def usage(self) -> dict[str, int]:
        prompt, completion = (self.final.prompt_tokens, self.final.completion_tokens) if self.final else (0, 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.final.finish_reason) if self.final else None

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind + ".chunk" if chunk and self.chat else kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": f"version-{self.version}",
        }

    def whole(self) -> dict[str, Any]:
        text = "".join(self.text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._envelope(False), "choices": [choice], "usage": self.usage}

    def chunk(self, message: inference_pb2.GenerateResponse, first: bool, usage: bool) -> dict[str, Any]:
        self.add(message)
        finish = FINISH_REASONS.get(message.finish_reason)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": message.text} if first else {"content": message.text}
        else:
            choice["text"] = message.text
        chunk = {**self._envelope(True), "choices": [choice]}
        if usage:
            chunk["usage"] = None
        return chunk

    async def events(
        self, first: inference_pb2.GenerateResponse, rest: AsyncIterator[inference_pb2.GenerateResponse], usage: bool
    ) -> AsyncIterator[bytes]:
        """Server-sent events. A client that goes away cancels this (Starlette), which closes
        `rest` and so the gateway's call and the Triton stream behind it."""
        try:
            yield _event(self.chunk(first, True, usage))
            async for message in rest:
                yield _event(self.chunk(message, False, usage))
        except RpcFailed as error:
            # The status line went out with the first chunk: the error is the stream's last event.
            yield _event(openai_body(http_error_of(error, GENERATE_FIELDS)))
            return
        finally:
            await rest.aclose()
        if usage:
            yield _event({**self._envelope(True), "choices": [], "usage": self.usage})
        yield b"data: [DONE]\n\n"


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _caller(request: Request) -> tuple[Metadata, str]:
    request_id = request.headers.get(REQUEST_ID_KEY) or new_request_id()
    return caller_metadata(request.headers, request_id), request_id


async def _unary(calls: InProcessCalls, method: str, message: Any, answer: type, metadata: Metadata,
                 fields: dict[str, str] | None = None) -> Any:
    try:
        return await calls.unary(method, message, answer, metadata)
    except RpcFailed as error:
        raise http_error_of(error, fields or {}) from None


def _model_of(deployment: inference_pb2.Deployment) -> dict[str, Any]:
    return {
        "id": deployment.name,
        "object": "model",
        "created": deployment.create_time.seconds,
        "owned_by": deployment.model,
    }
