"""Converging Triton to the deployments table: loading each revision (and canary) in the
background, recording READY or FAILED, draining what a roll replaced, unloading (and killing what
an unload leaves behind), reloading models whose processes died, and reconciling after Triton
restarts. Every route change it makes goes through the RouteTable."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import Any

from prometheus_client import Histogram

from services.common.errors import MaasError
from services.inference.artifacts import ArtifactCache
from services.inference.repository import ModelRepository, ModelSpec
from services.inference.routes import RouteTable
from services.inference.serving import public_message
from services.inference.store import FAILED, LOADING, READY, Canary, Deployment, DeploymentStore
from services.inference.stubs import reap_stubs, stubs_under
from services.inference.triton import ModelLoadError, Triton

log = logging.getLogger(__name__)

LOAD_SECONDS = Histogram(
    "maas_inference_model_load_seconds",
    "From the start of a deployment's load (download included) to READY",
    buckets=(0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300),
)
# How long an unloaded model's processes may take to leave before they are killed; a replaced
# revision's in-flight requests get their execution limit on top.
UNLOAD_GRACE_SECONDS = 2.0
# The least time between two reloads of a model whose processes died.
REVIVE_PAUSE_SECONDS = 10.0


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
        canary=None,
    )


class Converger:
    def __init__(
        self,
        *,
        store: DeploymentStore,
        routes: RouteTable,
        artifacts: ArtifactCache,
        repository: ModelRepository,
        triton: Triton,
        gpu_available: bool,
        load_timeout: float,
        load_concurrency: int,
        drain_seconds: float,
        execution_limit: int,
    ) -> None:
        self.store = store
        self.routes = routes
        self.artifacts = artifacts
        self.repository = repository
        self.triton = triton
        self.gpu_available = gpu_available
        self.load_timeout = load_timeout
        # How long a replaced revision stays loaded after routes stopped naming it: time for
        # the gateway to hear of the switch and for requests already routed to reach Triton.
        self.drain_seconds = drain_seconds
        # Seconds one request may run in a model, for deployments that set none of their own.
        self.execution_limit = execution_limit
        self._load_slots = asyncio.Semaphore(load_concurrency)
        # Bumped on every change to a deployment, so that a load finishing late cannot
        # overwrite what a newer change decided.
        self._generations: dict[str, int] = {}
        self._model_locks: dict[str, asyncio.Lock] = {}
        # When each model was last reloaded because its processes had died.
        self._revived: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()

    # -- start-up, Triton restarts, shutdown ------------------------------------------------

    async def restore(self) -> None:
        """Fill the routing table from the table before the server takes requests, and clear
        what earlier runs left on disk (nothing can be downloading or writing yet)."""
        deployments = await asyncio.to_thread(self.store.all)
        for deployment in deployments:
            self.routes.add(deployment)
        await asyncio.to_thread(self.repository.clear_staging)
        await asyncio.to_thread(self.artifacts.prune, {d.sha256 for d in deployments})

    async def reconcile(self) -> None:
        """Make Triton match the table: load every deployment, unload what is not in it."""
        deployments = await asyncio.to_thread(self.store.all)
        loaded = await self.triton.loaded_models()
        wanted = {d.triton_model for d in deployments} | {
            d.canary.triton_model for d in deployments if d.canary is not None
        }
        for stray in sorted(loaded - wanted):
            log.info("unloading a model that no deployment wants", extra={"triton_model": stray})
            await self.triton.unload(stray)
        for stray in sorted(self.repository.names() - wanted):
            await asyncio.to_thread(self.repository.remove, stray)
        for deployment in deployments:
            route = self.routes.add(deployment)
            if deployment.triton_model not in loaded:
                route.serving = route.compiled = None
                deployment = (
                    await asyncio.to_thread(
                        self.store.set_state, deployment.id, LOADING, "loading into the model server"
                    )
                    or deployment
                )
            route.deployment = deployment
            self.converge_later(deployment)
            if deployment.canary is not None and deployment.canary.state != FAILED:
                route.canary = None
                self.spawn(self._converge_canary(deployment, deployment.canary))
        self.routes.changed()
        log.info("reconciled", extra={"deployments": len(deployments), "unloaded": len(loaded - wanted)})

    async def triton_down(self) -> None:
        """Triton went away: nothing is served until reconcile() after its restart."""
        for route in self.routes.all():
            route.stop_serving()
        self.routes.changed()

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
        """Load this revision of the deployment in the background; supersedes earlier ones."""
        self.spawn(self._converge(deployment, self.supersede(deployment.id)))

    def converge_canary_later(self, deployment: Deployment, canary: Canary) -> None:
        self.spawn(self._converge_canary(deployment, canary))

    def drain_later(self, replaced: Deployment) -> None:
        """Unload a revision routes no longer name, once requests on their way have arrived."""
        self.spawn(self._drain(replaced))

    def supersede(self, deployment_id: str) -> int:
        """A new generation of the deployment: loads in flight for older ones come to nothing."""
        self._generations[deployment_id] = self._generations.get(deployment_id, 0) + 1
        return self._generations[deployment_id]

    async def retire(self, deployment: Deployment, triton_models: set[str]) -> None:
        """A deleted deployment: nothing in flight may finish, and its models go now."""
        self.supersede(deployment.id)
        for triton_model in sorted(triton_models):
            await self._unload(triton_model, UNLOAD_GRACE_SECONDS)
        self._generations.pop(deployment.id, None)

    def limit_of(self, deployment: Deployment) -> int:
        return deployment.execution_limit_seconds or self.execution_limit

    # -- loading one revision -------------------------------------------------------------------

    async def _converge(self, deployment: Deployment, generation: int) -> None:
        """Download, write the model directory, load it, and record READY or FAILED."""
        async with self._load_slots, self._model_lock(deployment.triton_model):
            if self._generations.get(deployment.id) != generation:
                return  # a newer change supersedes this one
            started = time.perf_counter()
            try:
                await self._load_revision(deployment)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._load_failed(deployment, generation, exc)
                return
            if self._generations.get(deployment.id) != generation:
                # Superseded while loading: nothing will ever route to this revision.
                await self._unload_now(deployment.triton_model)
                return
            stored = await asyncio.to_thread(self.store.set_state, deployment.id, READY, "")
            route = self.routes.get(deployment.tenant, deployment.name)
            if stored is None or route is None:
                return  # deleted meanwhile; delete() unloads it
            replaced = route.serving
            route.serve(stored)
            self.routes.changed()
            if replaced is not None and replaced.triton_model != stored.triton_model:
                self.drain_later(replaced)
            seconds = time.perf_counter() - started
            LOAD_SECONDS.observe(seconds)
            log.info(
                "deployment ready",
                extra={
                    "deployment": deployment.name,
                    "version": deployment.resolved_version,
                    "seconds": round(seconds, 2),
                },
            )

    async def _load_revision(self, revision: Deployment) -> None:
        """Download, write the model directory and load it into Triton; the caller holds the
        model's lock. Raises what went wrong."""
        try:
            artifact = await self.artifacts.fetch(
                revision.tenant, revision.model, revision.resolved_version, revision.sha256
            )
            changed = await asyncio.to_thread(self.repository.write, self._model_spec(revision), artifact)
            if changed or not await self.triton.is_ready(revision.triton_model):
                await asyncio.wait_for(
                    self.triton.load(revision.triton_model, self.load_timeout), self.load_timeout + 5
                )
            if not await self.triton.is_ready(revision.triton_model):
                raise ModelLoadError("the model server reports the model not ready after loading it")
        except (asyncio.CancelledError, MaasError, ModelLoadError, OSError):
            raise
        except TimeoutError:
            raise TimeoutError(f"the model did not load within {self.load_timeout:.0f} s") from None
        except Exception:
            log.exception("unexpected failure loading a model", extra={"deployment": revision.name})
            raise

    async def _load_failed(self, deployment: Deployment, generation: int, exc: BaseException) -> None:
        reason = self._reason(exc, deployment)
        route = self.routes.get(deployment.tenant, deployment.name)
        # A failed reload leaves the previous revision serving in Triton.
        serving = route.serving if route else None
        still_serving = serving is not None and await self.triton.is_ready(serving.triton_model)
        if serving is None or serving.triton_model != deployment.triton_model:
            await self._unload_now(deployment.triton_model)
        message = f"version {deployment.resolved_version} failed to load: {reason}"
        if still_serving and serving is not None:
            message += f"; version {serving.resolved_version} keeps serving"
        log.warning("deployment failed", extra={"deployment": deployment.name, "reason": reason})
        if self._generations.get(deployment.id) != generation:
            return
        stored = await asyncio.to_thread(self.store.set_state, deployment.id, FAILED, message)
        if stored is None or route is None:
            return
        route.deployment = stored
        if not still_serving:
            route.serving = route.compiled = None
        self.routes.changed()

    async def _converge_canary(self, deployment: Deployment, canary: Canary) -> None:
        """Load a canary and let it take its share, or record why it could not load."""
        async with self._load_slots, self._model_lock(canary.triton_model):
            try:
                await self._load_revision(canary_revision(deployment, canary))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = self._reason(exc, deployment)
                log.warning("canary failed", extra={"deployment": deployment.name, "reason": reason})
                await self._unload_now(canary.triton_model)
                stored = await asyncio.to_thread(
                    self.store.set_canary_state,
                    deployment.id,
                    canary.triton_model,
                    FAILED,
                    f"version {canary.version} failed to load: {reason}",
                )
                self._take_canary(deployment, stored, serving=False)
                return
            stored = await asyncio.to_thread(
                self.store.set_canary_state, deployment.id, canary.triton_model, READY, ""
            )
            if stored is None:
                # Rolled back, replaced or deleted meanwhile: nothing will route to it.
                await self._unload_now(canary.triton_model)
                return
            self._take_canary(deployment, stored, serving=True)
            log.info("canary ready", extra={"deployment": deployment.name, "version": canary.version})

    def _take_canary(self, deployment: Deployment, stored: Deployment | None, *, serving: bool) -> None:
        route = self.routes.get(deployment.tenant, deployment.name)
        if stored is None or route is None:
            return
        # Keep what changed on the main revision meanwhile; take the canary's new state.
        route.deployment = route.deployment.replace(canary=stored.canary)
        route.canary = stored.canary if serving else None
        self.routes.changed()

    def _model_spec(self, deployment: Deployment) -> ModelSpec:
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
        )

    def _reason(self, exc: BaseException, deployment: Deployment) -> str:
        return public_message(str(exc) or type(exc).__name__, deployment.name, self.repository.root)

    # -- unloading ----------------------------------------------------------------------------

    async def _drain(self, replaced: Deployment) -> None:
        """Unload a replaced revision once nothing can still be on its way to it. Triton's own
        unload then waits for the requests it already holds."""
        await asyncio.sleep(self.drain_seconds)
        await self._unload(replaced.triton_model, UNLOAD_GRACE_SECONDS + self.limit_of(replaced))
        log.info(
            "replaced revision unloaded",
            extra={"deployment": replaced.name, "version": replaced.resolved_version},
        )

    async def _unload(self, triton_model: str, grace: float) -> None:
        # Waits for a load in flight on this model to finish before taking it away.
        async with self._model_lock(triton_model):
            await self._unload_now(triton_model, grace)
        self._model_locks.pop(triton_model, None)

    async def _unload_now(self, triton_model: str, grace: float = UNLOAD_GRACE_SECONDS) -> None:
        """Unload and remove a model; the caller holds its lock. Its processes on this host get
        `grace` seconds to leave, then are killed: one stuck in a model call never would."""
        await self.triton.unload(triton_model)
        self.spawn(reap_stubs(self.repository.path(triton_model), grace))
        self._revived.pop(triton_model, None)
        await asyncio.to_thread(self.repository.remove, triton_model)

    def _model_lock(self, triton_model: str) -> asyncio.Lock:
        return self._model_locks.setdefault(triton_model, asyncio.Lock())

    # -- reviving models whose processes died -----------------------------------------------

    async def revive_models(self) -> None:
        """Reload every served model that has lost its stub processes: Triton does not restart
        a stub that died (killed at its execution limit, or crashed), and answers every later
        request with "Stub process ... is not healthy"."""
        alive = await asyncio.to_thread(stubs_under, self.repository.root)
        now = time.monotonic()
        for route in self.routes.all():
            for revision in (route.serving, route.canary):
                if revision is None or revision.triton_model in alive:
                    continue
                if self._model_lock(revision.triton_model).locked():
                    continue  # being loaded or unloaded right now
                if now - self._revived.get(revision.triton_model, -REVIVE_PAUSE_SECONDS) < REVIVE_PAUSE_SECONDS:
                    continue  # a model that dies again at once is not reloaded in a tight loop
                self._revived[revision.triton_model] = now
                self.spawn(self._revive(revision.triton_model))

    async def _revive(self, triton_model: str) -> None:
        async with self._model_lock(triton_model):
            if triton_model in await asyncio.to_thread(stubs_under, self.repository.root):
                return
            if not await self.triton.is_ready(triton_model):
                return  # unloaded meanwhile, or Triton is restarting: reconcile() loads it
            log.warning("a model's processes died; reloading it", extra={"triton_model": triton_model})
            # Triton reloads only a model whose files changed since it loaded them.
            await asyncio.to_thread(self.repository.touch, triton_model)
            try:
                await asyncio.wait_for(self.triton.load(triton_model, self.load_timeout), self.load_timeout + 5)
            except (ModelLoadError, TimeoutError) as exc:
                log.warning("reloading a model failed", extra={"triton_model": triton_model, "reason": str(exc)})
