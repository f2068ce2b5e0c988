"""Moving a deployment between versions while it serves: canaries (a second version taking a
share of the requests, promoted or rolled back, on its own when its error rate is too high) and
deployments that follow an alias (rolled when the alias moves)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from services.common.errors import FailedPrecondition, InvalidArgument, MaasError, NotFound
from services.inference.converge import Converger, canary_revision, triton_model_name
from services.inference.nodes import NodeSet
from services.inference.routes import RouteTable
from services.inference.spec import FORMATS, DeploymentSpec, check_target, checked_range, serving_fields
from services.inference.store import LOADING, READY, Canary, Deployment, now

if TYPE_CHECKING:
    from services.inference.deployments import Deployments

log = logging.getLogger(__name__)

# A canary is judged on its error rate only once a check window holds this many requests.
MIN_CANARY_REQUESTS = 10


class Rollouts:
    def __init__(self, deployments: Deployments, routes: RouteTable, converger: Converger, nodes: NodeSet) -> None:
        self.deployments = deployments
        self.routes = routes
        self.converger = converger
        self.nodes = nodes
        # Triton's (success, failure) counts per canary model at the last check.
        self._canary_counts: dict[str, tuple[int, int]] = {}
        # The version each alias-following deployment last failed to roll to, so that the
        # poller complains once, not every interval.
        self._refused_rolls: dict[str, int] = {}

    # -- canaries -------------------------------------------------------------------------------

    async def start_canary(
        self, tenant: str, name: str, version: int, weight: int, max_error_rate: float
    ) -> Deployment:
        """Load `version` beside the deployment's own and send it `weight` percent of requests;
        with the canary's own version again, change only its weight and error threshold."""
        current = await self.deployments.get(tenant, name)
        checked_range("weight_percent", weight, 99)
        if not 0 <= max_error_rate <= 1:
            raise InvalidArgument(f"max_error_rate must be between 0 and 1, got {max_error_rate}")
        if current.alias is not None:
            raise FailedPrecondition(
                f"deployment {name!r} follows alias {current.alias!r}, which decides its version: "
                f"move the alias to roll, or pin a version to run a canary (UpdateDeployment; "
                f"`maas deploy update {name} --version N`)"
            )
        route = self.routes.add(current)
        if current.canary is not None and current.canary.version == version:
            updated = await asyncio.to_thread(
                self.deployments.store.set_canary_weight, current.id, current.canary.triton_model, weight, max_error_rate
            )
            if updated is None or updated.canary is None:
                raise FailedPrecondition(f"the canary of {name!r} was rolled back or replaced meanwhile: start it again")
            # Keep what changed on the main revision meanwhile; take the canary as stored.
            route.deployment = route.deployment.replace(canary=updated.canary)
            if route.canary is not None:
                route.canary = updated.canary
            self.routes.changed()
            return updated
        check_target(version, None)
        if version == current.resolved_version:
            raise InvalidArgument(f"version {version} is what {name!r} serves already; canary another one")
        found = await self.deployments.deployable_version(tenant, current.model, version, None)
        if found.signature != current.signature:
            raise FailedPrecondition(
                f"version {version} has another signature than version {current.resolved_version}: "
                "a canary must take the same inputs and give the same outputs"
            )
        serving = serving_fields(found)
        if serving["runner_metadata"] != current.runner_metadata or serving["task"] != current.task:
            raise FailedPrecondition(
                f"version {version} serves another task or vocabulary than version "
                f"{current.resolved_version}: a canary must answer the same requests"
            )
        canary = Canary(
            version=version,
            weight=weight,
            max_error_rate=max_error_rate,
            state=LOADING,
            message=f"loading version {version}",
            triton_model=triton_model_name(current.id),
            sha256=found.sha256,
            format=FORMATS[found.format],
            tier=serving["tier"],
        )
        updated = await self.deployments.save_within_caps(current.replace(canary=canary, update_time=now()))
        route.deployment = updated
        replaced, route.canary = current.canary, None
        self.routes.changed()
        if replaced is not None:
            self.converger.drain_later(route, canary_revision(current, replaced))
        self.converger.converge_canary_later(updated, canary)
        return updated

    async def promote_canary(self, tenant: str, name: str) -> Deployment:
        """The canary's version becomes the deployment's: routes switch to the model already
        loaded, and the old version drains."""
        current = await self.deployments.get(tenant, name)
        canary = self._loaded_canary(current)
        route = self.routes.add(current)
        promoted = canary_revision(current, canary).replace(
            version=canary.version, state=READY, message="", update_time=now()
        )
        self.converger.supersede(current.id)  # a reload still in flight comes to nothing
        promoted = await self.deployments.save(promoted)
        replaced = route.serving
        route.serve(promoted)
        route.canary = None
        for replica in route.replicas_of(promoted.triton_model):
            replica.canary = False
        if replaced is not None and replaced.triton_model != promoted.triton_model:
            self.converger.drain_later(route, replaced)
        self.routes.changed()
        log.info("canary promoted", extra={"deployment": name, "version": canary.version})
        return promoted

    async def rollback_canary(self, tenant: str, name: str, reason: str = "") -> Deployment:
        """All requests back to the deployment's version; the canary drains and is unloaded."""
        current = await self.deployments.get(tenant, name)
        if current.canary is None:
            raise FailedPrecondition(f"deployment {name!r} has no canary to roll back")
        changes: dict = {"canary": None, "update_time": now()}
        if reason:
            changes["message"] = f"canary version {current.canary.version} rolled back: {reason}"
        updated = await self.deployments.save(current.replace(**changes))
        route = self.routes.get(tenant, name)
        if route is not None:
            route.deployment = updated
            route.canary = None
        self.routes.changed()
        self._canary_counts.pop(current.canary.triton_model, None)
        self.converger.drain_later(route, canary_revision(current, current.canary))
        log.info("canary rolled back", extra={"deployment": name, "reason": reason or "asked to"})
        return updated

    async def check_canaries(self) -> None:
        """Roll back every canary whose failed fraction of requests since the last check
        exceeds its max_error_rate (counted by Triton, whichever path the requests took)."""
        for route in self.routes.all():
            canary = route.canary
            if canary is None or canary.max_error_rate <= 0:
                continue
            succeeded, failed = await self.nodes.request_counts(canary.triton_model)
            before = self._canary_counts.get(canary.triton_model, (0, 0))
            self._canary_counts[canary.triton_model] = (succeeded, failed)
            new_failures = failed - before[1]
            total = succeeded - before[0] + new_failures
            if total < MIN_CANARY_REQUESTS or new_failures / total <= canary.max_error_rate:
                continue
            reason = (
                f"{new_failures} of its last {total} requests failed, "
                f"above the max_error_rate of {canary.max_error_rate:g}"
            )
            deployment = route.deployment
            with contextlib.suppress(NotFound, FailedPrecondition):  # deleted or rolled back meanwhile
                await self.rollback_canary(deployment.tenant, deployment.name, reason)

    def _loaded_canary(self, deployment: Deployment) -> Canary:
        canary = deployment.canary
        if canary is None:
            raise FailedPrecondition(f"deployment {deployment.name!r} has no canary to promote")
        route = self.routes.get(deployment.tenant, deployment.name)
        if canary.state != READY or route is None or route.canary is None:
            raise FailedPrecondition(
                f"canary version {canary.version} is {canary.state}: promote it once it is READY, "
                "or roll it back"
            )
        return canary

    # -- following aliases ----------------------------------------------------------------------

    async def follow_aliases(self) -> None:
        """Roll every alias-following deployment whose alias now names another version."""
        for route in self.routes.all():
            deployment = route.deployment
            tenant, name = deployment.tenant, deployment.name
            if deployment.alias is None or deployment.canary is not None:
                continue
            try:
                found = await self.deployments.registry.get_version(
                    tenant, deployment.model, None, deployment.alias
                )
            except MaasError as exc:
                log.debug("alias lookup failed", extra={"deployment": name, "reason": str(exc)})
                continue
            if found.version == deployment.resolved_version:
                continue
            if self._refused_rolls.get(deployment.id) == found.version:
                continue
            log.info(
                "alias moved; rolling the deployment",
                extra={"deployment": name, "alias": deployment.alias, "version": found.version},
            )
            try:
                await self.deployments.update(tenant, DeploymentSpec(name=name, alias=deployment.alias), ["alias"])
            except NotFound:
                continue  # deleted meanwhile
            except MaasError as exc:
                self._refused_rolls[deployment.id] = found.version
                log.warning(
                    "cannot roll to the alias's new version",
                    extra={"deployment": name, "version": found.version, "reason": str(exc)},
                )

    def forget(self, deployment_id: str) -> None:
        """A deleted deployment's bookkeeping."""
        self._refused_rolls.pop(deployment_id, None)
