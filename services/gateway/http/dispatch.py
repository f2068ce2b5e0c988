"""HTTP requests as in-process calls of the gateway's own gRPC methods.

Why in process, through the same interceptor and servicers: keys, roles, tenants, rate limits,
token quotas, usage, billing, audit, metrics and the mapping of domain errors to statuses all live
in the gRPC call path (ServiceInterceptor -> ApiKeyAuthenticator -> Admission, then the
servicers and the proxy). Calling that path with the HTTP caller's key as metadata gives the HTTP
port all of it with nothing re-implemented, so the two ports cannot drift apart. Calling it in
process rather than over a loopback channel skips a second HTTP/2 connection, its framing, a
response serialization and a thread hop per message, and needs no client certificate when the
gateway's port requires mTLS. What it costs over the handlers' own work is one serialization
of the request (the wrapped handlers parse bytes, as they do for the network) and a small
context object per call; the report and BENCHMARKS give the measured CPU time.

InProcessContext implements the part of grpc.aio.ServicerContext the gateway's handlers use:
invocation_metadata, time_remaining, set_trailing_metadata, abort and code."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from services.common.interceptors import REQUEST_ID_KEY, InterceptedHandlers, ServiceInterceptor
from services.common.server import ServerSpec

M = TypeVar("M", bound=Message)
Metadata = tuple[tuple[str, str], ...]


class RpcFailed(grpc.aio.AbortError):
    """An in-process call ended with a status other than OK."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: Sequence[tuple[str, Any]] = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailing_metadata = tuple(trailing_metadata)

    def trailer(self, key: str) -> str | None:
        return next((str(value) for name, value in self.trailing_metadata if name == key), None)


class InProcessContext:
    """A call's context when the caller is this process (see the module docstring)."""

    def __init__(self, metadata: Metadata, timeout: float | None = None) -> None:
        self._metadata = metadata
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._code: grpc.StatusCode | None = None
        self.trailing_metadata: Metadata = ()

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, Any]]) -> None:
        self.trailing_metadata = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence = ()) -> None:
        self._code = code
        raise RpcFailed(code, details, trailing_metadata or self.trailing_metadata)

    def code(self) -> grpc.StatusCode | None:
        return self._code


@dataclass(frozen=True)
class _CallDetails:
    method: str
    invocation_metadata: Metadata = ()


class _Mounted:
    """Collects the handlers the generated `add_*_to_server` functions mount (as the server does)."""

    def __init__(self) -> None:
        self.handlers: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        """The same methods as the generic handler added with them."""


class InProcessCalls:
    """Calls of the services a ServerSpec mounts, through the same authentication and interceptor
    (its metrics under their own service name, e.g. "gateway-http")."""

    def __init__(self, spec: ServerSpec, service: str) -> None:
        mounted = _Mounted()
        for servicer in spec.servicers:
            servicer.add_to_server(servicer.servicer, mounted)
        self.handlers = InterceptedHandlers(
            [*mounted.handlers, *spec.generic_handlers], ServiceInterceptor(service, spec.authenticate)
        )

    def _handler(self, method: str) -> grpc.RpcMethodHandler:
        handler = self.handlers.service(_CallDetails(method))
        if handler is None:
            raise RpcFailed(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served")
        return handler

    async def unary(self, method: str, request: Message, response_class: type[M], metadata: Metadata) -> M:
        handler = self._handler(method)
        response = await handler.unary_unary(request.SerializeToString(), InProcessContext(metadata))
        return response_class.FromString(response) if isinstance(response, bytes) else response

    async def stream(
        self, method: str, request: Message, response_class: type[M], metadata: Metadata
    ) -> AsyncIterator[M]:
        handler = self._handler(method)
        responses = handler.unary_stream(request.SerializeToString(), InProcessContext(metadata))
        try:
            async for response in responses:
                yield response_class.FromString(response) if isinstance(response, bytes) else response
        finally:
            await responses.aclose()  # now, not when collected: this cancels the Triton stream


def caller_metadata(headers: Mapping[str, str], request_id: str) -> Metadata:
    """The gRPC metadata of an HTTP caller: its key (Authorization: Bearer, or x-api-key, which
    OpenAI and KServe clients may send instead) and the request id."""
    authorization = headers.get("authorization")
    if authorization is None and (key := headers.get("x-api-key")):
        authorization = f"Bearer {key}"
    pairs = [(REQUEST_ID_KEY, request_id)]
    if authorization is not None:
        pairs.append(("authorization", authorization))
    return tuple(pairs)
