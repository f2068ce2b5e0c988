"""Pass-through of the internal services' public APIs: messages move as raw bytes, the caller's
tenant and role (and, to the inference service, the tenant's replica cap) are asserted in
metadata, deadlines and cancellation carry over, statuses come back as-is. Mutating calls are
written to the audit log with their outcome, downloads with the bytes they sent too."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from maas.inference.v1 import inference_pb2
from maas.registry.v1 import registry_pb2
from maas.trainer.v1 import trainer_pb2
from maas.wire import chunk_tag, unframe

from services.common.channels import (
    CALLER_ROLE_KEY,
    MAX_REPLICAS_KEY,
    internal_metadata,
    open_blocking_channel,
    open_channel,
)
from services.common.errors import NotFound
from services.gateway.admission import QuotaCache
from services.gateway.audit import AuditLog, is_download, is_mutating, outcome, resource_of
from services.gateway.auth import INTERNAL_METHODS, current_caller
from services.gateway.usage import Meter

log = logging.getLogger(__name__)

# Backend name -> the service it serves publicly through the gateway.
FORWARDED = {
    "registry": registry_pb2.DESCRIPTOR.services_by_name["RegistryService"],
    "inference": inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
    "trainer": trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"],
}
# Backend name -> an internal service the gateway calls for its own handlers, after checks of
# its own (AdminService's fleet methods), and never serves as it is.
CALLED_FOR_HANDLERS = {
    "inference": inference_pb2.DESCRIPTOR.services_by_name["FleetService"],
}
# Calls under this prefix (InferenceService's) carry the caller's tenant's replica cap, when the
# tenant's quota sets one.
REPLICA_CAPPED_PREFIX = f"/{FORWARDED['inference'].full_name}/"

# Client metadata never forwarded: credentials, headers only the gateway may assert, and the
# ones gRPC or internal_metadata set themselves.
DROPPED_KEYS = {"authorization", "x-request-id", "user-agent"}
DROPPED_PREFIXES = ("x-maas-", "grpc-", ":")


@dataclass(frozen=True)
class Backend:
    """Long-lived channels to one internal service."""

    name: str
    channel: grpc.aio.Channel
    # The blocking API, for client-streaming calls only (see Proxy._upload).
    upload_channel: grpc.Channel

    @classmethod
    def open(cls, name: str, address: str, credentials: grpc.ChannelCredentials | None = None) -> Backend:
        """Plaintext, or TLS (mTLS when the peer asks) with `credentials` from internal_credentials."""
        return cls(name, open_channel(address, credentials), open_blocking_channel(address, credentials))

    async def close(self) -> None:
        await self.channel.close()
        self.upload_channel.close()


# A check run before a call is forwarded (e.g. the training budget); raises to refuse it.
Guard = Callable[[str], Awaitable[None]]
# Run with (tenant, key id, response bytes) after a call succeeded (e.g. recording a new job).
Recorder = Callable[[str, str, bytes], Awaitable[None]]


class Proxy(grpc.GenericRpcHandler):
    def __init__(
        self,
        token: str,
        backends: Mapping[str, Backend],
        served_here: Collection[str] = (),
        audit: AuditLog | None = None,
        meter: Meter | None = None,
        guards: Mapping[str, Guard] | None = None,
        recorders: Mapping[str, Recorder] | None = None,
        quotas: QuotaCache | None = None,
    ) -> None:
        """`backends` holds one Backend per FORWARDED name; methods in `served_here` (full
        paths) are left to the gateway's own handlers. `guards` maps a full path to a check
        that gets the caller's tenant before the call is forwarded; `recorders` a full path
        to what is done with a successful answer. `quotas` gives each tenant's replica cap."""
        self.token = token
        self.quotas = quotas
        self.audit = audit
        self.meter = meter
        self.guards = dict(guards or {})
        self.recorders = dict(recorders or {})
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._unary: dict[str, tuple[Backend, grpc.aio.UnaryUnaryMultiCallable]] = {}
        for name, service in CALLED_FOR_HANDLERS.items():
            self._add_unary(backends[name], service)
        for name, service in FORWARDED.items():
            backend = backends[name]
            self._add_unary(backend, service)
            for method in service.methods:
                path = f"/{service.full_name}/{method.name}"
                if path not in served_here and path not in INTERNAL_METHODS:
                    handler = self._handler(backend, path, method)
                    if audit is not None and is_mutating(path) and not method.server_streaming:
                        handler = self._audited(path, method, handler)
                    elif audit is not None and is_download(path):
                        handler = self._audited_download(path, method, handler)
                    self._handlers[path] = handler

    def _add_unary(self, backend: Backend, service: ServiceDescriptor) -> None:
        """Make the service's unary methods callable with forward_unary."""
        for method in service.methods:
            if not (method.client_streaming or method.server_streaming):
                path = f"/{service.full_name}/{method.name}"
                self._unary[path] = (backend, backend.channel.unary_unary(path))

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)

    async def forward_unary(self, path: str, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Forward one serialized unary request to the backend serving `path` (a FORWARDED or
        CALLED_FOR_HANDLERS method)."""
        if path not in self._unary:
            raise NotFound(f"no backend serves {path}")
        backend, call = self._unary[path]
        guard = self.guards.get(path)
        if guard is not None:
            await guard(current_caller().tenant)
        try:
            metadata = await self._metadata(path, context)
            response = await call(request, metadata=metadata, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as error:
            await self._abort(backend, error, context)
            raise  # unreachable: abort raises
        recorder = self.recorders.get(path)
        if recorder is not None:
            caller = current_caller()
            try:
                await recorder(caller.tenant, caller.key_id, response)
            except Exception:
                # The backend did the work: the caller hears so; what was not recorded is logged.
                log.exception("recording a successful call failed", extra={"method": path})
        return response

    def _handler(self, backend: Backend, path: str, method: MethodDescriptor) -> grpc.RpcMethodHandler:
        if not method.server_streaming:
            if method.client_streaming:
                upload_call = backend.upload_channel.stream_unary(path)

                async def upload(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
                    return await self._upload(backend, path, upload_call, requests, context)

                return grpc.stream_unary_rpc_method_handler(upload)

            async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                return await self.forward_unary(path, request, context)

            return grpc.unary_unary_rpc_method_handler(unary)

        channel = backend.channel
        stream_call = (channel.stream_stream if method.client_streaming else channel.unary_stream)(path)

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            metadata = await self._metadata(path, context)
            call = stream_call(request, metadata=metadata, timeout=context.time_remaining())
            try:
                async for response in call:
                    yield response
            except grpc.aio.AioRpcError as error:
                await self._abort(backend, error, context)
            finally:
                # The client went away or the stream ended: either way the backend can stop.
                call.cancel()

        if method.client_streaming:
            return grpc.stream_stream_rpc_method_handler(stream)
        return grpc.unary_stream_rpc_method_handler(stream)

    async def _upload(
        self,
        backend: Backend,
        path: str,
        call: grpc.StreamUnaryMultiCallable,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
    ) -> bytes:
        """Client streaming through the blocking API. grpc.aio's client replaces the backend's
        status with INTERNAL "Internal error from Core" when the backend ends the call while a
        write is in flight (grpc/grpc#36066): an upload the registry rejects early would lose
        its reason. gRPC's own thread pulls the requests from this event loop."""
        loop = asyncio.get_running_loop()
        metadata = await self._metadata(path, context)
        future = call.future(_pull(requests, loop), metadata=metadata, timeout=context.time_remaining())
        finished = loop.create_future()
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(_resolve, finished))
        try:
            await finished
        except asyncio.CancelledError:
            future.cancel()
            raise
        try:
            return future.result()
        except grpc.RpcError as error:
            await self._abort(backend, error, context)
            raise  # unreachable: abort raises

    def _audited(
        self, path: str, method: MethodDescriptor, handler: grpc.RpcMethodHandler
    ) -> grpc.RpcMethodHandler:
        """The same handler, recording the call and its outcome in the audit log."""
        request_class = GetMessageClass(method.input_type)
        response_class = GetMessageClass(method.output_type)
        audit = self.audit
        assert audit is not None

        async def record(first_request: bytes | None, response: bytes | None, code: str) -> None:
            # The response names the resource as resolved (a job id prefix: the whole id).
            resource = resource_of(_parse(response_class, response)) or resource_of(
                _parse(request_class, first_request)
            )
            caller = current_caller()
            await audit.commit(caller.tenant, caller.key_id, path, resource, code)

        if method.client_streaming:
            upload = handler.stream_unary

            async def audited_upload(
                requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
            ) -> bytes:
                first: list[bytes] = []

                async def remembering() -> AsyncIterator[bytes]:
                    async for request in requests:
                        if not first:
                            first.append(request)
                        yield request

                code, response = "OK", None
                try:
                    response = await upload(remembering(), context)
                    return response
                except BaseException as error:
                    code = outcome(error, context)
                    raise
                finally:
                    await record(first[0] if first else None, response, code)

            return grpc.stream_unary_rpc_method_handler(audited_upload)

        unary = handler.unary_unary

        async def audited_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            code, response = "OK", None
            try:
                response = await unary(request, context)
                return response
            except BaseException as error:
                code = outcome(error, context)
                raise
            finally:
                await record(request, response, code)

        return grpc.unary_unary_rpc_method_handler(audited_unary)

    def _audited_download(
        self, path: str, method: MethodDescriptor, handler: grpc.RpcMethodHandler
    ) -> grpc.RpcMethodHandler:
        """The same download stream, recording it with the chunk bytes handed on to the caller:
        a whole download's count is the artifact's size; one that failed or that the caller
        abandoned half-way shows how much left."""
        request_class = GetMessageClass(method.input_type)
        response_class = GetMessageClass(method.output_type)
        tag = chunk_tag(response_class)
        audit = self.audit
        assert audit is not None
        download = handler.unary_stream

        async def audited_download(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            # Taken now: a stream the caller abandoned is closed later, maybe in another context.
            caller = current_caller()
            code, sent = "OK", 0
            try:
                async for response in download(request, context):
                    yield response
                    sent += _chunk_bytes(tag, response_class, response)
            except GeneratorExit:
                code = "CANCELLED"  # the caller went away between two chunks
                raise
            except BaseException as error:
                code = outcome(error, context)
                raise
            finally:
                resource = resource_of(_parse(request_class, request))
                if code == "CANCELLED":  # nobody waits for the status: written in the background
                    audit.record(caller.tenant, caller.key_id, path, resource, code, sent)
                else:  # in SQL before the status goes out, as a change's row
                    await audit.commit(caller.tenant, caller.key_id, path, resource, code, sent)

        return grpc.unary_stream_rpc_method_handler(audited_download)

    async def _metadata(self, path: str, context: grpc.aio.ServicerContext) -> tuple[tuple[str, Any], ...]:
        """The caller's metadata less what only the gateway may assert, plus what it asserts:
        the tenant, the internal token, the request id, the caller's role and, on
        InferenceService calls, the tenant's replica cap."""
        caller = current_caller()
        tenant = caller.tenant
        forwarded = tuple(
            (key, value)
            for key, value in context.invocation_metadata() or ()
            if key not in DROPPED_KEYS and not key.startswith(DROPPED_PREFIXES)
        )
        asserted = internal_metadata(self.token, tenant) + ((CALLER_ROLE_KEY, caller.role.name.lower()),)
        if self.quotas is not None and path.startswith(REPLICA_CAPPED_PREFIX):
            # Admission read this quota for the same call: the cache answers, not SQL.
            max_replicas = (await self.quotas.get(tenant)).max_replicas
            if max_replicas:
                asserted += ((MAX_REPLICAS_KEY, str(max_replicas)),)
        return forwarded + asserted

    async def _abort(self, backend: Backend, error: Any, context: grpc.aio.ServicerContext) -> None:
        """Relay a backend's failure (an AioRpcError or a blocking grpc.RpcError) to the caller."""
        code, details = error.code(), error.details() or ""
        if self.meter is not None:
            caller = current_caller()
            self.meter.add(caller.tenant, caller.key_id, errors=1)
        # UNAVAILABLE while the channel is not connected means the backend itself is down;
        # an UNAVAILABLE from a connected backend is its own answer and is relayed as-is.
        connected = backend.channel.get_state() is grpc.ChannelConnectivity.READY
        if code is grpc.StatusCode.UNAVAILABLE and not connected:
            log.warning("backend unavailable", extra={"backend": backend.name, "details": details})
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{backend.name} is unavailable, retry later")
        # Trailers carry google.rpc status details a client can act on.
        await context.abort(code, details, tuple(error.trailing_metadata() or ()))


def _parse(message_class: type[Message], data: bytes | None) -> Message | None:
    if data is None:
        return None
    try:
        return message_class.FromString(data)
    except DecodeError:
        return None


def _chunk_bytes(tag: bytes, message_class: type[Message], response: bytes) -> int:
    """How many artifact bytes a download stream's message carries (0 for its header)."""
    chunk = unframe(tag, response)
    if chunk is not None:
        return len(chunk)
    part = _parse(message_class, response)
    return len(part.chunk) if part is not None and part.WhichOneof("part") == "chunk" else 0  # type: ignore[attr-defined]


def _pull(requests: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop) -> Iterator[bytes]:
    """The caller's request stream as a blocking iterator, for gRPC's request-sending thread.
    The next request is read while gRPC sends this one: one at a time, a large upload waited
    for a hop into the event loop and back between every two messages."""

    async def next_request() -> bytes:
        return await anext(requests)

    pending = asyncio.run_coroutine_threadsafe(next_request(), loop)
    try:
        while True:
            try:
                request = pending.result()
            except StopAsyncIteration:
                return
            pending = asyncio.run_coroutine_threadsafe(next_request(), loop)
            yield request
    finally:
        pending.cancel()


def _resolve(finished: asyncio.Future[None]) -> None:
    if not finished.done():
        finished.set_result(None)
