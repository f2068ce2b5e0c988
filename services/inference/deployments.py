"""Deployments: the API over the desired state in the table (create, get, list, update,
delete, with the tenant's caps), and the parts that act on it, each in its own module:

- nodes.NodeSet: the Triton servers replicas are placed on;
- routes.RouteTable: every deployment as the data path sees it, and a signal on each change;
- converge.Converger: the nodes brought to the table in the background (placement.py decides
  where replicas go);
- autoscaler.Autoscaler: replicas following the load;
- rollouts.Rollouts: canaries and alias-following deployments;
- metering.ReplicaMeter: the replica-seconds each tenant's deployments hold, for billing;
- serving.Serving: the service's own Predict, Embed and Generate.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Collection
from pathlib import Path

from services.common.errors import AlreadyExists, InvalidArgument, NotFound, not_found
from services.common.periodic import Periodic
from services.common.validation import Page, check_name
from services.inference.artifacts import ArtifactCache, Registry
from services.inference.autoscaler import Autoscaler, Policy
from services.inference.caps import TenantCaps
from services.inference.converge import Converger, triton_model_name
from services.inference.metering import ReplicaMeter
from services.inference.nodes import NodeSet
from services.inference.rollouts import Rollouts
from services.inference.routes import RouteTable
from services.inference.serving import Serving
from services.inference.spec import (
    DEFAULT_INSTANCES,
    DEFAULT_MAX_BATCH_SIZE,
    FORMATS,
    MAX_BATCH_SIZE,
    MAX_INSTANCES,
    DeploymentSpec,
    check_target,
    checked_device,
    checked_execution_limit,
    checked_range,
    checked_replicas,
    deployable_version,
    serving_fields,
)
from services.inference.store import (
    FAILED,
    LOADING,
    Deployment,
    DeploymentStore,
    ReplicaUsageStore,
    ScalingEvent,
    now,
)

# Scaling defaults for callers that set none (the server passes its settings).
DEFAULT_SCALING = Policy(target_in_flight=4, up_window=5, down_window=30, idle_to_zero=300)
# How often each node's liveness is noted and the nodes table written.
NODE_CONTACT_SECONDS = 2.0

UPDATABLE_FIELDS = frozenset(
    {
        "version",
        "alias",
        "instances",
        "max_batch_size",
        "device",
        "cacheable",
        "execution_limit_seconds",
        "min_replicas",
        "max_replicas",
        "target_in_flight",
    }
)
REPLICA_FIELDS = frozenset({"min_replicas", "max_replicas", "target_in_flight"})
# Fields whose change needs a new revision loaded into Triton.
RELOAD_FIELDS = ("resolved_version", "sha256", "instances", "max_batch_size", "device", "execution_limit_seconds")


class Deployments:
    def __init__(
        self,
        *,
        store: DeploymentStore,
        registry: Registry,
        artifacts: ArtifactCache,
        nodes: NodeSet,
        gpu_available: bool,
        load_timeout: float,
        load_concurrency: int,
        predict_timeout: float,
        cold_start_wait: float = 10.0,
        drain_seconds: float = 2.0,
        alias_poll_interval: float = 0.0,
        canary_check_interval: float = 0.0,
        stub_check_interval: float = 0.0,
        execution_limit: int = 30,
        caps: TenantCaps | None = None,
        scaling: Policy | None = None,
        fill_interval: float = 0.0,
        autoscale_interval: float = 0.0,
        replica_meter_interval: float = 0.0,
        leading: Callable[[], bool] = lambda: True,
    ) -> None:
        """`leading`: whether this process leads now (only the leader meters replica-seconds)."""
        self.store = store
        self.registry = registry
        self.gpu_available = gpu_available
        self.caps = caps or TenantCaps()  # none: no caps
        # Held while a tenant's deployments are checked against its caps and written.
        self._tenant_locks: dict[str, asyncio.Lock] = {}
        self.routes = RouteTable()
        self.converger = Converger(
            store=store,
            routes=self.routes,
            artifacts=artifacts,
            nodes=nodes,
            gpu_available=gpu_available,
            load_timeout=load_timeout,
            load_concurrency=load_concurrency,
            drain_seconds=drain_seconds,
            execution_limit=execution_limit,
        )
        self.nodes = nodes
        self.rollouts = Rollouts(self, self.routes, self.converger, nodes)
        self.autoscaler = Autoscaler(store, self.routes, nodes, scaling or DEFAULT_SCALING, self.converger.fill)
        self.serving = Serving(self.routes, nodes, predict_timeout, cold_start_wait, self.autoscaler.wake)
        self.replica_meter = ReplicaMeter(
            self.routes, ReplicaUsageStore(store.engine), replica_meter_interval, leading=leading
        )
        # Background rounds, each started only when its interval is set.
        self._rounds = [
            Periodic("follow-aliases", self.rollouts.follow_aliases, alias_poll_interval),
            Periodic("check-canaries", self.rollouts.check_canaries, canary_check_interval),
            Periodic("revive-models", self.converger.revive_models, stub_check_interval),
            Periodic("fill-replicas", self.converger.fill, fill_interval),
            Periodic("autoscale", self.autoscaler.round, autoscale_interval),
            Periodic("node-contact", nodes.contact, NODE_CONTACT_SECONDS if fill_interval else 0.0),
            Periodic("meter-replicas", self.replica_meter.tick, replica_meter_interval),
        ]

    def start_watching(self) -> None:
        """Poll the registry for moved aliases, Triton for canary errors and this host for model
        processes that died, in the background."""
        for periodic in self._rounds:
            periodic.start()

    async def close(self) -> None:
        for periodic in self._rounds:
            await periodic.close()
        await self.replica_meter.close()
        await self.converger.close()

    # -- the API ------------------------------------------------------------------------------

    async def create(self, tenant: str, spec: DeploymentSpec, replica_cap: int = 0) -> Deployment:
        """`replica_cap`: the tenant's own cap on replicas (its quota), 0 for the service's."""
        check_name("deployment", spec.name)
        check_name("model", spec.model)
        if (spec.version is None) == (spec.alias is None):
            raise InvalidArgument("set exactly one of version and alias: what the deployment serves")
        check_target(spec.version, spec.alias)
        instances = checked_range("instances", spec.instances or DEFAULT_INSTANCES, MAX_INSTANCES)
        max_batch_size = checked_range(
            "max_batch_size", spec.max_batch_size or DEFAULT_MAX_BATCH_SIZE, MAX_BATCH_SIZE
        )
        device = checked_device(spec.device, self.gpu_available)
        execution_limit = checked_execution_limit(spec.execution_limit_seconds)
        replicas = checked_replicas(spec.min_replicas, spec.max_replicas, spec.target_in_flight)
        if await asyncio.to_thread(self.store.get, tenant, spec.name):
            raise AlreadyExists(f"deployment {spec.name!r} already exists")
        version = await self.deployable_version(tenant, spec.model, spec.version, spec.alias)
        deployment_id = uuid.uuid4().hex
        created = now()
        deployment = Deployment(
            id=deployment_id,
            tenant=tenant,
            name=spec.name,
            model=spec.model,
            version=spec.version,
            alias=spec.alias,
            resolved_version=version.version,
            instances=instances,
            max_batch_size=max_batch_size,
            device=device,
            cacheable=spec.cacheable,
            state=LOADING,
            message=f"loading version {version.version}",
            triton_model=triton_model_name(deployment_id),
            sha256=version.sha256,
            format=FORMATS[version.format],
            signature=version.signature,
            create_time=created,
            update_time=created,
            execution_limit_seconds=execution_limit,
            min_replicas=replicas.min_replicas,
            max_replicas=replicas.max_replicas,
            # Loaded once even when it may scale to zero: the caller sees it work, then it idles.
            desired_replicas=max(1, replicas.min_replicas),
            target_in_flight=replicas.target_in_flight,
            **serving_fields(version),
        )
        async with self._tenant_lock(tenant):
            await self._check_caps(deployment, replica_cap)
            await asyncio.to_thread(self.store.create, deployment)
        self.routes.put(deployment)
        self.routes.changed()
        self.converger.converge_later(deployment)
        return deployment

    async def get(self, tenant: str, name: str) -> Deployment:
        check_name("deployment", name)
        deployment = await asyncio.to_thread(self.store.get, tenant, name)
        if deployment is None:
            raise not_found("deployment", name, self.routes.names(tenant))
        return deployment

    async def list_page(self, tenant: str, page_size: int, page_token: str) -> tuple[list[Deployment], str]:
        page = Page.parse(page_size, page_token)
        rows = await asyncio.to_thread(self.store.list_page, tenant, page)
        if len(rows) > page.size:
            rows = rows[: page.size]
            return rows, Page.token_after(rows[-1].name)
        return rows, ""

    async def update(
        self, tenant: str, spec: DeploymentSpec, fields: Collection[str], replica_cap: int = 0
    ) -> Deployment:
        current = await self.get(tenant, spec.name)
        fields = set(fields)
        if not fields:
            raise InvalidArgument(
                f"update_mask is required: name the fields to change, from {sorted(UPDATABLE_FIELDS)}"
            )
        if unknown := fields - UPDATABLE_FIELDS:
            raise InvalidArgument(
                f"cannot update {sorted(unknown)}; updatable fields are {sorted(UPDATABLE_FIELDS)}"
            )
        if {"version", "alias"} <= fields:
            raise InvalidArgument("update either version or alias, not both")
        changes: dict = {}
        if "instances" in fields:
            changes["instances"] = checked_range("instances", spec.instances or DEFAULT_INSTANCES, MAX_INSTANCES)
        if "max_batch_size" in fields:
            changes["max_batch_size"] = checked_range(
                "max_batch_size", spec.max_batch_size or DEFAULT_MAX_BATCH_SIZE, MAX_BATCH_SIZE
            )
        if "device" in fields:
            changes["device"] = checked_device(spec.device, self.gpu_available)
        if "cacheable" in fields:
            changes["cacheable"] = spec.cacheable
        if "execution_limit_seconds" in fields:
            changes["execution_limit_seconds"] = checked_execution_limit(spec.execution_limit_seconds)
        if fields & REPLICA_FIELDS:
            replicas = checked_replicas(
                spec.min_replicas if "min_replicas" in fields else current.min_replicas,
                spec.max_replicas if "max_replicas" in fields else current.max_replicas,
                spec.target_in_flight if "target_in_flight" in fields else current.target_in_flight,
            )
            changes.update(
                min_replicas=replicas.min_replicas,
                max_replicas=replicas.max_replicas,
                target_in_flight=replicas.target_in_flight,
                # The autoscaler goes on from within the new bounds.
                desired_replicas=max(replicas.min_replicas, min(current.desired_replicas, replicas.max_replicas)),
            )
        if fields & {"version", "alias"}:
            version, alias = (spec.version, None) if "version" in fields else (None, spec.alias)
            if version is None and not alias:
                raise InvalidArgument(f"set the new {'version' if 'version' in fields else 'alias'} to deploy")
            check_target(version, alias)
            found = await self.deployable_version(tenant, current.model, version, alias)
            changes.update(
                version=version,
                alias=alias,
                resolved_version=found.version,
                sha256=found.sha256,
                format=FORMATS[found.format],
                signature=found.signature,
                **serving_fields(found),
            )
        updated = current.replace(**changes, update_time=now())
        reload = current.state == FAILED or any(
            getattr(updated, field) != getattr(current, field) for field in RELOAD_FIELDS
        )
        if reload:
            route = self.routes.get(tenant, current.name)
            serving = route.serving if route else None
            message = f"loading version {updated.resolved_version}"
            if serving:
                message += f"; version {serving.resolved_version} serves until it is ready"
            # Each revision is its own Triton model, so that the old one serves, untouched,
            # until the new one is ready and routes have moved to it.
            updated = updated.replace(state=LOADING, message=message, triton_model=triton_model_name(current.id))
        updated = await self.save_within_caps(updated, replica_cap)
        self.routes.add(updated).deployment = updated
        self.routes.changed()
        if reload:
            self.converger.converge_later(updated)
        return updated

    async def delete(self, tenant: str, name: str) -> None:
        check_name("deployment", name)
        deployment = await asyncio.to_thread(self.store.delete, tenant, name)
        if deployment is None:
            raise not_found("deployment", name, self.routes.names(tenant))
        route = self.routes.remove(tenant, name)
        self.routes.changed()
        triton_models = {deployment.triton_model}
        if route is not None and route.serving is not None:
            triton_models.add(route.serving.triton_model)
        if deployment.canary is not None:
            triton_models.add(deployment.canary.triton_model)
        if route is not None:
            triton_models.update(replica.triton_model for replica in route.replicas.values())
        await self.converger.retire(deployment, triton_models)
        self.rollouts.forget(deployment.id)
        self.autoscaler.forget(deployment.id)

    # -- for the other parts --------------------------------------------------------------------

    async def deployable_version(self, tenant: str, model: str, version: int | None, alias: str | None):
        return await deployable_version(self.registry, tenant, model, version, alias)

    async def save(self, deployment: Deployment) -> Deployment:
        if not await asyncio.to_thread(self.store.save, deployment):
            raise NotFound(f"deployment {deployment.name!r} not found")
        return deployment

    async def save_within_caps(self, deployment: Deployment, replica_cap: int = 0) -> Deployment:
        """Save a changed row of an existing deployment, unless the tenant's caps refuse it."""
        async with self._tenant_lock(deployment.tenant):
            await self._check_caps(deployment, replica_cap)
            return await self.save(deployment)

    async def _check_caps(self, candidate: Deployment, replica_cap: int) -> None:
        """The caller holds the tenant's lock, so that two writes cannot both pass the check."""
        others = await asyncio.to_thread(self.store.of_tenant, candidate.tenant)
        self.caps.check(candidate.tenant, others, candidate, replica_cap)

    async def scaling_events(self, deployment: Deployment) -> list[ScalingEvent]:
        return await asyncio.to_thread(self.store.scaling_events, deployment.id)

    def _tenant_lock(self, tenant: str) -> asyncio.Lock:
        return self._tenant_locks.setdefault(tenant, asyncio.Lock())


def gpu_on_this_host() -> bool:
    """An NVIDIA device node is present (cheaper than importing torch to ask CUDA)."""
    return any(Path("/dev").glob("nvidia[0-9]*"))
