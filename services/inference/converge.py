"""Converging the nodes to the deployments table: loading each revision's replicas (and the
canary's) in the background, recording READY, PENDING or FAILED, keeping every deployment at the
replicas it wants (re-placing those of a node that died or drains, adding and removing them as
the autoscaler decides), draining what a roll replaced, unloading (and killing what an unload
leaves behind), reloading models whose processes died, and reconciling a node that comes up.
Every route change it makes goes through the RouteTable."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Coroutine
from typing import Any

from prometheus_client import Histogram

from services.common.errors import MaasError
from services.inference import placement
from services.inference.artifacts import ArtifactCache
from services.inference.caps import replica_memory_mb
from services.inference.nodes import DOWN, NODE_READY, Node, NodeSet
from services.inference.repository import ModelSpec
from services.inference.routes import Replica, Route, RouteTable
from services.inference.serving import public_message
from services.inference.store import (
    FAILED,
    LOADING,
    PENDING,
    READY,
    SCALED_TO_ZERO,
    Canary,
    Deployment,
    DeploymentStore,
)
from services.inference.stubs import reap_stubs, stubs_under
from services.inference.triton import ModelLoadError

log = logging.getLogger(__name__)

LOAD_SECONDS = Histogram(
    "maas_inference_model_load_seconds",
    "From the start of a replica's load (download included) to READY",
    buckets=(0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300),
)
# How long an unloaded model's processes may take to leave before they are killed; a replaced
# revision's in-flight requests get their execution limit on top.
UNLOAD_GRACE_SECONDS = 2.0
# The least time between two reloads of a model whose processes died.
REVIVE_PAUSE_SECONDS = 10.0
# A node where a revision failed to load is not tried again for it before this.
RETRY_NODE_SECONDS = 30.0
# How often a PENDING deployment looks for room again.
PENDING_RETRY_SECONDS = 2.0


def triton_model_name(deployment_id: str) -> str:
    """A fresh Triton model name for one revision of a deployment."""
    return f"m_{deployment_id}_{uuid.uuid4().hex[:8]}"


def canary_revision(deployment: Deployment, canary: Canary) -> Deployment:
    """The canary seen as a revision of the deployment, to load it as such."""
    return deployment.replace(
        resolved_version=canary.version,
        sha256=canary.sha256,
        format=canary.format,
        triton_model=canary.triton_model,
        tier=canary.tier,
        canary=None,
    )


def wanted_replicas(deployment: Deployment) -> int:
    """Replicas the deployment should have now: the autoscaler's wish, within its bounds."""
    return max(deployment.min_replicas, min(deployment.desired_replicas, deployment.max_replicas))


