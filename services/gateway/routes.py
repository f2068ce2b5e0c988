"""The routing table of the data path: where each deployment is served (its replicas on the
Triton nodes), kept in memory from the inference service's RoutingService.WatchRoutes stream,
plus the direct call to Triton: the least busy replica, one retry elsewhere when a replica cannot
take a request, and Triton's errors mapped for the caller."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Collection, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import NoReturn

import grpc
from maas.inference.v1 import inference_pb2, inference_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common.channels import open_channel, triton_metadata
from services.common.errors import InvalidArgument, Unavailable, not_found
from services.common.interceptors import INTERNAL_TOKEN_KEY
from services.common.serving import execution_limit_error
from services.common.tensors import CompiledSignature, check_signature
from services.common.traffic import goes_to_canary
from services.gateway.coalesce import Coalescer, Lane, join_key

log = logging.getLogger(__name__)

FIRST_RETRY_SECONDS = 0.1
MAX_RETRY_SECONDS = 5.0
# Cold start: how long a request without a deadline waits for a loading deployment.
COLD_START_WAIT_SECONDS = 10.0
# Scale to zero: the most often one deployment is woken, however many requests wait for it.
WAKE_INTERVAL_SECONDS = 1.0
# A request goes to one replica and, when that one cannot take it, to one other at most.
MAX_TRIES = 2
# Triton calls in flight to one model at once, per replica serving it, before more calls wait to
# be joined. One: the calls that arrive while it runs go together next. With two, batches under
# load held fewer than 2 calls on average, and the gateway's CPU per call barely fell.
COALESCE_DEPTH_PER_REPLICA = 1
# Distinct call shapes whose lanes a route keeps; past it they are built again (callers may send
# any number of shapes where a signature has variable dimensions).
MAX_LANES_PER_ROUTE = 256
# How Triton says that it does not have a model loaded (or no longer: it is being unloaded).
NOT_LOADED_MARKERS = ("unknown model", "is not ready")


@dataclass(eq=False)
class Replica:
    """One node serving a target: the stub on the node's long-lived channel, and the requests
    this gateway process has in flight on it (what the choice of replica balances)."""

    address: str
    triton: service_pb2_grpc.GRPCInferenceServiceStub
    outstanding: int = 0

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        self.outstanding += 1
        try:
            yield
        finally:
            self.outstanding -= 1


@dataclass(frozen=True)
class Target:
    """The Triton model one request goes to, the version it is, the replicas serving it, and the
    version's price tier (what the calls it answers are metered under)."""

    triton_model: str
    version: int
    replicas: tuple[Replica, ...] = ()
    tier: str = ""

    def least_busy(self, avoiding: Collection[Replica] = ()) -> Replica | None:
        """The replica with the fewest requests in flight, ties broken at random so that idle
        replicas share the load; None when every replica is in `avoiding` (or there is none)."""
        candidates = [replica for replica in self.replicas if replica not in avoiding]
        if not candidates:
            return None
        return min(candidates, key=lambda replica: (replica.outstanding, random.random()))


@dataclass(frozen=True)
class LiveRoute:
    route: inference_pb2.Route
    signature: CompiledSignature  # compiled once per route, used on every request
    main: Target  # the deployment's own version
    canary: Target | None  # while a canary takes its share of the requests
    # The coalescing lanes of its calls, by lane key (which names the target's Triton model),
    # built on a shape's first call rather than on every call.
    lanes: dict[Hashable, Lane] = field(default_factory=dict, compare=False, repr=False)

    @property
    def serving(self) -> bool:
        """Whether requests may go to it now; if not, it is loading, failed or scaled to zero."""
        return self.route.ready and not self.route.scaled_to_zero

    @property
    def targets(self) -> tuple[Target, ...]:
        return (self.main,) if self.canary is None else (self.main, self.canary)

    def target(self, request_id: str) -> Target:
        """The deployment's own version, or its canary for the canary's share of requests."""
        if self.canary is not None and goes_to_canary(request_id, self.route.canary.weight_percent):
            return self.canary
        return self.main


