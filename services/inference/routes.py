"""The routing table: every deployment as the data path sees it (the latest row, the revision
that serves, and its replicas on the nodes), kept in memory, with a signal on every change for
WatchRoutes and cold starts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from prometheus_client import Gauge

from services.common.errors import FailedPrecondition, NotFound, Unavailable
from services.common.tensors import CompiledSignature
from services.inference.store import (
    FAILED,
    LOADING,
    PENDING,
    READY,
    SCALED_TO_ZERO,
    Canary,
    Deployment,
    ScalingEvent,
)

DEPLOYMENTS = Gauge("maas_inference_deployments", "Deployments by state", ["state"])


@dataclass
class Replica:
    """One copy of one revision of a deployment, on one node."""

    triton_model: str
    node: str
    version: int
    state: str  # LOADING or READY
    canary: bool = False


@dataclass
class Route:
    """One deployment as the data path sees it: the latest row, the revision that serves, and
    where its replicas are."""

    deployment: Deployment
    # The row as it was when its revision first finished loading; None while nothing serves.
    serving: Deployment | None = None
    compiled: CompiledSignature | None = None
    # The canary once it is loaded and takes its share of the requests.
    canary: Canary | None = None
    # Every replica of every revision the deployment has on the nodes, by (Triton model, node):
    # the serving one's, a roll's new one's while it loads, the canary's.
    replicas: dict[tuple[str, str], Replica] = field(default_factory=dict)
    # Why it has fewer replicas than it wants; empty when it has them all.
    shortfall: str = ""
    # The autoscaler's latest decision, sent on the route stream for the gateway's audit log.
    last_scaling: ScalingEvent | None = None

    @property
    def ready(self) -> bool:
        return self.serving is not None and self.compiled is not None and bool(self.ready_nodes())

    def ready_nodes(self, triton_model: str | None = None) -> list[str]:
        """Nodes where a revision (the serving one by default) is loaded and takes requests."""
        if triton_model is None:
            if self.serving is None:
                return []
            triton_model = self.serving.triton_model
        return sorted(r.node for r in self.replicas.values() if r.triton_model == triton_model and r.state == READY)

    def replicas_of(self, triton_model: str) -> list[Replica]:
        return [r for r in self.replicas.values() if r.triton_model == triton_model]

    def add_replica(self, replica: Replica) -> None:
        self.replicas[(replica.triton_model, replica.node)] = replica

    def drop_replica(self, triton_model: str, node: str) -> Replica | None:
        return self.replicas.pop((triton_model, node), None)

    @property
    def served(self) -> Deployment:
        """The revision requests reach: the serving one, else the one being loaded."""
        return self.serving or self.deployment

    def serve(self, revision: Deployment) -> None:
        """Requests go to `revision` from now on."""
        self.deployment = self.serving = revision
        self.compiled = CompiledSignature(revision.signature, revision.max_batch_size)

    def stop_serving(self) -> None:
        self.serving = self.compiled = self.canary = None
        self.replicas.clear()


class RouteTable:
    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], Route] = {}
        self._changed = asyncio.Event()

    def get(self, tenant: str, name: str) -> Route | None:
        return self._routes.get((tenant, name))

    def add(self, deployment: Deployment) -> Route:
        """The deployment's route, created (serving nothing yet) when it has none."""
        return self._routes.setdefault((deployment.tenant, deployment.name), Route(deployment))

    def put(self, deployment: Deployment) -> Route:
        """A new route for a new deployment, serving nothing yet."""
        route = self._routes[(deployment.tenant, deployment.name)] = Route(deployment)
        return route

    def remove(self, tenant: str, name: str) -> Route | None:
        return self._routes.pop((tenant, name), None)

    def names(self, tenant: str) -> list[str]:
        """The tenant's deployments, for a NOT_FOUND's suggestions."""
        return [name for owner, name in self._routes if owner == tenant]

    def all(self) -> list[Route]:
        return list(self._routes.values())

    def changed(self) -> None:
        """Wake everyone waiting on the table: the route stream and cold starts."""
        states = Counter(route.deployment.state for route in self._routes.values())
        for state in (LOADING, READY, FAILED, PENDING, SCALED_TO_ZERO):
            DEPLOYMENTS.labels(state).set(states[state])
        self._changed.set()
        self._changed = asyncio.Event()

    async def watch(self) -> AsyncIterator[list[Route]]:
        """The whole table now, then again after every change."""
        while True:
            changed = self._changed
            yield self.all()
            await changed.wait()

    async def serving(self, tenant: str, name: str, wait_seconds: float) -> Route:
        """The deployment's route once it serves, waiting up to `wait_seconds` for a cold start."""
        deadline = time.monotonic() + wait_seconds
        while True:
            route = self.get(tenant, name)
            if route is None:
                raise NotFound(f"deployment {name!r} not found")
            if route.ready:
                return route
            if route.deployment.state == FAILED:
                raise FailedPrecondition(f"deployment {name!r} failed: {route.deployment.message}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"deployment {name!r} is still loading; retry shortly")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