class Converger:
    def __init__(
        self,
        *,
        store: DeploymentStore,
        routes: RouteTable,
        artifacts: ArtifactCache,
        nodes: NodeSet,
        gpu_available: bool,
        load_timeout: float,
        load_concurrency: int,
        drain_seconds: float,
        execution_limit: int,
    ) -> None:
        self.store = store
        self.routes = routes
        self.artifacts = artifacts
        self.nodes = nodes
        self.gpu_available = gpu_available
        self.load_timeout = load_timeout
        # How long a replaced revision stays loaded after routes stopped naming it: time for
        # the gateway to hear of the switch and for requests already routed to reach Triton.
        self.drain_seconds = drain_seconds
        # Seconds one request may run in a model, for deployments that set none of their own.
        self.execution_limit = execution_limit
        # Per node: each python-backend model starts a process and imports torch.
        self._load_slots = {node.name: asyncio.Semaphore(load_concurrency) for node in nodes}
        # Bumped on every change to a deployment, so that a load finishing late cannot
        # overwrite what a newer change decided.
        self._generations: dict[str, int] = {}
        # Deployments whose new revision is being placed and loaded: fill() leaves them alone.
        self._rolling: dict[str, int] = {}
        self._model_locks: dict[tuple[str, str], asyncio.Lock] = {}
        # (Triton model, node) -> when it was last reloaded because its processes had died.
        self._revived: dict[tuple[str, str], float] = {}
        # (Triton model, node) -> when a load there failed.
        self._failed_on: dict[tuple[str, str], float] = {}
        self._pending_tried: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()

    # -- start-up, nodes coming and going, shutdown ---------------------------------------------

    async def restore(self) -> None:
        """Fill the routing table from the table before the server takes requests, and clear
        what earlier runs left on disk (nothing can be downloading or writing yet)."""
        deployments = await asyncio.to_thread(self.store.all)
        for deployment in deployments:
            self.routes.add(deployment)
        for node in self.nodes:
            await asyncio.to_thread(node.repository.clear_staging)
        await asyncio.to_thread(self.artifacts.prune, {d.sha256 for d in deployments})

    async def reconcile(self) -> None:
        """Every node brought to the table at once (start-up, or after all restarted)."""
        for node in self.nodes:
            await self.node_up(node)
        await self.start()

    async def start(self) -> None:
        """Once the nodes are up: load every deployment that no node already serves."""
        for route in self.routes.all():
            deployment = route.deployment
            if route.serving is None and wanted_replicas(deployment) == 0:
                route.serve(deployment)  # nothing to load until a request wakes it
                await self._set_state(route, SCALED_TO_ZERO, "scaled to zero while idle; the next request loads it")
            elif route.serving is None or route.serving.triton_model != deployment.triton_model:
                if deployment.state != FAILED or route.serving is None:
                    deployment = await self._set_state(route, LOADING, "loading into the model server")
                    self.converge_later(deployment)
            canary = deployment.canary
            if canary is not None and canary.state != FAILED and not route.replicas_of(canary.triton_model):
                route.canary = None
                self.converge_canary_later(deployment, canary)
        self.routes.changed()
        await self.fill()  # deployments still serving elsewhere get back the replicas they lost
        log.info("deployments restored", extra={"deployments": len(self.routes.all()), "nodes": len(self.nodes)})

    async def node_up(self, node: Node) -> None:
        """A node (re)started or answers again: keep what it holds that a deployment is missing
        (so nothing loads twice), unload the rest, and take it into placement."""
        owners = self._owners()
        loaded = await node.triton.loaded_models()
        kept: set[str] = set()
        for triton_model in sorted(loaded):
            route = owners.get(triton_model)
            if route is not None and (
                (triton_model, node.name) in route.replicas or await self._adopt(route, triton_model, node)
            ):
                kept.add(triton_model)
                continue
            log.info("unloading a model no replica wants", extra={"node": node.name, "triton_model": triton_model})
            await self._unload(triton_model, node, UNLOAD_GRACE_SECONDS)
        wanted_files = set(owners) | kept
        for stray in sorted(await asyncio.to_thread(node.repository.names) - wanted_files):
            await asyncio.to_thread(node.repository.remove, stray)
        await asyncio.to_thread(node.read_gpus)
        self.nodes.mark(node, NODE_READY)
        self._pending_tried.clear()  # there may be room now: PENDING deployments look again
        self.routes.changed()

    async def capacity_changed(self) -> None:
        """A node was drained or resumed: act on it now rather than at the next round."""
        self._pending_tried.clear()
        await self.fill()

    async def _adopt(self, route: Route, triton_model: str, node: Node) -> bool:
        """Take a model a node already serves as a replica, when its deployment wants one."""
        deployment = route.deployment
        canary = deployment.canary
        is_canary = canary is not None and canary.triton_model == triton_model
        serving = route.serving or deployment
        if not is_canary and triton_model != serving.triton_model:
            return False
        have = len(route.replicas_of(triton_model))
        if have >= (1 if is_canary else wanted_replicas(deployment)) or not await node.triton.is_ready(triton_model):
            return False
        version = canary.version if is_canary and canary else serving.resolved_version
        route.add_replica(Replica(triton_model, node.name, version, READY, canary=is_canary))
        if is_canary and canary is not None:
            route.canary = canary.replace(state=READY)
        elif route.serving is None:
            route.serve(await self._set_state(route, READY, ""))
        log.info("adopted a replica the node already serves", extra={"node": node.name, "deployment": deployment.name})
        return True

    async def node_down(self, node: Node) -> None:
        """A node died or stopped answering: its replicas leave the routes now; fill() places
        them elsewhere."""
        self.nodes.mark(node, DOWN, "not answering; its replicas were moved to other nodes")
        for route in self.routes.all():
            lost = [key for key in route.replicas if key[1] == node.name]
            for key in lost:
                del route.replicas[key]
            if lost and route.serving is not None and not route.ready and route.deployment.state == READY:
                await self._set_state(route, LOADING, f"reloading: node {node.name} went down with its last ready replica")
        self.routes.changed()

    async def triton_down(self) -> None:
        """Every node went away (tests of a whole-fleet restart)."""
        for node in self.nodes:
            await self.node_down(node)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- what the deployments ask for -----------------------------------------------------------

    def converge_later(self, deployment: Deployment) -> None:
        """Place and load this revision in the background; supersedes earlier ones."""
        generation = self.supersede(deployment.id)
        self._rolling[deployment.id] = generation
        self.spawn(self._converge(deployment, generation))

    def converge_canary_later(self, deployment: Deployment, canary: Canary) -> None:
        self.spawn(self._converge_canary(deployment, canary))

    def drain_later(self, route: Route | None, replaced: Deployment) -> None:
        """A revision routes no longer name: its replicas leave the route now, and are unloaded
        once requests on their way have arrived."""
        if route is not None:
            for replica in route.replicas_of(replaced.triton_model):
                route.drop_replica(replica.triton_model, replica.node)
        self.spawn(self._drain(replaced))

    def supersede(self, deployment_id: str) -> int:
        """A new generation of the deployment: loads in flight for older ones come to nothing."""
        self._generations[deployment_id] = self._generations.get(deployment_id, 0) + 1
        self._rolling.pop(deployment_id, None)
        return self._generations[deployment_id]

    async def retire(self, deployment: Deployment, triton_models: set[str]) -> None:
        """A deleted deployment: nothing in flight may finish, and its models go now."""
        self.supersede(deployment.id)
        for triton_model in sorted(triton_models):
            await self._unload_everywhere(triton_model, UNLOAD_GRACE_SECONDS)
        self._generations.pop(deployment.id, None)

    def limit_of(self, deployment: Deployment) -> int:
        return deployment.execution_limit_seconds or self.execution_limit

    # -- loading a new revision -----------------------------------------------------------------

    async def _converge(self, deployment: Deployment, generation: int) -> None:
        try:
            await self._roll_out(deployment, generation)
        finally:
            if self._rolling.get(deployment.id) == generation:
                del self._rolling[deployment.id]

    async def _roll_out(self, deployment: Deployment, generation: int) -> None:
        """Place the revision's replicas, load them, and switch the route to it once at least
        one is ready; record READY, PENDING (no room) or FAILED."""
        route = self.routes.get(deployment.tenant, deployment.name)
        if route is None or self._generations.get(deployment.id) != generation:
            return
        want = wanted_replicas(deployment)
        if want == 0:
            self._switch(route, await self._set_state(route, SCALED_TO_ZERO, "scaled to zero while idle"))
            return
        nodes, short = self._place(route, deployment, want)
        if len(nodes) < max(1, min(want, deployment.min_replicas)):
            self._pending_tried[deployment.id] = time.monotonic()
            await self._set_state(route, PENDING, f"waiting for room for {want} replica(s): {short}")
            return
        started = time.perf_counter()
        for node in nodes:
            route.add_replica(Replica(deployment.triton_model, node.name, deployment.resolved_version, LOADING))
        self.routes.changed()
        outcomes = await asyncio.gather(*(self._load_replica(deployment, node) for node in nodes))
        failures = [(node, error) for node, error in zip(nodes, outcomes, strict=True) if error is not None]
        for node, _ in failures:
            route.drop_replica(deployment.triton_model, node.name)
        ready = [node for node, error in zip(nodes, outcomes, strict=True) if error is None]
        if self._generations.get(deployment.id) != generation or self.routes.get(deployment.tenant, deployment.name) is not route:
            # Superseded or deleted while loading: nothing will ever route to this revision.
            for node in ready:
                route.drop_replica(deployment.triton_model, node.name)
                await self._unload(deployment.triton_model, node, UNLOAD_GRACE_SECONDS)
            self.routes.changed()
            return
        if not ready:
            await self._load_failed(route, deployment, generation, failures[0][1])
            return
        message = ""
        if len(ready) < want:
            reasons = short or "; ".join(self._reason(error, deployment) for _, error in failures)
            message = f"{len(ready)} of {want} replicas ready: {reasons}"
        for node in ready:
            route.add_replica(Replica(deployment.triton_model, node.name, deployment.resolved_version, READY))
        self._switch(route, await self._set_state(route, READY, message))
        seconds = time.perf_counter() - started
        LOAD_SECONDS.observe(seconds)
        log.info(
            "deployment ready",
            extra={
                "deployment": deployment.name,
                "version": deployment.resolved_version,
                "replicas": len(ready),
                "seconds": round(seconds, 2),
            },
        )

    def _switch(self, route: Route, revision: Deployment) -> None:
        """Requests go to `revision` from now on; the revision it replaces drains."""
        replaced = route.serving
        route.serve(revision)
        self.routes.changed()
        if replaced is not None and replaced.triton_model != revision.triton_model:
            self.drain_later(route, replaced)
            self.routes.changed()

    async def _load_replica(self, revision: Deployment, node: Node) -> BaseException | None:
        """Load one replica; the error, or None once it is ready."""
        async with self._load_slots[node.name], self._model_lock(revision.triton_model, node.name):
            try:
                await self._load_on(revision, node)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed_on[(revision.triton_model, node.name)] = time.monotonic()
                log.warning(
                    "replica failed to load",
                    extra={"deployment": revision.name, "node": node.name, "reason": str(exc)[:500]},
                )
                return exc
        return None

    async def _load_on(self, revision: Deployment, node: Node) -> None:
        """Download, write the model directory and load it on the node; the caller holds the
        model's lock there. Raises what went wrong."""
        try:
            artifact = await self.artifacts.fetch(
                revision.tenant, revision.model, revision.resolved_version, revision.sha256
            )
            changed = await asyncio.to_thread(node.repository.write, self._model_spec(revision, node), artifact)
            if changed or not await node.triton.is_ready(revision.triton_model):
                await asyncio.wait_for(
                    node.triton.load(revision.triton_model, self.load_timeout), self.load_timeout + 5
                )
            if not await node.triton.is_ready(revision.triton_model):
                raise ModelLoadError("the model server reports the model not ready after loading it")
        except (asyncio.CancelledError, MaasError, ModelLoadError, OSError):
            raise
        except TimeoutError:
            raise TimeoutError(f"the model did not load within {self.load_timeout:.0f} s") from None
        except Exception:
            log.exception("unexpected failure loading a model", extra={"deployment": revision.name})
            raise

    async def _load_failed(self, route: Route, deployment: Deployment, generation: int, exc: BaseException) -> None:
        reason = self._reason(exc, deployment)
        # A failed reload leaves the previous revision serving.
        serving = route.serving
        still_serving = route.ready
        message = f"version {deployment.resolved_version} failed to load: {reason}"
        if still_serving and serving is not None:
            message += f"; version {serving.resolved_version} keeps serving"
        log.warning("deployment failed", extra={"deployment": deployment.name, "reason": reason})
        if self._generations.get(deployment.id) != generation:
            return
        await self._set_state(route, FAILED, message)
        if not still_serving:
            route.stop_serving()
        self.routes.changed()

    async def _set_state(self, route: Route, state: str, message: str) -> Deployment:
        """Record a deployment's state; the route follows the row (unchanged when deleted)."""
        stored = await asyncio.to_thread(self.store.set_state, route.deployment.id, state, message)
        if stored is not None:
            route.deployment = stored
        return route.deployment

    # -- canaries -------------------------------------------------------------------------------

    async def _converge_canary(self, deployment: Deployment, canary: Canary) -> None:
        """Load a canary's replica and let it take its share, or record why it could not load."""
        route = self.routes.get(deployment.tenant, deployment.name)
        if route is None:
            return
        revision = canary_revision(deployment, canary)
        nodes, short = self._place(route, revision, 1)
        error: BaseException | None = ModelLoadError(f"no node has room for it: {short}")
        if nodes:
            node = nodes[0]
            route.add_replica(Replica(canary.triton_model, node.name, canary.version, LOADING, canary=True))
            self.routes.changed()
            error = await self._load_replica(revision, node)
            if error is not None:
                route.drop_replica(canary.triton_model, node.name)
        if error is not None:
            reason = self._reason(error, deployment)
            log.warning("canary failed", extra={"deployment": deployment.name, "reason": reason})
            await self._unload_everywhere(canary.triton_model, UNLOAD_GRACE_SECONDS)
            stored = await asyncio.to_thread(
                self.store.set_canary_state,
                deployment.id,
                canary.triton_model,
                FAILED,
                f"version {canary.version} failed to load: {reason}",
            )
            self._take_canary(route, stored, serving=False)
            return
        stored = await asyncio.to_thread(self.store.set_canary_state, deployment.id, canary.triton_model, READY, "")
        if stored is None or self.routes.get(deployment.tenant, deployment.name) is not route:
            # Rolled back, replaced or deleted meanwhile: nothing will route to it.
            route.drop_replica(canary.triton_model, nodes[0].name)
            await self._unload_everywhere(canary.triton_model, UNLOAD_GRACE_SECONDS)
            return
        route.add_replica(Replica(canary.triton_model, nodes[0].name, canary.version, READY, canary=True))
        self._take_canary(route, stored, serving=True)
        log.info("canary ready", extra={"deployment": deployment.name, "version": canary.version})

    def _take_canary(self, route: Route, stored: Deployment | None, *, serving: bool) -> None:
        if stored is None:
            return
        # Keep what changed on the main revision meanwhile; take the canary's new state.
        route.deployment = route.deployment.replace(canary=stored.canary)
        route.canary = stored.canary if serving else None
        self.routes.changed()

    # -- keeping every deployment at the replicas it wants --------------------------------------

    async def fill(self) -> None:
        """One round over every deployment: place the replicas it is missing (fairly, when room
        is short), move those on draining nodes once their replacements are ready, remove those
        beyond what it wants, and retry PENDING ones."""
        demands: list[placement.Demand] = []
        for route in self.routes.all():
            deployment = route.deployment
            if deployment.id in self._rolling:
                continue
            if deployment.state == PENDING:
                if time.monotonic() - self._pending_tried.get(deployment.id, 0) >= PENDING_RETRY_SECONDS:
                    self.converge_later(deployment)
                continue
            serving = route.serving
            if serving is None:
                continue
            want = wanted_replicas(deployment)
            missing = self._trim(route, serving.triton_model, want)
            if missing > 0:
                demands.append(self._demand(route, serving, missing))
            canary = route.canary
            if canary is not None and not route.replicas_of(canary.triton_model):
                route.canary = None  # its node is gone: no share for it until it is back
                self.converge_canary_later(deployment, deployment.canary or canary)
        if not demands:
            return
        result = placement.plan(demands, self._rooms(), self._replicas_by_tenant())
        for deployment_id, node_name in result.placed:
            route = self._route_by_id(deployment_id)
            node = self.nodes.get(node_name)
            if route is not None and route.serving is not None and node is not None:
                revision = route.serving
                route.add_replica(Replica(revision.triton_model, node.name, revision.resolved_version, LOADING))
                self.spawn(self._add_replica(route, revision, node))
        for deployment_id, why in result.short.items():
            route = self._route_by_id(deployment_id)
            if route is not None and route.shortfall != why:
                route.shortfall = why
                log.warning("deployment is short of replicas", extra={"deployment": route.deployment.name, "reason": why})
        self.routes.changed()

    def _trim(self, route: Route, triton_model: str, want: int) -> int:
        """Remove the replicas the deployment no longer needs; returns how many it is missing.
        A replica on a draining node goes once enough others are ready to take its place."""
        current = route.replicas_of(triton_model)
        leaving = [r for r in current if self._node_state(r.node) != NODE_READY]
        staying = [r for r in current if r not in leaving]
        # Beyond what it wants: the loading ones go first.
        extra = len(staying) - want
        for replica in sorted(staying, key=lambda r: (r.state == READY, r.node))[: max(0, extra)]:
            self._remove(route, replica)
            staying.remove(replica)
        ready_staying = sum(r.state == READY for r in staying)
        for replica in leaving:
            if ready_staying >= want:
                self._remove(route, replica)
        if not route.replicas_of(triton_model) and route.deployment.state == READY and want == 0:
            self.spawn(self._set_state_and_signal(route, SCALED_TO_ZERO, "scaled to zero while idle; the next request loads it"))
        missing = want - len(staying)
        if missing <= 0 and route.shortfall:
            route.shortfall = ""
        return missing

    def _demand(self, route: Route, serving: Deployment, missing: int) -> placement.Demand:
        have = len([r for r in route.replicas_of(serving.triton_model) if self._node_state(r.node) == NODE_READY])
        return placement.Demand(
            deployment_id=route.deployment.id,
            tenant=route.deployment.tenant,
            missing=missing,
            below_min=max(0, route.deployment.min_replicas - have),
            memory_mb=replica_memory_mb(serving),
            order=route.deployment.create_time.timestamp(),
        )

    async def _add_replica(self, route: Route, revision: Deployment, node: Node) -> None:
        """Load one more replica of the serving revision on `node`, and route to it once ready."""
        started = time.perf_counter()
        error = await self._load_replica(revision, node)
        current = self.routes.get(revision.tenant, revision.name)
        still_wanted = (
            current is route
            and route.serving is not None
            and route.serving.triton_model == revision.triton_model
            and (revision.triton_model, node.name) in route.replicas
            and node.state != DOWN
        )
        if error is not None or not still_wanted:
            route.drop_replica(revision.triton_model, node.name)
            if error is None:
                await self._unload(revision.triton_model, node, UNLOAD_GRACE_SECONDS)
            else:
                route.shortfall = f"loading on node {node.name} failed: {self._reason(error, revision)}"
            self.routes.changed()
            return
        route.add_replica(Replica(revision.triton_model, node.name, revision.resolved_version, READY))
        if route.deployment.state != READY:
            await self._set_state(route, READY, "")
        self.routes.changed()
        LOAD_SECONDS.observe(time.perf_counter() - started)
        log.info("replica ready", extra={"deployment": revision.name, "node": node.name})

    def _remove(self, route: Route, replica: Replica) -> None:
        """Take a replica out of the route now, and unload it once requests on their way to it
        have arrived."""
        route.drop_replica(replica.triton_model, replica.node)
        node = self.nodes.get(replica.node)
        if node is not None:
            self.spawn(self._drain_replica(replica.triton_model, node, route.served))

    async def _drain_replica(self, triton_model: str, node: Node, revision: Deployment) -> None:
        await asyncio.sleep(self.drain_seconds)
        await self._unload(triton_model, node, UNLOAD_GRACE_SECONDS + self.limit_of(revision), unless_wanted=True)

    async def _set_state_and_signal(self, route: Route, state: str, message: str) -> None:
        await self._set_state(route, state, message)
        self.routes.changed()

    def _place(self, route: Route, revision: Deployment, count: int) -> tuple[list[Node], str]:
        """Up to `count` nodes for new replicas of a revision: distinct, with room, not where it
        failed lately; and why there are fewer."""
        now = time.monotonic()
        rooms = [
            room
            for room in self._rooms()
            if now - self._failed_on.get((revision.triton_model, room.node), -RETRY_NODE_SECONDS) >= RETRY_NODE_SECONDS
        ]
        for room in rooms:
            room.holds = {d for d in room.holds if d != route.deployment.id}
            if (revision.triton_model, room.node) in route.replicas:
                room.holds.add(route.deployment.id)
        demand = placement.Demand(route.deployment.id, route.deployment.tenant, count, count, replica_memory_mb(revision))
        result = placement.plan([demand], rooms, {})
        nodes = [self.nodes.get(name) for _, name in result.placed]
        return [node for node in nodes if node is not None], result.short.get(route.deployment.id, "")

    def _rooms(self) -> list[placement.Room]:
        """What each placeable node has free, counting every replica the routes place on it."""
        rooms = {
            node.name: placement.Room(node.name, node.capacity.model_slots, node.capacity.memory_mb)
            for node in self.nodes.placeable()
        }
        for route in self.routes.all():
            for replica in route.replicas.values():
                room = rooms.get(replica.node)
                if room is not None:
                    room.take(route.deployment.id, replica_memory_mb(route.served))
        return list(rooms.values())

    def _replicas_by_tenant(self) -> dict[str, int]:
        return dict(Counter(route.deployment.tenant for route in self.routes.all() for _ in route.replicas))

    def _route_by_id(self, deployment_id: str) -> Route | None:
        return next((route for route in self.routes.all() if route.deployment.id == deployment_id), None)

    def _node_state(self, name: str) -> str:
        node = self.nodes.get(name)
        return node.state if node is not None else DOWN

    def _owners(self) -> dict[str, Route]:
        """Every Triton model some deployment wants, and its route."""
        owners: dict[str, Route] = {}
        for route in self.routes.all():
            models = {route.deployment.triton_model, *(r.triton_model for r in route.replicas.values())}
            if route.serving is not None:
                models.add(route.serving.triton_model)
            if route.deployment.canary is not None:
                models.add(route.deployment.canary.triton_model)
            owners.update(dict.fromkeys(models, route))
        return owners

    def _model_spec(self, deployment: Deployment, node: Node) -> ModelSpec:
        embedded = sum(other.embedded for other in self.nodes)
        return ModelSpec(
            triton_model=deployment.triton_model,
            format=deployment.format,
            sha256=deployment.sha256,
            signature=deployment.signature,
            max_batch_size=deployment.max_batch_size,
            instances=deployment.instances,
            device=deployment.device,
            task=deployment.task,
            runner_metadata=deployment.runner_metadata,
            execution_limit_seconds=self.limit_of(deployment),
            on_gpu=deployment.device == "GPU" or (deployment.device == "AUTO" and self.gpu_available),
            nodes_sharing_host=embedded if node.embedded else 1,
            precision=deployment.precision,
        )

    def _reason(self, exc: BaseException, deployment: Deployment) -> str:
        roots = [node.repository.root for node in self.nodes]
        return public_message(str(exc) or type(exc).__name__, deployment.name, roots)

    # -- unloading ----------------------------------------------------------------------------

    async def _drain(self, replaced: Deployment) -> None:
        """Unload a replaced revision everywhere once nothing can still be on its way to it.
        Triton's own unload then waits for the requests it already holds."""
        await asyncio.sleep(self.drain_seconds)
        await self._unload_everywhere(
            replaced.triton_model, UNLOAD_GRACE_SECONDS + self.limit_of(replaced), unless_wanted=True
        )
        log.info(
            "replaced revision unloaded",
            extra={"deployment": replaced.name, "version": replaced.resolved_version},
        )

    async def _unload_everywhere(self, triton_model: str, grace: float, unless_wanted: bool = False) -> None:
        await asyncio.gather(
            *(self._unload(triton_model, node, grace, unless_wanted) for node in self.nodes if node.state != DOWN)
        )

    async def _unload(self, triton_model: str, node: Node, grace: float, unless_wanted: bool = False) -> None:
        """Unload and remove a model from a node; waits for a load in flight there first. Its
        processes on this host get `grace` seconds to leave, then are killed: one stuck in a
        model call never would. `unless_wanted`: a delayed unload (a drain) that leaves the
        model where a replica took it back meanwhile (scaled in, then out again)."""
        key = (triton_model, node.name)
        async with self._model_lock(triton_model, node.name):
            if unless_wanted and any(key in route.replicas for route in self.routes.all()):
                return
            await node.triton.unload(triton_model)
            if node.embedded:
                self.spawn(reap_stubs(node.repository.path(triton_model), grace))
            self._revived.pop(key, None)
            self._failed_on.pop(key, None)
            await asyncio.to_thread(node.repository.remove, triton_model)
        self._model_locks.pop(key, None)

    def _model_lock(self, triton_model: str, node: str) -> asyncio.Lock:
        return self._model_locks.setdefault((triton_model, node), asyncio.Lock())

    # -- reviving models whose processes died -----------------------------------------------

    async def revive_models(self) -> None:
        """Reload every ready replica on this host that has lost its stub processes: Triton does
        not restart a stub that died (killed at its execution limit, or crashed), and answers
        every later request with "Stub process ... is not healthy"."""
        now = time.monotonic()
        for node in self.nodes:
            if not node.embedded or node.state == DOWN:
                continue
            alive = await asyncio.to_thread(stubs_under, node.repository.root)
            for route in self.routes.all():
                for replica in route.replicas.values():
                    key = (replica.triton_model, node.name)
                    if replica.node != node.name or replica.state != READY or replica.triton_model in alive:
                        continue
                    if self._model_lock(*key).locked():
                        continue  # being loaded or unloaded right now
                    if now - self._revived.get(key, -REVIVE_PAUSE_SECONDS) < REVIVE_PAUSE_SECONDS:
                        continue  # a model that dies again at once is not reloaded in a tight loop
                    self._revived[key] = now
                    self.spawn(self._revive(replica.triton_model, node))

    async def _revive(self, triton_model: str, node: Node) -> None:
        async with self._model_lock(triton_model, node.name):
            if triton_model in await asyncio.to_thread(stubs_under, node.repository.root):
                return
            if not await node.triton.is_ready(triton_model):
                return  # unloaded meanwhile, or the node is restarting: node_up() handles it
            log.warning("a model's processes died; reloading it", extra={"triton_model": triton_model, "node": node.name})
            # Triton reloads only a model whose files changed since it loaded them.
            await asyncio.to_thread(node.repository.touch, triton_model)
            try:
                await asyncio.wait_for(node.triton.load(triton_model, self.load_timeout), self.load_timeout + 5)
            except (ModelLoadError, TimeoutError) as exc:
                log.warning("reloading a model failed", extra={"triton_model": triton_model, "reason": str(exc)})

