"""The HTTP port: the FastAPI app (both APIs, their error bodies, a body size bound) and its
uvicorn server, started on the gateway's event loop beside the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.server import ServerSpec
from services.gateway.config import GatewaySettings
from services.gateway.http.dispatch import InProcessCalls
from services.gateway.http.errors import HttpError, openai_body, validation_error
from services.gateway.http.kserve import KServeRoutes
from services.gateway.http.openai import OpenAiRoutes

log = logging.getLogger(__name__)
# The interceptor's metrics label for calls that came in over HTTP.
METRICS_SERVICE = "gateway-http"


def create_http_app(calls: InProcessCalls, max_body_bytes: int) -> FastAPI:
    app = FastAPI(title="MaaS gateway", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(OpenAiRoutes(calls).router)
    app.include_router(KServeRoutes(calls).router)

    @app.exception_handler(HttpError)
    async def refused(request: Request, error: HttpError) -> JSONResponse:
        return _error_response(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals: an unknown path, a wrong method, a body it cannot decode.
        message = "the body is not valid JSON (UTF-8); send a JSON object" if error.status_code == 400 else error.detail
        return _error_response(request, HttpError(error.status_code, str(message)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error_response(request, validation_error(error.errors()))

    return BodyLimit(app, max_body_bytes)  # type: ignore[return-value]


def _error_response(request: Request, error: HttpError) -> JSONResponse:
    # OpenAI's error shape on /v1; the Open Inference Protocol's ({"error": message}) elsewhere.
    body = openai_body(error) if request.url.path.startswith("/v1/") else {"error": error.message}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


class BodyLimit:
    """Refuses a body over `limit` bytes with 413, from Content-Length or as it streams in. The
    app reads whole bodies anyway: this reads it first, bounded, and hands it on."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal body
            if body is None:
                return await receive()  # after the body: the disconnect a stream listens for
            message, body = body, None
            return message

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        error = HttpError(413, f"the body is larger than {self.limit} bytes", None)
        body = openai_body(error) if scope["path"].startswith("/v1/") else {"error": error.message}
        await JSONResponse(body, status_code=413)(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the gateway's process: the gateway's own SIGTERM handling stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpPort:
    """The HTTP port of one gateway process (MAAS_GATEWAY_HTTP_ADDR), sharing the address with
    sibling workers (SO_REUSEPORT) as the gRPC port does, with the gRPC port's TLS."""

    def __init__(self, spec: ServerSpec, settings: GatewaySettings) -> None:
        self.settings = settings
        calls = InProcessCalls(spec, METRICS_SERVICE)
        self.app = create_http_app(calls, settings.max_message_bytes)
        self.port = 0
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        settings = self.settings
        tls = {}
        if settings.tls_cert_file and settings.tls_key_file:
            tls = {"ssl_certfile": str(settings.tls_cert_file), "ssl_keyfile": str(settings.tls_key_file)}
            if settings.tls_client_ca_file:
                tls |= {"ssl_ca_certs": str(settings.tls_client_ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(
            self.app,
            http="httptools",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) or None,
            **tls,
        )
        listener = _listen(settings.gateway_http_addr, reuse_port=settings.gateway_workers > 1)
        self.port = listener.getsockname()[1]
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[listener]), name="http-port")
        while not self._server.started:
            if self._task.done():
                await self._task  # raises why it did not start
                raise OSError(f"the HTTP port on {settings.gateway_http_addr} did not start")
            await asyncio.sleep(0.01)
        log.info("http listening", extra={"address": settings.gateway_http_addr, "port": self.port, "tls": bool(tls)})

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task


def _listen(address: str, reuse_port: bool) -> socket.socket:
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say TCP, and
    # with it on, a response's body waited ~40 ms behind its headers for the client's delayed ACK.
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        listener.bind((host, int(port)))
    except OSError as error:
        listener.close()
        raise OSError(f"gateway HTTP port: cannot listen on {address}: {error.strerror}") from None
    listener.listen(2048)
    listener.setblocking(False)
    return listener