class RouteTable:
    """The data path's one way to Triton: where each deployment is served, waiting for a
    loading one and waking one scaled to zero, the choice of replica, the call and its retry
    on another replica, and Triton's errors mapped for the caller. Predict, Embed, Generate and
    the Open Inference Protocol all go through `wait_ready` then `infer` or `stream`."""

    def __init__(
        self,
        inference: grpc.aio.Channel,
        token: str,
        default_timeout: float = 60.0,
        triton_token: str = "",
        triton_credentials: grpc.ChannelCredentials | None = None,
        coalesce: bool = True,
    ) -> None:
        self.default_timeout = default_timeout
        self._coalescer = Coalescer() if coalesce else None
        self._triton_metadata = triton_metadata(triton_token)
        self._triton_credentials = triton_credentials
        routing = inference_pb2_grpc.RoutingServiceStub(inference)
        self._watch_routes = routing.WatchRoutes
        self._wake = routing.Wake
        self._metadata = ((INTERNAL_TOKEN_KEY, token),)
        self._routes: dict[tuple[str, str], LiveRoute] = {}
        # Called with each route that brings an autoscaling decision not seen before (audit).
        self.on_scaling: Callable[[inference_pb2.Route], None] | None = None
        self._triton_channels: dict[str, grpc.aio.Channel] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._applied = asyncio.Event()  # set, and replaced, on every table update
        # (tenant, deployment) -> when it may be woken again; the Wake calls under way.
        self._next_wake: dict[tuple[str, str], float] = {}
        self._waking: set[asyncio.Task[None]] = set()
        # True while the stream is up and has delivered the table at least once. When it drops,
        # the last table keeps serving; only deployments it lacks are in doubt.
        self.synced = False

    def find(self, tenant: str, deployment: str) -> LiveRoute:
        """The route of a deployment in the caller's tenant, ready or not."""
        live = self._routes.get((tenant, deployment))
        if live is None:
            if not self.synced:
                raise Unavailable("the gateway is still loading the deployment table; retry shortly")
            own = (name for owner, name in self._routes if owner == tenant)
            raise not_found("deployment", deployment, own)
        return live

    async def wait_ready(self, tenant: str, deployment: str, timeout: float | None) -> LiveRoute:
        """Cold start: the deployment's route once it serves, waiting for a loading one at most
        `timeout` seconds (the caller's deadline), or COLD_START_WAIT_SECONDS without one. One
        scaled to zero is woken first: the inference service loads a replica."""
        live = self.find(tenant, deployment)
        if live.serving:
            return live
        # Give up a little before the caller's deadline, so that it hears why.
        budget = timeout - min(0.1, timeout / 10) if timeout else COLD_START_WAIT_SECONDS
        deadline = asyncio.get_running_loop().time() + budget
        while not live.serving:
            if live.route.scaled_to_zero:
                self._wake_up(live.route)
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise Unavailable(_not_serving(live.route))
            applied = self._applied
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(applied.wait(), remaining)
            live = self.find(tenant, deployment)
        return live

    def _wake_up(self, route: inference_pb2.Route) -> None:
        """Ask the inference service, in the background, to load a replica of a deployment
        scaled to zero: once per WAKE_INTERVAL_SECONDS per deployment, however many requests
        are waiting for it."""
        key = (route.tenant, route.deployment)
        now = asyncio.get_running_loop().time()
        if self._next_wake.get(key, 0.0) > now:
            return
        self._next_wake = {waking: until for waking, until in self._next_wake.items() if until > now}
        self._next_wake[key] = now + WAKE_INTERVAL_SECONDS
        task = asyncio.create_task(self._send_wake(*key), name="wake")
        self._waking.add(task)
        task.add_done_callback(self._waking.discard)

    async def _send_wake(self, tenant: str, deployment: str) -> None:
        request = inference_pb2.WakeRequest(tenant=tenant, deployment=deployment)
        try:
            await self._wake(request, metadata=self._metadata, timeout=self.default_timeout)
        except grpc.aio.AioRpcError as error:
            # The waiting requests time out as for any cold start; the next one wakes it again.
            log.warning(
                "waking a deployment scaled to zero failed",
                extra={
                    "tenant": tenant,
                    "deployment": deployment,
                    "error": f"{error.code().name}: {error.details()}",
                },
            )

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
            if self.on_scaling is not None and route.HasField("last_scaling_event") and (
                previous is None or previous.route.last_scaling_event != route.last_scaling_event
            ):
                self.on_scaling(route)
            try:
                check_signature(route.signature)
            except InvalidArgument as error:
                log.warning("skipping route with a bad signature", extra={"route": key, "error": str(error)})
                continue
            table[key] = self._live(route, previous)
        self._routes = table
        self._applied.set()
        self._applied = asyncio.Event()

    def _live(self, route: inference_pb2.Route, previous: LiveRoute | None) -> LiveRoute:
        # A replica that was serving before the change keeps its count of requests in flight,
        # so that a replica added by a scale-up gets the new requests until the load is even.
        known = {
            (target.triton_model, replica.address): replica
            for target in (previous.targets if previous is not None else ())
            for replica in target.replicas
        }

        def target(triton_model: str, version: int, addresses: Iterable[str], tier: str) -> Target:
            replicas = tuple(
                known.get((triton_model, address)) or Replica(address, self._triton(address))
                for address in addresses
            )
            return Target(triton_model, version, replicas, tier)

        # An inference service that predates replicas names one Triton, for both revisions.
        legacy = [route.triton_address] if route.ready and route.triton_address else []
        main = target(route.triton_model, route.version, route.replica_addresses or legacy, route.tier)
        canary = None
        if route.HasField("canary"):
            addresses = route.canary.replica_addresses or legacy
            canary = target(route.canary.triton_model, route.canary.version, addresses, route.canary.tier)
        signature = CompiledSignature(route.signature, route.max_batch_size)
        return LiveRoute(route, signature, main, canary)

    def _triton(self, address: str) -> service_pb2_grpc.GRPCInferenceServiceStub:
        if address not in self._triton_channels:
            self._triton_channels[address] = open_channel(address, self._triton_credentials)
        return service_pb2_grpc.GRPCInferenceServiceStub(self._triton_channels[address])

    async def infer(
        self,
        live: LiveRoute,
        target: Target,
        request: service_pb2.ModelInferRequest,
        context: grpc.aio.ServicerContext,
    ) -> service_pb2.ModelInferResponse:
        """The call's answer from Triton: alone, or joined with other calls of the same shape
        that queue behind calls in flight to the same model (services.gateway.coalesce)."""
        joinable = self._coalescer is not None and live.route.max_batch_size > 1 and live.signature.splittable
        joined = join_key(target.triton_model, request) if joinable else None
        if joined is None or joined[1] >= live.route.max_batch_size:
            return await self._infer_alone(live, target, request, context)
        key, rows = joined
        lane = live.lanes.get(key)
        if lane is None:
            if len(live.lanes) >= MAX_LANES_PER_ROUTE:
                live.lanes.clear()
            lane = live.lanes[key] = Lane(
                key,
                live.route.max_batch_size,
                COALESCE_DEPTH_PER_REPLICA * max(1, len(target.replicas)),
                partial(self._send_joined, live, target),
            )
        alone = partial(self._infer_alone, live, target, request, context)
        return await self._coalescer.infer(lane, request, rows, self._timeout(context), alone)  # type: ignore[union-attr]

    async def _send_joined(
        self, live: LiveRoute, target: Target, request: service_pb2.ModelInferRequest, timeout: float
    ) -> service_pb2.ModelInferResponse:
        """One ModelInfer of joined calls on the least busy replica, no retry: on any failure each
        call goes alone."""
        replica = self._next_replica(live, target, [])
        with replica.busy():
            return await replica.triton.ModelInfer(request, timeout=timeout, metadata=self._triton_metadata)

    async def _infer_alone(
        self,
        live: LiveRoute,
        target: Target,
        request: service_pb2.ModelInferRequest,
        context: grpc.aio.ServicerContext,
    ) -> service_pb2.ModelInferResponse:
        """One ModelInfer on the target's least busy replica; when that replica cannot take it
        (its node is down, or the model is not loaded there), once more on another one."""
        tried: list[Replica] = []
        while True:
            replica = self._next_replica(live, target, tried)
            with replica.busy():
                try:
                    return await replica.triton.ModelInfer(
                        request, timeout=self._timeout(context), metadata=self._triton_metadata
                    )
                except grpc.aio.AioRpcError as error:
                    if not (_replica_cannot_serve(error) and self._may_retry(live, target, tried, context)):
                        await _abort_for_triton(error, live, target.triton_model, context)

    async def stream(
        self,
        live: LiveRoute,
        target: Target,
        request: service_pb2.ModelInferRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        """Triton's responses to one generation request, from the target's least busy replica.
        Before the first response, a replica that cannot take the request (its node is down:
        a gRPC error; the model is not loaded there: Triton's in-band error) is swapped once for
        another; after it, never, as tokens have reached the caller. The Triton call is
        cancelled when the caller's call ends early (cancel, deadline) or the consumer stops."""
        tried: list[Replica] = []
        while True:
            replica = self._next_replica(live, target, tried)
            call = replica.triton.ModelStreamInfer(
                timeout=self._timeout(context), metadata=self._triton_metadata
            )
            answered = False
            try:
                with replica.busy():
                    await call.write(request)
                    await call.done_writing()
                    async for response in call:
                        if (
                            not answered
                            and _says_not_loaded(response.error_message)
                            and self._may_retry(live, target, tried, context)
                        ):
                            break
                        answered = True
                        yield response
                    else:
                        return
            except grpc.aio.AioRpcError as error:
                retry = not answered and _replica_cannot_serve(error)
                if not (retry and self._may_retry(live, target, tried, context)):
                    await _abort_for_triton(error, live, target.triton_model, context)
            finally:
                call.cancel()

    def _next_replica(self, live: LiveRoute, target: Target, tried: list[Replica]) -> Replica:
        """The least busy replica not tried yet for this request, added to `tried`."""
        replica = target.least_busy(avoiding=tried)
        if replica is None:  # only on a first try: _may_retry allows a retry only to a replica left
            raise Unavailable(
                f"deployment {live.route.deployment!r} has no replica ready to serve; retry shortly"
            )
        tried.append(replica)
        return replica

    def _may_retry(
        self, live: LiveRoute, target: Target, tried: list[Replica], context: grpc.aio.ServicerContext
    ) -> bool:
        """Whether a request its replica could not take goes to another one (logged when it
        does): once, when there is another, while the caller's deadline leaves time."""
        remaining = context.time_remaining()
        retry = (
            len(tried) < MAX_TRIES
            and target.least_busy(avoiding=tried) is not None
            and (remaining is None or remaining > 0)
        )
        if retry:
            log.info(
                "replica cannot serve; retrying on another",
                extra={"deployment": live.route.deployment, "replica": tried[-1].address},
            )
        return retry

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        return context.time_remaining() or self.default_timeout

    def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch(), name="route-watcher")

    async def close(self) -> None:
        background = [task for task in (self._watcher, *self._waking) if task is not None]
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._coalescer is not None:
            await self._coalescer.close()
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


