"""The routing table of the data path: where each deployment is served, kept in memory from
the inference service's RoutingService.WatchRoutes stream, plus the direct call to Triton."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from maas.inference.v1 import inference_pb2, inference_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common.channels import open_channel, triton_metadata
from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.common.interceptors import INTERNAL_TOKEN_KEY
from services.common.serving import execution_limit_error
from services.common.tensors import CompiledSignature, check_signature
from services.common.traffic import goes_to_canary

log = logging.getLogger(__name__)

FIRST_RETRY_SECONDS = 0.1
MAX_RETRY_SECONDS = 5.0
# Cold start: how long a request without a deadline waits for a loading deployment.
COLD_START_WAIT_SECONDS = 10.0


@dataclass(frozen=True)
class Target:
    """The Triton model one request goes to, and the version it is."""

    triton_model: str
    version: int


@dataclass(frozen=True)
class LiveRoute:
    route: inference_pb2.Route
    signature: CompiledSignature  # compiled once per route, used on every request
    triton: service_pb2_grpc.GRPCInferenceServiceStub  # on the address's long-lived channel
    # The header Triton's restricted protocols require, sent on every call to it.
    triton_metadata: tuple[tuple[str, str], ...] = ()

    def target(self, request_id: str) -> Target:
        """The deployment's own version, or its canary for the canary's share of requests."""
        canary = self.route.canary if self.route.HasField("canary") else None
        if canary is not None and goes_to_canary(request_id, canary.weight_percent):
            return Target(canary.triton_model, canary.version)
        return Target(self.route.triton_model, self.route.version)


class RouteTable:
    def __init__(
        self,
        inference: grpc.aio.Channel,
        token: str,
        default_timeout: float = 60.0,
        triton_token: str = "",
        triton_credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.default_timeout = default_timeout
        self._triton_metadata = triton_metadata(triton_token)
        self._triton_credentials = triton_credentials
        self._watch_routes = inference_pb2_grpc.RoutingServiceStub(inference).WatchRoutes
        self._metadata = ((INTERNAL_TOKEN_KEY, token),)
        self._routes: dict[tuple[str, str], LiveRoute] = {}
        self._triton_channels: dict[str, grpc.aio.Channel] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._applied = asyncio.Event()  # set, and replaced, on every table update
        # True while the stream is up and has delivered the table at least once. When it drops,
        # the last table keeps serving; only deployments it lacks are in doubt.
        self.synced = False

    def find(self, tenant: str, deployment: str) -> LiveRoute:
        """The route of a deployment in the caller's tenant, ready or not."""
        live = self._routes.get((tenant, deployment))
        if live is None:
            if not self.synced:
                raise Unavailable("the gateway is still loading the deployment table; retry shortly")
            raise NotFound(f"deployment {deployment[:80]!r} not found")
        return live

    def find_ready(self, tenant: str, deployment: str) -> LiveRoute:
        live = self.find(tenant, deployment)
        if not live.route.ready:
            raise Unavailable(
                f"deployment {deployment!r} is not ready to serve yet; GetDeployment shows its state"
            )
        return live

    async def wait_ready(self, tenant: str, deployment: str, timeout: float | None) -> LiveRoute:
        """Cold start: the deployment's route once it is ready, waiting for a loading one at most
        `timeout` seconds (the caller's deadline), or COLD_START_WAIT_SECONDS without one."""
        live = self.find(tenant, deployment)
        if live.route.ready:
            return live
        # Give up a little before the caller's deadline, so that it hears why.
        budget = timeout - min(0.1, timeout / 10) if timeout else COLD_START_WAIT_SECONDS
        deadline = asyncio.get_running_loop().time() + budget
        while not live.route.ready:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return self.find_ready(tenant, deployment)  # raises: still not ready
            applied = self._applied
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(applied.wait(), remaining)
            live = self.find(tenant, deployment)
        return live

    def get(self, tenant: str, deployment: str) -> LiveRoute | None:
        return self._routes.get((tenant, deployment))

    def apply(self, routes: Iterable[inference_pb2.Route]) -> None:
        """Replace the table with `routes`, reusing what is compiled for unchanged routes."""
        table: dict[tuple[str, str], LiveRoute] = {}
        for route in routes:
            key = (route.tenant, route.deployment)
            previous = self._routes.get(key)
            if previous is not None and previous.route == route:
                table[key] = previous
                continue
            try:
                check_signature(route.signature)
            except InvalidArgument as error:
                log.warning("skipping route with a bad signature", extra={"route": key, "error": str(error)})
                continue
            signature = CompiledSignature(route.signature, route.max_batch_size)
            table[key] = LiveRoute(route, signature, self._triton(route.triton_address), self._triton_metadata)
        self._routes = table
        self._applied.set()
        self._applied = asyncio.Event()

    def _triton(self, address: str) -> service_pb2_grpc.GRPCInferenceServiceStub:
        if address not in self._triton_channels:
            self._triton_channels[address] = open_channel(address, self._triton_credentials)
        return service_pb2_grpc.GRPCInferenceServiceStub(self._triton_channels[address])

    def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch(), name="route-watcher")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for channel in self._triton_channels.values():
            await channel.close()

    async def _watch(self) -> None:
        """Follow WatchRoutes for the life of the gateway, reconnecting with jittered backoff."""
        delay = FIRST_RETRY_SECONDS
        while True:
            try:
                async for update in self._watch_routes(
                    inference_pb2.WatchRoutesRequest(), metadata=self._metadata
                ):
                    self.apply(update.routes)
                    if not self.synced:
                        log.info("route stream connected", extra={"routes": len(self._routes)})
                    self.synced = True
                    delay = FIRST_RETRY_SECONDS
                reason = "the inference service ended the stream"
            except grpc.aio.AioRpcError as error:
                reason = f"{error.code().name}: {error.details()}"
            except Exception:
                # Never let the watcher die: a frozen table would outlive every later change.
                log.exception("route watcher failed")
                reason = "the route watcher failed"
            self.synced = False
            # Loud once per outage, quiet while retrying.
            level = logging.WARNING if delay == FIRST_RETRY_SECONDS else logging.DEBUG
            log.log(level, "route stream down; retrying", extra={"reason": reason, "retry_seconds": delay})
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, MAX_RETRY_SECONDS)


async def infer(
    live: LiveRoute,
    request: service_pb2.ModelInferRequest,
    context: grpc.aio.ServicerContext,
    default_timeout: float,
) -> service_pb2.ModelInferResponse:
    """One ModelInfer on the route's Triton, its errors mapped to what the caller can act on."""
    try:
        return await live.triton.ModelInfer(
            request, timeout=context.time_remaining() or default_timeout, metadata=live.triton_metadata
        )
    except grpc.aio.AioRpcError as error:
        await abort_for_triton(error, live, request.model_name, context)
        raise  # unreachable: abort raises


async def abort_for_triton(
    error: grpc.aio.AioRpcError, live: LiveRoute, triton_model: str, context: grpc.aio.ServicerContext
) -> None:
    """End the caller's call with Triton's error, mapped to what the caller can act on."""
    deployment = live.route.deployment
    # Triton names its own model; the caller knows only the deployment.
    details = (error.details() or "").replace(triton_model, deployment)
    code = error.code()
    if limit_error := execution_limit_error(details):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(limit_error))
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
        # Triton is down or the model is (re)loading: both pass, so the caller should retry.
        log.warning("triton unavailable", extra={"deployment": deployment, "details": details})
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, f"deployment {deployment!r} cannot serve right now, retry later"
        )
    await context.abort(code, details)
