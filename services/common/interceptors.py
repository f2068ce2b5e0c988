"""The one server interceptor every service runs: request ids, authentication, metrics, logs
and the mapping of domain errors to gRPC status codes."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Histogram

from services.common import errors
from services.common.logs import request_id_var

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
INTERNAL_TOKEN_KEY = "x-maas-internal-token"
TENANT_KEY = "x-maas-tenant"

STATUS_OF_ERROR: dict[type[errors.MaasError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# Methods anyone may call without credentials: probes and API discovery.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

REQUESTS = Counter("maas_grpc_requests_total", "gRPC requests handled", ["service", "method", "code"])
LATENCY = Histogram(
    "maas_grpc_request_duration_seconds",
    "gRPC request latency",
    ["service", "method", "code"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

# Checks the caller of `method` given its metadata; raises Unauthenticated/PermissionDenied.
Authenticator = Callable[[str, Mapping[str, str]], Awaitable[None]]


def new_request_id() -> str:
    """32 random hex digits, as uuid4().hex but without building a UUID (a sixth of its cost, on
    every call that comes without an id)."""
    return os.urandom(16).hex()


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status code a domain error maps to; anything unexpected is INTERNAL."""
    for cls in type(exc).__mro__:
        if cls in STATUS_OF_ERROR:
            return STATUS_OF_ERROR[cls]
    return grpc.StatusCode.INTERNAL


def internal_token_authenticator(token: str) -> Authenticator:
    """Internal services accept only callers that present the shared token (the gateway)."""

    async def authenticate(method: str, metadata: Mapping[str, str]) -> None:
        given = metadata.get(INTERNAL_TOKEN_KEY, "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise errors.Unauthenticated(
                "this is an internal port: call the gateway, or send the internal token"
            )

    return authenticate


class ServiceInterceptor:
    """Wraps each method's handler once, the first time the server routes a call to it (see
    InterceptedHandlers). grpc-aio's own server interceptors run a coroutine and build a new
    handler on every call, which cost a busy gateway more than most of the work they wrap."""

    def __init__(self, service: str, authenticate: Authenticator | None = None) -> None:
        self.service = service
        self.authenticate = authenticate
        # (method, code) -> its metric children: labels() takes a lock and builds a key per call.
        self._metrics: dict[tuple[str, grpc.StatusCode], tuple[Any, Any]] = {}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        wrap = self._wrap_stream if handler.response_streaming else self._wrap_unary
        kind = ("stream" if handler.request_streaming else "unary") + "_" + (
            "stream" if handler.response_streaming else "unary"
        )
        behavior = getattr(handler, kind)
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        # Requests arrive as bytes and are parsed inside the call: grpc-aio's own deserializer
        # answers undecodable bytes with UNKNOWN, where the caller should hear INVALID_ARGUMENT.
        parse = _parser(method, handler.request_deserializer)
        return factory(
            wrap(method, behavior, parse, handler.request_streaming),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )

    async def enter(self, method: str, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        request_id_var.set(metadata.get(REQUEST_ID_KEY) or new_request_id())
        if self.authenticate and not method.startswith(UNAUTHENTICATED_PREFIXES):
            await self.authenticate(method, metadata)

    def record(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        metrics = self._metrics.get((method, code))
        if metrics is None:
            labels = (self.service, method, code.name)
            metrics = self._metrics[(method, code)] = (REQUESTS.labels(*labels), LATENCY.labels(*labels))
        metrics[0].inc()
        metrics[1].observe(seconds)

    def _wrap_unary(self, method: str, behavior: Callable[..., Any], parse: Parser, streaming: bool):
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _Call(self, method, context):
                return await behavior(_parsed(request, parse, streaming), context)

        return handle

    def _wrap_stream(self, method: str, behavior: Callable[..., Any], parse: Parser, streaming: bool):
        if not inspect.isasyncgenfunction(behavior):
            raise TypeError(f"{method}: streaming handlers must be async generators")

        async def handle(request: Any, context: grpc.aio.ServicerContext):
            async with _Call(self, method, context):
                async for response in behavior(_parsed(request, parse, streaming), context):
                    yield response

        return handle


class _Call:
    """Around every call: authenticate, map errors to statuses, record metrics."""

    __slots__ = ("interceptor", "method", "context", "started")

    def __init__(self, interceptor: ServiceInterceptor, method: str, context: grpc.aio.ServicerContext) -> None:
        self.interceptor = interceptor
        self.method = method
        self.context = context
        self.started = time.perf_counter()

    async def __aenter__(self) -> None:
        try:
            await self.interceptor.enter(self.method, self.context)
        except BaseException as raised:
            # A refused call (authentication, limits) ends here, mapped as any other error.
            await self.__aexit__(type(raised), raised, None)
            raise

    async def __aexit__(self, kind: type[BaseException] | None, raised: BaseException | None, _: Any) -> None:
        code = grpc.StatusCode.OK
        try:
            if isinstance(raised, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
            elif isinstance(raised, grpc.aio.AbortError):
                # The handler aborted with a status of its own.
                code = _as_status(self.context.code())
            elif isinstance(raised, Exception):
                exc = _sole_error(raised)
                code = status_of(exc)
                if code is grpc.StatusCode.INTERNAL:
                    log.error("unhandled error in %s", self.method, exc_info=raised)
                    message = f"internal error (request id {request_id_var.get()}); the server log has the details"
                else:
                    message = str(exc)
                trailers = exc.trailing_metadata if isinstance(exc, errors.MaasError) else ()
                await self.context.abort(code, message, trailers)
        finally:
            self.interceptor.record(self.method, code, time.perf_counter() - self.started)


class InterceptedHandlers(grpc.GenericRpcHandler):
    """The server's one generic handler: finds a method among `handlers` (the services' own)
    and hands out its wrapped handler, built on the method's first call and reused."""

    def __init__(self, handlers: Sequence[grpc.GenericRpcHandler], interceptor: ServiceInterceptor) -> None:
        self.handlers = handlers
        self.interceptor = interceptor
        # Only methods some handler serves are kept: a bounded set, whatever callers send.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            for handlers in self.handlers:
                found = handlers.service(handler_call_details)
                if found is not None:
                    wrapped = self._wrapped[method] = self.interceptor.wrap(method, found)
                    break
        return wrapped


def _sole_error(exc: Exception) -> Exception:
    """The one error inside (nested) exception groups of one, as a TaskGroup raises it; else exc."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


Parser = Callable[[bytes], Any]


def _parser(method: str, deserializer: Parser | None) -> Parser:
    """The handler's request deserializer, raising InvalidArgument on bytes it cannot parse."""
    if deserializer is None:
        return lambda request: request  # a raw-bytes handler (the gateway's proxy) parses nothing

    def parse(request: bytes) -> Any:
        try:
            return deserializer(request)
        except (DecodeError, ValueError) as error:
            raise errors.InvalidArgument(
                f"the request is not a valid protobuf message for {method}: {error}"
            ) from None

    return parse


def _parsed(request: Any, parse: Parser, streaming: bool) -> Any:
    """One parsed request, or (client streaming) the request stream parsed message by message."""
    if not streaming:
        return parse(request)

    async def messages():  # type: ignore[no-untyped-def]
        async for raw in request:
            yield parse(raw)

    return messages()


def _as_status(code: Any) -> grpc.StatusCode:
    if isinstance(code, grpc.StatusCode):
        return code
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN
