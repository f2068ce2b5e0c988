"""Autoscaling: each deployment's replicas follow its load, between min_replicas and max_replicas.

Load is the average number of requests in flight inside Triton, read from its statistics: the
time requests spent there (queued and computing) per second of wall time (Little's law), summed
over the deployment's replicas. Every round adds a sample; a decision needs a full window of
samples since the last one, which also keeps decisions apart:
- out, when the average over the scale-up window is above target x replicas;
- in, when even the peak over the scale-down window fits in fewer replicas;
- to zero (min_replicas 0), when no request came for the idle window; the next request wakes it.
Each decision is stored with its reason (GetDeployment shows the latest), logged, and counted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import Counter

from services.common.errors import NotFound
from services.inference.converge import wanted_replicas
from services.inference.nodes import NodeSet
from services.inference.routes import Route, RouteTable
from services.inference.store import LOADING, Deployment, DeploymentStore, ScalingEvent, now

log = logging.getLogger(__name__)

DECISIONS = Counter("maas_inference_scaling_decisions_total", "Autoscaler decisions", ["direction"])


@dataclass(frozen=True)
class Sample:
    time: float  # monotonic seconds
    in_flight: float  # average requests in flight since the previous sample
    requests: int  # requests finished since the previous sample


@dataclass(frozen=True)
class Policy:
    target_in_flight: float  # per replica, for deployments that set none
    up_window: float
    down_window: float
    idle_to_zero: float


def decide(deployment: Deployment, current: int, samples: list[Sample], at: float, policy: Policy) -> tuple[int, str] | None:
    """The replicas the deployment should have now and why; None to stay. `samples` are those
    since the last decision, oldest first."""
    if current == 0 or not samples:
        return None  # scaled to zero: a request wakes it (Autoscaler.wake)
    target = deployment.target_in_flight or policy.target_in_flight
    lowest, highest = deployment.min_replicas, max(deployment.max_replicas, deployment.min_replicas, 1)
    span = at - samples[0].time

    def within(window: float) -> list[Sample]:
        return [s for s in samples if s.time > at - window]

    if span >= policy.up_window and current < highest:
        average = sum(s.in_flight for s in within(policy.up_window)) / len(within(policy.up_window))
        if average > target * current:
            to = min(highest, max(current + 1, math.ceil(average / target)))
            return to, (
                f"{average:.1f} requests in flight on average over {policy.up_window:g} s, above the "
                f"target of {target:g} per replica for {current} replica(s)"
            )
    if lowest == 0 and span >= policy.idle_to_zero and not any(s.requests for s in within(policy.idle_to_zero)):
        return 0, f"no request for {policy.idle_to_zero:g} s (min_replicas 0)"
    if span >= policy.down_window and current > max(lowest, 1):
        peak = max(s.in_flight for s in within(policy.down_window))
        to = max(lowest, 1, math.ceil(peak / target))
        if to < current:
            return to, (
                f"at most {peak:.1f} requests in flight over {policy.down_window:g} s: "
                f"{to} replica(s) hold it at the target of {target:g} per replica"
            )
    return None


class Autoscaler:
    def __init__(
        self,
        store: DeploymentStore,
        routes: RouteTable,
        nodes: NodeSet,
        policy: Policy,
        on_change: Callable[[], Awaitable[None]],
    ) -> None:
        self.store = store
        self.routes = routes
        self.nodes = nodes
        self.policy = policy
        # Run after every decision (Converger.fill): replicas follow at once, not a round later.
        self.on_change = on_change
        self._samples: dict[str, deque[Sample]] = {}
        # Per deployment, (time, per (Triton model, node): (busy ns, requests)) at the last round.
        self._last: dict[str, tuple[float, dict[tuple[str, str], tuple[int, int, int]]]] = {}
        self._waking: set[str] = set()

    async def round(self) -> None:
        """Sample every scalable deployment's load, and act where a window says so."""
        at = time.monotonic()
        for route in self.routes.all():
            deployment = route.deployment
            fixed = deployment.min_replicas > 0 and deployment.max_replicas <= deployment.min_replicas
            if route.serving is None or fixed:
                continue
            if not route.ready:
                # Loading (a cold start) or lost its nodes: nothing to measure, and the time it
                # takes must not count as idle. The window starts again once a replica serves.
                self.forget(deployment.id)
                continue
            sample = await self._sample(route, at)
            if sample is None:
                continue
            samples = self._samples.setdefault(deployment.id, deque(maxlen=4096))
            samples.append(sample)
            horizon = max(self.policy.up_window, self.policy.down_window, self.policy.idle_to_zero)
            while samples and samples[0].time < at - horizon - 1:
                samples.popleft()
            decision = decide(deployment, wanted_replicas(deployment), list(samples), at, self.policy)
            if decision is not None:
                await self._scale(route, *decision)

    async def wake(self, tenant: str, name: str) -> None:
        """A request reached a deployment scaled to zero: load a replica now."""
        route = self.routes.get(tenant, name)
        if route is None:
            raise NotFound(f"deployment {name!r} not found")
        deployment = route.deployment
        if wanted_replicas(deployment) > 0 or deployment.id in self._waking:
            return
        self._waking.add(deployment.id)
        try:
            stored = await asyncio.to_thread(
                self.store.set_state, deployment.id, LOADING, "waking up: loading a replica for a request"
            )
            if stored is not None:
                route.deployment = stored
                await self._scale(route, max(1, deployment.min_replicas), "a request arrived while scaled to zero")
        finally:
            self._waking.discard(deployment.id)

    async def _scale(self, route: Route, to: int, reason: str) -> None:
        deployment = route.deployment
        current = wanted_replicas(deployment)
        event = ScalingEvent(deployment.id, now(), current, to, reason)
        stored = await asyncio.to_thread(self.store.set_desired_replicas, deployment.id, to, event)
        if stored is None:
            return  # deleted meanwhile
        route.deployment = stored
        route.last_scaling = event
        self._samples.pop(deployment.id, None)  # the next decision needs a fresh window
        direction = "zero" if to == 0 else "out" if to > current else "in"
        DECISIONS.labels(direction).inc()
        log.info(
            "scaling decision",
            extra={"deployment": deployment.name, "tenant": deployment.tenant, "from": current, "to": to, "reason": reason},
        )
        self.routes.changed()
        await self.on_change()

    async def _sample(self, route: Route, at: float) -> Sample | None:
        """Calls in flight on average, and calls finished, since the last round, over the
        replicas of the serving revision; None on the first round (nothing to compare with).
        Calls, not Triton requests: the gateway joins calls queued behind one in flight into one
        request, so each request's time in Triton counts for the calls (rows) it carried."""
        assert route.serving is not None
        triton_model = route.serving.triton_model
        totals: dict[tuple[str, str], tuple[int, int, int]] = {}
        for node_name in route.ready_nodes(triton_model):
            node = self.nodes.get(node_name)
            if node is None:
                continue
            busy = requests = calls = 0
            for stats in await node.triton.statistics(triton_model):
                inference = stats.inference_stats
                busy += inference.success.ns + inference.fail.ns
                requests += inference.success.count + inference.fail.count
                calls += stats.inference_count + inference.fail.count
            totals[(triton_model, node_name)] = (busy, requests, calls)
        previous = self._last.get(route.deployment.id)
        self._last[route.deployment.id] = (at, totals)
        if previous is None or at <= previous[0]:
            return None
        busy_ns = requests = calls = 0
        for key, (busy, count, rows) in totals.items():
            before = previous[1].get(key, (0, 0, 0))
            if busy < before[0]:  # reloaded since: its counters started again
                before = (0, 0, 0)
            busy_ns += busy - before[0]
            requests += count - before[1]
            calls += rows - before[2]
        calls_per_request = calls / requests if requests else 1.0
        return Sample(at, busy_ns / 1e9 / (at - previous[0]) * calls_per_request, calls)

    def forget(self, deployment_id: str) -> None:
        self._samples.pop(deployment_id, None)
        self._last.pop(deployment_id, None)
