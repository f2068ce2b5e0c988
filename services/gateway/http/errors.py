"""Failures as HTTP answers: the one gRPC status -> HTTP status mapping, and the two error
bodies (OpenAI's for /v1, the Open Inference Protocol's for /v2)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import grpc

from services.gateway.http.dispatch import RpcFailed

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
OPENAI_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
# Rate-limit trailers (limits.RateLimited) that go out as HTTP headers too.
RATE_LIMIT_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")
# A message that starts with a field's name (e.g. "max_tokens must be ...", "messages[3].role ...").
_LEADING_FIELD = re.compile(r"^([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+)?)(?![\w\[.])")


class HttpError(Exception):
    """A refusal of the HTTP layer itself (before any gRPC call): status, message, field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or {400: "invalid_argument", 413: "request_too_large"}.get(status)
        self.headers: dict[str, str] = {}


def http_error_of(error: RpcFailed, fields: Mapping[str, str] = MappingProxyType({})) -> HttpError:
    """The HTTP form of a failed call. `fields` maps the gRPC request's fields a message may start
    with to the HTTP request's names for them (e.g. texts -> input)."""
    status = HTTP_STATUS.get(error.code, 500)
    param = None
    if status == 400 and (match := _LEADING_FIELD.match(error.details)):
        named = match.group(1)
        root = re.split(r"[\[.]", named)[0]
        if root in fields:
            param = fields[root] + named.removeprefix(root)
    failure = HttpError(status, error.details, param, error.code.name.lower())
    failure.headers = headers_of(error)
    return failure


def headers_of(error: RpcFailed) -> dict[str, str]:
    """Retry-After (whole seconds, at least 1) and the rate-limit headers of a refused call."""
    headers = {name: value for name in RATE_LIMIT_HEADERS if (value := error.trailer(name)) is not None}
    if error.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        reset = error.trailer("x-ratelimit-reset")
        headers["retry-after"] = str(max(1, math.ceil(float(reset)))) if reset else "1"
    return headers


def openai_body(error: HttpError) -> dict:
    return {
        "error": {
            "message": error.message,
            "type": OPENAI_TYPE.get(error.status, "server_error"),
            "param": error.param,
            "code": error.code,
        }
    }


def validation_error(errors: Sequence[Any]) -> HttpError:
    """A validation failure (FastAPI's or pydantic's: wrong types, missing fields, a body that
    is not JSON) as a 400 naming the first bad field."""
    first = errors[0] if errors else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(location) or None
    message = str(first.get("msg", "invalid request"))
    if first.get("type") == "json_invalid":
        return HttpError(400, "the body is not valid JSON (UTF-8); send a JSON object")
    return HttpError(400, f"{field}: {message}" if field else message, field)
