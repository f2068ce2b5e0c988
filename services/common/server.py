"""Server bootstrap written once: gRPC aio server with health, reflection, the interceptor,
a Prometheus port, and a graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import start_http_server

from services.common.channels import KEEPALIVE
from services.common.interceptors import Authenticator, InterceptedHandlers, ServiceInterceptor
from services.common.settings import CommonSettings

log = logging.getLogger(__name__)
# Allocations between two collections of the youngest generation (Python's default: 700).
GC_YOUNG_THRESHOLD = 10_000


@dataclass
class Servicer:
    """One gRPC service to mount: the generated `add_*_to_server` function and its servicer."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    full_name: str  # e.g. "maas.registry.v1.RegistryService"


@dataclass(frozen=True)
class ServerTls:
    """PEM bytes for a TLS port; with client_ca set, callers must present a certificate it signed."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


def server_tls(settings: CommonSettings) -> ServerTls | None:
    """The TLS a service's port uses from MAAS_TLS_* settings; None means plaintext."""
    if not (settings.tls_cert_file and settings.tls_key_file):
        return None
    return ServerTls(
        certificate_chain=settings.tls_cert_file.read_bytes(),
        private_key=settings.tls_key_file.read_bytes(),
        client_ca=settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None,
    )


@dataclass
class ServerSpec:
    service: str  # short name used in logs and metrics, e.g. "registry"
    address: str  # host:port; port 0 picks a free one
    servicers: Sequence[Servicer]
    authenticate: Authenticator | None = None
    max_message_bytes: int = 64 * 1024 * 1024
    # Raw handlers mounted beside the servicers (the gateway's pass-through proxy), and the
    # full names of the services they serve, so health and reflection list those too.
    generic_handlers: Sequence[grpc.GenericRpcHandler] = field(default_factory=list)
    generic_service_names: Sequence[str] = ()
    tls: ServerTls | None = None
    # Share the port with sibling processes (SO_REUSEPORT): the gateway's workers.
    reuse_port: bool = False


class _Collector:
    """Stands in for the server while the generated `add_*_to_server` functions mount their
    services: keeps their handlers, to be served wrapped (InterceptedHandlers)."""

    def __init__(self) -> None:
        self.handlers: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        """The same methods as the generic handler added with them, which serves them already."""


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: list[str]

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.set_serving(False)
        await self.server.stop(grace)


async def start_server(spec: ServerSpec) -> RunningServer:
    """Build and start the server; returns once it listens. Port 0 in spec.address picks one."""
    options = [
        ("grpc.max_receive_message_length", spec.max_message_bytes),
        ("grpc.max_send_message_length", spec.max_message_bytes),
        ("grpc.so_reuseport", int(spec.reuse_port)),
        *KEEPALIVE.server_options(),
    ]
    server = grpc.aio.server(options=options)
    # Every service is mounted on a collector, then served through one InterceptedHandlers.
    mounted = _Collector()
    for servicer in spec.servicers:
        servicer.add_to_server(servicer.servicer, mounted)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, mounted)
    names = list(dict.fromkeys([*(m.full_name for m in spec.servicers), *spec.generic_service_names]))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer([*names, health.SERVICE_NAME, reflection.SERVICE_NAME]), mounted
    )
    interceptor = ServiceInterceptor(spec.service, spec.authenticate)
    server.add_generic_rpc_handlers((InterceptedHandlers([*mounted.handlers, *spec.generic_handlers], interceptor),))
    if spec.tls:
        port = server.add_secure_port(spec.address, spec.tls.credentials())
    else:
        port = server.add_insecure_port(spec.address)
    if port == 0:
        raise OSError(f"{spec.service}: cannot listen on {spec.address} (address in use?)")
    await server.start()
    running = RunningServer(server, port, health_servicer, names)
    # NOT_SERVING until the app's start-up work is done; the callers flip it.
    await running.set_serving(False)
    log.info("listening", extra={"address": spec.address, "port": port, "tls": bool(spec.tls)})
    return running


def start_metrics(address: str) -> int:
    """Serve Prometheus metrics over HTTP on host:port; returns the bound port."""
    host, _, port = address.rpartition(":")
    http_server, _ = start_http_server(int(port), addr=host or "127.0.0.1")
    return http_server.server_port


async def serve_until_signalled(app: App, *, metrics_address: str | None, grace: float) -> None:
    """Run a service until SIGTERM or SIGINT, then let in-flight RPCs finish within `grace`.
    Without a metrics address, something else serves this process's metrics (gateway workers)."""
    if metrics_address is not None:
        log.info("metrics", extra={"metrics_port": start_metrics(metrics_address)})
    running = await start_server(app.spec)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if app.on_start:
            await app.on_start(running)
        settle_garbage_collector()
        await running.set_serving(True)
        await stop.wait()
        log.info("stopping", extra={"grace_seconds": grace})
    finally:
        await running.stop(grace)
        if app.on_stop:
            await app.on_stop()
        log.info("stopped")


def settle_garbage_collector() -> None:
    """Once a service has started: what start-up built (modules, descriptors, compiled routes)
    lives as long as the process, so the collector stops scanning it (gc.freeze), and young
    objects are collected less often. A busy gateway otherwise spends a few percent of its time
    re-scanning that heap for cycles it does not have."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


@dataclass
class App:
    """A service ready to serve: its server spec plus start-up and shutdown work."""

    spec: ServerSpec
    on_start: Callable[[RunningServer], Awaitable[None]] | None = None
    on_stop: Callable[[], Awaitable[None]] | None = None


@contextlib.asynccontextmanager
async def running(app: App, grace: float = 1.0) -> AsyncIterator[RunningServer]:
    """Start an app in-process (tests use port 0) and stop it on exit."""
    server = await start_server(app.spec)
    try:
        if app.on_start:
            await app.on_start(server)
        await server.set_serving(True)
        yield server
    finally:
        await server.stop(grace)
        if app.on_stop:
            await app.on_stop()
