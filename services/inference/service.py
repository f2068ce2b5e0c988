"""Deployments: the desired state in the table, Triton converged to it in the background, the
in-memory routing table that Predict and the gateway read, and Predict itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from maas.common.v1 import common_pb2
from maas.inference.v1 import inference_pb2
from maas.registry.v1 import registry_pb2
from prometheus_client import Gauge, Histogram
from tritonclient.grpc import service_pb2

from services.common.embedding import EmbeddingModel, check_texts
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MaasError,
    NotFound,
    Unavailable,
)
from services.common.generation import (
    check_prompt,
    generate_response_of_stream,
    sampling_of_generate,
    stream_request,
)
from services.common.logs import request_id_var
from services.common.oip import headers_of_predict, infer_request_of_predict, predict_response_of_infer
from services.common.serving import EMBED, GENERATE, PREDICT, TENSOR_TASKS, check_task, task_of_metadata
from services.common.tensors import BY_PROTO, CompiledSignature, check_signature
from services.common.traffic import goes_to_canary
from services.common.validation import Page, check_name
from services.inference.artifacts import ArtifactCache, Registry
from services.inference.caps import TenantCaps
from services.inference.repository import RUNNER_METADATA_KEYS, ModelRepository, ModelSpec
from services.inference.store import FAILED, LOADING, READY, Canary, Deployment, DeploymentStore, now
from services.inference.stubs import reap_stubs, stubs_under
from services.inference.triton import ModelLoadError

log = logging.getLogger(__name__)

DEPLOYMENTS = Gauge("maas_inference_deployments", "Deployments by state", ["state"])
LOAD_SECONDS = Histogram(
    "maas_inference_model_load_seconds",
    "From the start of a deployment's load (download included) to READY",
    buckets=(0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300),
)

DEVICES = ("AUTO", "CPU", "GPU")
MAX_INSTANCES = 16
MAX_BATCH_SIZE = 1024
DEFAULT_INSTANCES = 1
DEFAULT_MAX_BATCH_SIZE = 8
UPDATABLE_FIELDS = frozenset(
    {"version", "alias", "instances", "max_batch_size", "device", "cacheable", "execution_limit_seconds"}
)
# Fields whose change needs a new revision loaded into Triton.
RELOAD_FIELDS = ("resolved_version", "sha256", "instances", "max_batch_size", "device", "execution_limit_seconds")
MAX_EXECUTION_LIMIT_SECONDS = 3600
# Triton's names for a deployment's revisions and their instances (_triton_model_name): internal,
# so messages a caller reads name the deployment instead.
TRITON_MODEL_NAME = re.compile(r"m_[0-9a-f]{32}_[0-9a-f]{8}(?:_\d+)*")
# How long an unloaded model's processes may take to leave before they are killed; a replaced
# revision's in-flight requests get their execution limit on top.
UNLOAD_GRACE_SECONDS = 2.0
# The least time between two reloads of a model whose processes died.
REVIVE_PAUSE_SECONDS = 10.0
FORMATS = {registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT: "TORCHSCRIPT", registry_pb2.ARTIFACT_FORMAT_ONNX: "ONNX"}
# The generic runner feeds numeric tensors to torch and onnxruntime; strings and bfloat16 it cannot.
UNSERVED_DATATYPES = {common_pb2.DATA_TYPE_BYTES, common_pb2.DATA_TYPE_BF16}
# A canary is judged on its error rate only once a check window holds this many requests.
MIN_CANARY_REQUESTS = 10


class Triton(Protocol):
    """What the service needs of Triton (services.inference.triton.TritonClient)."""

    address: str

    async def load(self, triton_model: str, timeout: float) -> None: ...
    async def unload(self, triton_model: str) -> None: ...
    async def is_ready(self, triton_model: str) -> bool: ...
    async def loaded_models(self) -> set[str]: ...
    async def request_counts(self, triton_model: str) -> tuple[int, int]: ...
    async def infer(
        self, request: service_pb2.ModelInferRequest, timeout: float
    ) -> service_pb2.ModelInferResponse: ...
    def stream(
        self, request: service_pb2.ModelInferRequest, timeout: float
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]: ...


@dataclass(frozen=True)
class DeploymentSpec:
    """What a caller asks for. Zero values mean "the default"."""

    name: str
    model: str = ""
    version: int | None = None
    alias: str | None = None
    instances: int = 0
    max_batch_size: int = 0
    device: str = ""
    cacheable: bool = False
    execution_limit_seconds: int = 0


@dataclass
class Route:
    """One deployment as the data path sees it: the latest row, and the revision Triton serves."""

    deployment: Deployment
    # The row as it was when Triton last finished loading it; None while nothing serves.
    serving: Deployment | None = None
    compiled: CompiledSignature | None = None
    # The canary once it is loaded and takes its share of the requests.
    canary: Canary | None = None

    @property
    def ready(self) -> bool:
        return self.serving is not None

    @property
    def served(self) -> Deployment:
        """The revision requests reach: the serving one, else the one being loaded."""
        return self.serving or self.deployment


class Deployments:
    def __init__(
        self,
        *,
        store: DeploymentStore,
        registry: Registry,
        artifacts: ArtifactCache,
        repository: ModelRepository,
        triton: Triton,
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
    ) -> None:
        self.store = store
        self.registry = registry
        self.artifacts = artifacts
        self.repository = repository
        self.triton = triton
        self.gpu_available = gpu_available
        self.load_timeout = load_timeout
        self.predict_timeout = predict_timeout
        # How long a Predict without a deadline of its own waits for a loading deployment.
        self.cold_start_wait = cold_start_wait
        # How long a replaced revision stays loaded after routes stopped naming it: time for
        # the gateway to hear of the switch and for requests already routed to reach Triton.
        self.drain_seconds = drain_seconds
        # How often alias-following deployments look up their alias; 0: never.
        self.alias_poll_interval = alias_poll_interval
        # How often loaded canaries' error rates are checked (the window); 0: never.
        self.canary_check_interval = canary_check_interval
        # How often READY models are checked for their stub processes (Triton on this host); 0: never.
        self.stub_check_interval = stub_check_interval
        # Seconds one request may run in a model, for deployments that set none of their own.
        self.execution_limit = execution_limit
        self.caps = caps or TenantCaps()  # none: no caps
        # When each model was last reloaded because its processes had died.
        self._revived: dict[str, float] = {}
        # Held while a tenant's deployments are checked against its caps and written.
        self._tenant_locks: dict[str, asyncio.Lock] = {}
        # Triton's (success, failure) counts per canary model at the last check.
        self._canary_counts: dict[str, tuple[int, int]] = {}
        self._load_slots = asyncio.Semaphore(load_concurrency)
        self._routes: dict[tuple[str, str], Route] = {}
        # Bumped on every change to a deployment, so that a load finishing late cannot
        # overwrite what a newer change decided.
        self._generations: dict[str, int] = {}
        self._model_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        self._changed = asyncio.Event()
        # The version each alias-following deployment last failed to roll to, so that the
        # poller complains once, not every interval.
        self._refused_rolls: dict[str, int] = {}

    # -- start-up, Triton restarts, shutdown ------------------------------------------------

    async def restore(self) -> None:
        """Fill the routing table from the table before the server takes requests, and clear
        what earlier runs left on disk (nothing can be downloading or writing yet)."""
        deployments = await asyncio.to_thread(self.store.all)
        for deployment in deployments:
            self._routes[(deployment.tenant, deployment.name)] = Route(deployment)
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
            key = (deployment.tenant, deployment.name)
            route = self._routes.setdefault(key, Route(deployment))
            if deployment.triton_model not in loaded:
                route.serving = route.compiled = None
                deployment = (
                    await asyncio.to_thread(
                        self.store.set_state, deployment.id, LOADING, "loading into the model server"
                    )
                    or deployment
                )
            route.deployment = deployment
            self._converge_later(deployment)
            if deployment.canary is not None and deployment.canary.state != FAILED:
                route.canary = None
                self._spawn(self._converge_canary(deployment, deployment.canary))
        self._notify()
        log.info("reconciled", extra={"deployments": len(deployments), "unloaded": len(loaded - wanted)})

    async def triton_down(self) -> None:
        """Triton went away: nothing is served until reconcile() after its restart."""
        for route in self._routes.values():
            route.serving = route.compiled = route.canary = None
        self._notify()

    def start_watching(self) -> None:
        """Poll the registry for moved aliases and Triton for canary errors in the background
        (each when its interval is set)."""
        if self.alias_poll_interval > 0:
            self._spawn(self._every(self.alias_poll_interval, self.follow_aliases))
        if self.canary_check_interval > 0:
            self._spawn(self._every(self.canary_check_interval, self.check_canaries))
        if self.stub_check_interval > 0:
            self._spawn(self._every(self.stub_check_interval, self.revive_models))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the API ------------------------------------------------------------------------------

    async def create(self, tenant: str, spec: DeploymentSpec) -> Deployment:
        check_name("deployment", spec.name)
        check_name("model", spec.model)
        if (spec.version is None) == (spec.alias is None):
            raise InvalidArgument("set exactly one of version and alias: what the deployment serves")
        _check_target(spec.version, spec.alias)
        instances = _checked_range("instances", spec.instances or DEFAULT_INSTANCES, MAX_INSTANCES)
        max_batch_size = _checked_range(
            "max_batch_size", spec.max_batch_size or DEFAULT_MAX_BATCH_SIZE, MAX_BATCH_SIZE
        )
        device = self._checked_device(spec.device)
        execution_limit = _checked_execution_limit(spec.execution_limit_seconds)
        if await asyncio.to_thread(self.store.get, tenant, spec.name):
            raise AlreadyExists(f"deployment {spec.name!r} already exists")
        version = await self._deployable_version(tenant, spec.model, spec.version, spec.alias)
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
            triton_model=_triton_model_name(deployment_id),
            sha256=version.sha256,
            format=FORMATS[version.format],
            signature=version.signature,
            create_time=created,
            update_time=created,
            execution_limit_seconds=execution_limit,
            **_serving(version),
        )
        async with self._tenant_lock(tenant):
            await self._check_caps(deployment)
            await asyncio.to_thread(self.store.create, deployment)
        self._routes[(tenant, spec.name)] = Route(deployment)
        self._notify()
        self._converge_later(deployment)
        return deployment

    async def get(self, tenant: str, name: str) -> Deployment:
        check_name("deployment", name)
        deployment = await asyncio.to_thread(self.store.get, tenant, name)
        if deployment is None:
            raise NotFound(f"deployment {name!r} not found")
        return deployment

    async def list_page(self, tenant: str, page_size: int, page_token: str) -> tuple[list[Deployment], str]:
        page = Page.parse(page_size, page_token)
        rows = await asyncio.to_thread(self.store.list_page, tenant, page)
        if len(rows) > page.size:
            rows = rows[: page.size]
            return rows, Page.token_after(rows[-1].name)
        return rows, ""

    async def update(self, tenant: str, spec: DeploymentSpec, fields: Collection[str]) -> Deployment:
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
            changes["instances"] = _checked_range(
                "instances", spec.instances or DEFAULT_INSTANCES, MAX_INSTANCES
            )
        if "max_batch_size" in fields:
            changes["max_batch_size"] = _checked_range(
                "max_batch_size", spec.max_batch_size or DEFAULT_MAX_BATCH_SIZE, MAX_BATCH_SIZE
            )
        if "device" in fields:
            changes["device"] = self._checked_device(spec.device)
        if "cacheable" in fields:
            changes["cacheable"] = spec.cacheable
        if "execution_limit_seconds" in fields:
            changes["execution_limit_seconds"] = _checked_execution_limit(spec.execution_limit_seconds)
        if fields & {"version", "alias"}:
            version, alias = (spec.version, None) if "version" in fields else (None, spec.alias)
            if version is None and not alias:
                raise InvalidArgument(
                    f"set the new {'version' if 'version' in fields else 'alias'} to deploy"
                )
            _check_target(version, alias)
            found = await self._deployable_version(tenant, current.model, version, alias)
            changes.update(
                version=version,
                alias=alias,
                resolved_version=found.version,
                sha256=found.sha256,
                format=FORMATS[found.format],
                signature=found.signature,
                **_serving(found),
            )
        updated = current.replace(**changes, update_time=now())
        reload = current.state == FAILED or any(
            getattr(updated, field) != getattr(current, field) for field in RELOAD_FIELDS
        )
        if reload:
            route = self._routes.get((tenant, current.name))
            serving = route.serving if route else None
            message = f"loading version {updated.resolved_version}"
            if serving:
                message += f"; version {serving.resolved_version} serves until it is ready"
            # Each revision is its own Triton model, so that the old one serves, untouched,
            # until the new one is ready and routes have moved to it.
            updated = updated.replace(
                state=LOADING, message=message, triton_model=_triton_model_name(current.id)
            )
        async with self._tenant_lock(tenant):
            await self._check_caps(updated)
            if not await asyncio.to_thread(self.store.save, updated):
                raise NotFound(f"deployment {spec.name!r} not found")
        route = self._routes.setdefault((tenant, updated.name), Route(updated))
        route.deployment = updated
        self._notify()
        if reload:
            self._converge_later(updated)
        return updated

    async def delete(self, tenant: str, name: str) -> None:
        check_name("deployment", name)
        deployment = await asyncio.to_thread(self.store.delete, tenant, name)
        if deployment is None:
            raise NotFound(f"deployment {name!r} not found")
        self._bump(deployment.id)
        route = self._routes.pop((tenant, name), None)
        self._notify()
        triton_models = {deployment.triton_model}
        if route is not None and route.serving is not None:
            triton_models.add(route.serving.triton_model)
        if deployment.canary is not None:
            triton_models.add(deployment.canary.triton_model)
        for triton_model in sorted(triton_models):
            await self._unload(triton_model, UNLOAD_GRACE_SECONDS)
        self._generations.pop(deployment.id, None)
        self._refused_rolls.pop(deployment.id, None)

    # -- canaries -------------------------------------------------------------------------------

    async def start_canary(
        self, tenant: str, name: str, version: int, weight: int, max_error_rate: float
    ) -> Deployment:
        """Load `version` beside the deployment's own and send it `weight` percent of requests;
        with the canary's own version again, change only its weight and error threshold."""
        current = await self.get(tenant, name)
        _checked_range("weight_percent", weight, 99)
        if not 0 <= max_error_rate <= 1:
            raise InvalidArgument(f"max_error_rate must be between 0 and 1, got {max_error_rate}")
        if current.alias is not None:
            raise FailedPrecondition(
                f"deployment {name!r} follows alias {current.alias!r}, which decides its version: "
                "move the alias to roll, or pin a version (UpdateDeployment) to run a canary"
            )
        route = self._routes.setdefault((tenant, name), Route(current))
        if current.canary is not None and current.canary.version == version:
            held = current.canary.replace(weight=weight, max_error_rate=max_error_rate)
            updated = await self._save(current.replace(canary=held, update_time=now()))
            route.deployment = updated
            if route.canary is not None:
                route.canary = held
            self._notify()
            return updated
        _check_target(version, None)
        if version == current.resolved_version:
            raise InvalidArgument(f"version {version} is what {name!r} serves already; canary another one")
        found = await self._deployable_version(tenant, current.model, version, None)
        if found.signature != current.signature:
            raise FailedPrecondition(
                f"version {version} has another signature than version {current.resolved_version}: "
                "a canary must take the same inputs and give the same outputs"
            )
        if (serving := _serving(found))["runner_metadata"] != current.runner_metadata or (
            serving["task"] != current.task
        ):
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
            triton_model=_triton_model_name(current.id),
            sha256=found.sha256,
            format=FORMATS[found.format],
        )
        async with self._tenant_lock(tenant):
            updated = current.replace(canary=canary, update_time=now())
            await self._check_caps(updated)
            updated = await self._save(updated)
        route.deployment = updated
        replaced, route.canary = current.canary, None
        self._notify()
        if replaced is not None:
            self._spawn(self._drain(_canary_revision(current, replaced)))
        self._spawn(self._converge_canary(updated, canary))
        return updated

    async def promote_canary(self, tenant: str, name: str) -> Deployment:
        """The canary's version becomes the deployment's: routes switch to the model already
        loaded, and the old version drains."""
        current = await self.get(tenant, name)
        canary = self._loaded_canary(current)
        route = self._routes[(tenant, name)]
        promoted = _canary_revision(current, canary).replace(
            version=canary.version, state=READY, message="", update_time=now()
        )
        self._bump(current.id)  # a reload still in flight is superseded
        promoted = await self._save(promoted)
        replaced = route.serving
        route.deployment = route.serving = promoted
        route.compiled = CompiledSignature(promoted.signature, promoted.max_batch_size)
        route.canary = None
        self._notify()
        if replaced is not None and replaced.triton_model != promoted.triton_model:
            self._spawn(self._drain(replaced))
        log.info("canary promoted", extra={"deployment": name, "version": canary.version})
        return promoted

    async def rollback_canary(self, tenant: str, name: str, reason: str = "") -> Deployment:
        """All requests back to the deployment's version; the canary drains and is unloaded."""
        current = await self.get(tenant, name)
        if current.canary is None:
            raise FailedPrecondition(f"deployment {name!r} has no canary to roll back")
        changes: dict = {"canary": None, "update_time": now()}
        if reason:
            changes["message"] = f"canary version {current.canary.version} rolled back: {reason}"
        updated = await self._save(current.replace(**changes))
        route = self._routes.get((tenant, name))
        if route is not None:
            route.deployment = updated
            route.canary = None
        self._notify()
        self._canary_counts.pop(current.canary.triton_model, None)
        self._spawn(self._drain(_canary_revision(current, current.canary)))
        log.info("canary rolled back", extra={"deployment": name, "reason": reason or "asked to"})
        return updated

    async def check_canaries(self) -> None:
        """Roll back every canary whose failed fraction of requests since the last check
        exceeds its max_error_rate (counted by Triton, whichever path the requests took)."""
        for (tenant, name), route in list(self._routes.items()):
            canary = route.canary
            if canary is None or canary.max_error_rate <= 0:
                continue
            succeeded, failed = await self.triton.request_counts(canary.triton_model)
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
            with contextlib.suppress(NotFound, FailedPrecondition):  # deleted or rolled back meanwhile
                await self.rollback_canary(tenant, name, reason)

    def _loaded_canary(self, deployment: Deployment) -> Canary:
        canary = deployment.canary
        if canary is None:
            raise FailedPrecondition(f"deployment {deployment.name!r} has no canary to promote")
        route = self._routes.get((deployment.tenant, deployment.name))
        if canary.state != READY or route is None or route.canary is None:
            raise FailedPrecondition(
                f"canary version {canary.version} is {canary.state}: promote it once it is READY, "
                "or roll it back"
            )
        return canary

    async def _save(self, deployment: Deployment) -> Deployment:
        if not await asyncio.to_thread(self.store.save, deployment):
            raise NotFound(f"deployment {deployment.name!r} not found")
        return deployment

    async def predict(
        self, tenant: str, request: inference_pb2.PredictRequest, timeout: float | None = None
    ) -> inference_pb2.PredictResponse:
        route = await self._serving_route(tenant, request.deployment, timeout)
        serving, compiled = route.serving, route.compiled
        assert serving is not None and compiled is not None  # _serving_route returns only then
        check_task(request.deployment, serving.task, TENSOR_TASKS, "Predict")
        compiled.validate(headers_of_predict(request), request.output_names)
        triton_model, version = self._target(route)
        infer = infer_request_of_predict(request, triton_model, request_id_var.get())
        with self._public_errors(request.deployment):
            response = await self.triton.infer(infer, timeout if timeout is not None else self.predict_timeout)
        return predict_response_of_infer(response, serving.model, version)

    async def embed(
        self, tenant: str, request: inference_pb2.EmbedRequest, timeout: float | None = None
    ) -> inference_pb2.EmbedResponse:
        texts = check_texts(request.texts)
        route = await self._serving_route(tenant, request.deployment, timeout)
        serving = route.serving
        assert serving is not None  # _serving_route returns only then
        check_task(request.deployment, serving.task, (EMBED,), "Embed")
        model = EmbeddingModel.of(request.deployment, serving.signature)
        triton_model, version = self._target(route)
        requests = model.requests(texts, triton_model, serving.max_batch_size, request_id_var.get())
        budget = timeout if timeout is not None else self.predict_timeout
        with self._public_errors(request.deployment):
            answers = await asyncio.gather(*(self.triton.infer(r, budget) for r in requests))
        return model.response(answers, serving.model, version)

    async def generate(
        self, tenant: str, request: inference_pb2.GenerateRequest, timeout: float | None = None
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Text from a generation deployment, one message per token; leaving the iteration
        early (a cancelled caller) cancels the Triton stream."""
        prompt, sampling = check_prompt(request.prompt), sampling_of_generate(request)
        route = await self._serving_route(tenant, request.deployment, timeout)
        serving = route.serving
        assert serving is not None  # _serving_route returns only then
        check_task(request.deployment, serving.task, (GENERATE,), "Generate")
        triton_model, version = self._target(route)
        infer = stream_request(prompt, sampling, triton_model, request_id_var.get())
        with self._public_errors(request.deployment):
            async for response in self.triton.stream(
                infer, timeout if timeout is not None else self.predict_timeout
            ):
                yield generate_response_of_stream(response, serving.model, version)

    async def _serving_route(self, tenant: str, name: str, timeout: float | None) -> Route:
        """The deployment's route once it serves (waiting out a cold start), or NOT_FOUND."""
        route = self._routes.get((tenant, name))
        if route is None:
            check_name("deployment", name)
            raise NotFound(f"deployment {name!r} not found")
        if route.serving is None or route.compiled is None:
            route = await self._wait_serving(tenant, name, timeout)
        return route

    @staticmethod
    def _target(route: Route) -> tuple[str, int]:
        """The Triton model and version of this request: the canary's for its share of requests."""
        canary, serving = route.canary, route.serving
        assert serving is not None
        if canary is not None and goes_to_canary(request_id_var.get(), canary.weight):
            return canary.triton_model, canary.version
        return serving.triton_model, serving.resolved_version

    async def _wait_serving(self, tenant: str, name: str, timeout: float | None) -> Route:
        """Cold start: wait, within the caller's deadline, for a loading deployment to serve."""
        # Give up a little before the caller's deadline, so that it hears why.
        budget = timeout - min(0.1, timeout / 10) if timeout is not None else self.cold_start_wait
        deadline = time.monotonic() + budget
        while True:
            route = self._routes.get((tenant, name))
            if route is None:
                raise NotFound(f"deployment {name!r} not found")
            if route.serving is not None and route.compiled is not None:
                return route
            if route.deployment.state == FAILED:
                raise FailedPrecondition(f"deployment {name!r} failed: {route.deployment.message}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"deployment {name!r} is still loading; retry shortly")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    async def watch_routes(self) -> AsyncIterator[list[Route]]:
        """The whole routing table now, then again after every change."""
        while True:
            changed = self._changed
            yield list(self._routes.values())
            await changed.wait()

    @property
    def triton_address(self) -> str:
        return self.triton.address

    def route(self, tenant: str, name: str) -> Route | None:
        return self._routes.get((tenant, name))

    def routes(self) -> list[Route]:
        """Every deployment as the data path sees it now."""
        return list(self._routes.values())

    # -- converging Triton to one deployment ------------------------------------------------

    def _converge_later(self, deployment: Deployment) -> None:
        self._spawn(self._converge(deployment, self._bump(deployment.id)))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
            route = self._routes.get((deployment.tenant, deployment.name))
            if stored is None or route is None:
                return  # deleted meanwhile; delete() unloads it
            replaced = route.serving
            route.deployment = stored
            route.serving = stored
            route.compiled = CompiledSignature(stored.signature, stored.max_batch_size)
            self._notify()
            if replaced is not None and replaced.triton_model != stored.triton_model:
                self._spawn(self._drain(replaced))
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
        reason = self._public(str(exc) or type(exc).__name__, deployment.name)
        route = self._routes.get((deployment.tenant, deployment.name))
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
        self._notify()

    async def _converge_canary(self, deployment: Deployment, canary: Canary) -> None:
        """Load a canary and let it take its share, or record why it could not load."""
        revision = _canary_revision(deployment, canary)
        async with self._load_slots, self._model_lock(canary.triton_model):
            try:
                await self._load_revision(revision)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = self._public(str(exc) or type(exc).__name__, deployment.name)
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
        route = self._routes.get((deployment.tenant, deployment.name))
        if stored is None or route is None:
            return
        # Keep what changed on the main revision meanwhile; take the canary's new state.
        route.deployment = route.deployment.replace(canary=stored.canary)
        route.canary = stored.canary if serving else None
        self._notify()

    async def _drain(self, replaced: Deployment) -> None:
        """Unload a replaced revision once nothing can still be on its way to it. Triton's own
        unload then waits for the requests it already holds."""
        await asyncio.sleep(self.drain_seconds)
        await self._unload(replaced.triton_model, UNLOAD_GRACE_SECONDS + self._limit_of(replaced))
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
        self._spawn(reap_stubs(self.repository.path(triton_model), grace))
        self._revived.pop(triton_model, None)
        await asyncio.to_thread(self.repository.remove, triton_model)

    # -- reviving models whose processes died -----------------------------------------------

    async def revive_models(self) -> None:
        """Reload every served model that has lost its stub processes: Triton does not restart
        a stub that died (killed at its execution limit, or crashed), and answers every later
        request with "Stub process ... is not healthy"."""
        alive = await asyncio.to_thread(stubs_under, self.repository.root)
        for route in list(self._routes.values()):
            for revision in (route.serving, route.canary):
                if revision is None or revision.triton_model in alive:
                    continue
                if self._model_lock(revision.triton_model).locked():
                    continue  # being loaded or unloaded right now
                if time.monotonic() - self._revived.get(revision.triton_model, -REVIVE_PAUSE_SECONDS) < REVIVE_PAUSE_SECONDS:
                    continue  # a model that dies again at once is not reloaded in a tight loop
                self._revived[revision.triton_model] = time.monotonic()
                self._spawn(self._revive(revision.triton_model))

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

    # -- following aliases ----------------------------------------------------------------------

    @staticmethod
    async def _every(interval: float, check: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await check()
            except Exception:
                # A watcher must outlive a registry or Triton outage and any one bad deployment.
                log.exception("background check failed", extra={"check": check.__name__})

    async def follow_aliases(self) -> None:
        """Roll every alias-following deployment whose alias now names another version."""
        for (tenant, name), route in list(self._routes.items()):
            deployment = route.deployment
            if deployment.alias is None or deployment.canary is not None:
                continue
            try:
                found = await self.registry.get_version(tenant, deployment.model, None, deployment.alias)
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
                await self.update(tenant, DeploymentSpec(name=name, alias=deployment.alias), ["alias"])
            except NotFound:
                continue  # deleted meanwhile
            except MaasError as exc:
                self._refused_rolls[deployment.id] = found.version
                log.warning(
                    "cannot roll to the alias's new version",
                    extra={"deployment": name, "version": found.version, "reason": str(exc)},
                )

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
            execution_limit_seconds=self._limit_of(deployment),
            on_gpu=deployment.device == "GPU" or (deployment.device == "AUTO" and self.gpu_available),
        )

    # -- helpers --------------------------------------------------------------------------------

    async def _deployable_version(
        self, tenant: str, model: str, version: int | None, alias: str | None
    ) -> registry_pb2.Version:
        found = await self.registry.get_version(tenant, model, version, alias)
        label = f"version {found.version} of model {model!r}"
        if found.state == registry_pb2.VERSION_STATE_ARCHIVED:
            raise FailedPrecondition(f"{label} is archived: deploy a version that is not")
        if found.format not in FORMATS:
            raise FailedPrecondition(f"{label} has no TorchScript or ONNX artifact: nothing Triton can serve")
        try:
            check_signature(found.signature)
        except InvalidArgument as exc:
            raise FailedPrecondition(f"{label} has an unusable signature: {exc}") from None
        task = task_of_metadata(found.metadata)
        if task == GENERATE:
            if found.format != registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT:
                raise FailedPrecondition(f"{label} is a language model: text generation serves TorchScript")
            if not found.metadata.get("vocabulary"):
                raise FailedPrecondition(
                    f"{label} is a language model without a `vocabulary` in its metadata "
                    "(its characters in token order): text generation cannot encode prompts"
                )
        if task != PREDICT:
            return found  # runners of other tasks read their own inputs (text), not the signature's
        for tensor in [*found.signature.inputs, *found.signature.outputs]:
            if tensor.datatype in UNSERVED_DATATYPES:
                raise FailedPrecondition(
                    f"{label}: tensor {tensor.name!r} is {BY_PROTO[tensor.datatype].triton}; "
                    "deployments serve numeric tensors (BOOL, integers, FP16, FP32, FP64)"
                )
        return found

    def _checked_device(self, device: str) -> str:
        device = device or "AUTO"
        if device not in DEVICES:
            raise InvalidArgument(f"device must be one of {list(DEVICES)}")
        if device == "GPU" and not self.gpu_available:
            raise FailedPrecondition(
                "device GPU was asked for but the inference host has no GPU; use AUTO or CPU"
            )
        return device

    def _public(self, message: str, deployment_name: str) -> str:
        """`message` as a caller may read it: Triton's model names and the repository's paths
        on this host replaced by the deployment's name."""
        message = message.replace(str(self.repository.root), "<models>")
        return TRITON_MODEL_NAME.sub(deployment_name, message)

    @contextlib.contextmanager
    def _public_errors(self, deployment_name: str) -> Iterator[None]:
        try:
            yield
        except MaasError as error:
            public = self._public(str(error), deployment_name)
            if public == str(error):
                raise
            renamed = type(error)(public)
            renamed.trailing_metadata = error.trailing_metadata
            raise renamed from None

    def _limit_of(self, deployment: Deployment) -> int:
        return deployment.execution_limit_seconds or self.execution_limit

    async def _check_caps(self, candidate: Deployment) -> None:
        """The caller holds the tenant's lock, so that two writes cannot both pass the check."""
        others = await asyncio.to_thread(self.store.of_tenant, candidate.tenant)
        self.caps.check(candidate.tenant, others, candidate)

    def _tenant_lock(self, tenant: str) -> asyncio.Lock:
        return self._tenant_locks.setdefault(tenant, asyncio.Lock())

    def _bump(self, deployment_id: str) -> int:
        self._generations[deployment_id] = self._generations.get(deployment_id, 0) + 1
        return self._generations[deployment_id]

    def _model_lock(self, triton_model: str) -> asyncio.Lock:
        return self._model_locks.setdefault(triton_model, asyncio.Lock())

    def _notify(self) -> None:
        states = Counter(route.deployment.state for route in self._routes.values())
        for state in (LOADING, READY, FAILED):
            DEPLOYMENTS.labels(state).set(states[state])
        self._changed.set()
        self._changed = asyncio.Event()


def _serving(version: registry_pb2.Version) -> dict[str, Any]:
    """The deployment fields that follow from the version it serves."""
    task = task_of_metadata(version.metadata)
    return {
        "task": task,
        "artifact_bytes": version.size_bytes,
        "precision": version.precision or "fp32",
        "runner_metadata": {
            key: version.metadata[key] for key in RUNNER_METADATA_KEYS[task] if key in version.metadata
        },
    }


def _canary_revision(deployment: Deployment, canary: Canary) -> Deployment:
    """The canary seen as a revision of the deployment, to load it as such."""
    return deployment.replace(
        resolved_version=canary.version,
        sha256=canary.sha256,
        format=canary.format,
        triton_model=canary.triton_model,
        canary=None,
    )


def _triton_model_name(deployment_id: str) -> str:
    """A fresh Triton model name for one revision of a deployment."""
    return f"m_{deployment_id}_{uuid.uuid4().hex[:8]}"


def _check_target(version: int | None, alias: str | None) -> None:
    if version is not None and version < 1:
        raise InvalidArgument(f"version must be 1 or more, got {version}")
    if alias is not None:
        check_name("alias", alias)


def _checked_execution_limit(seconds: int) -> int:
    """0 (the service's default) or 1 to MAX_EXECUTION_LIMIT_SECONDS."""
    if seconds and not 1 <= seconds <= MAX_EXECUTION_LIMIT_SECONDS:
        raise InvalidArgument(
            f"execution_limit_seconds must be between 1 and {MAX_EXECUTION_LIMIT_SECONDS} "
            f"(0: the service's default), got {seconds}"
        )
    return seconds


def _checked_range(field: str, value: int, maximum: int) -> int:
    if not 1 <= value <= maximum:
        raise InvalidArgument(f"{field} must be between 1 and {maximum}, got {value}")
    return value


def gpu_on_this_host() -> bool:
    """An NVIDIA device node is present (cheaper than importing torch to ask CUDA)."""
    return any(Path("/dev").glob("nvidia[0-9]*"))