def _not_serving(route: inference_pb2.Route) -> str:
    if route.scaled_to_zero:
        return f"deployment {route.deployment!r} was scaled to zero and is starting a replica; retry shortly"
    return f"deployment {route.deployment!r} is not ready to serve yet; GetDeployment shows its state"


def _says_not_loaded(details: str) -> bool:
    """Whether Triton's message says the model is not loaded on it (never was, or it is being
    unloaded): "Request for unknown model: ...", or not ready."""
    return any(marker in details for marker in NOT_LOADED_MARKERS)


def _replica_cannot_serve(error: grpc.aio.AioRpcError) -> bool:
    """Whether a replica failed a request without running it: its node is down or restarting,
    or the model is not loaded there. Another replica may well answer it."""
    code = error.code()
    return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND) or _says_not_loaded(
        error.details() or ""
    )


async def _abort_for_triton(
    error: grpc.aio.AioRpcError, live: LiveRoute, triton_model: str, context: grpc.aio.ServicerContext
) -> NoReturn:
    """End the caller's call with Triton's error, mapped to what the caller can act on."""
    deployment = live.route.deployment
    # Triton names its own model; the caller knows only the deployment.
    details = (error.details() or "").replace(triton_model, deployment)
    if limit_error := execution_limit_error(details):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(limit_error))
    if _replica_cannot_serve(error):
        # Triton is down or the model is (re)loading: both pass, so the caller should retry.
        log.warning("triton unavailable", extra={"deployment": deployment, "details": details})
        await context.abort(
            grpc.StatusCode.UNAVAILABLE, f"deployment {deployment!r} cannot serve right now, retry later"
        )
    await context.abort(error.code(), details)
