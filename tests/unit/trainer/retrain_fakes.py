"""Stand-ins for what retraining talks to, for unit tests only: the registry, the inference
service, the trainer's jobs and the evaluation, all in memory, with a clock the test moves."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.common.database import make_engine, upgrade
from services.common.errors import FailedPrecondition, MaasError, NotFound
from services.trainer.optimization_spec import TRAINING_SPEC_KEY
from services.trainer.retrain import DeploymentInfo, Evaluation, EvaluationRequest, Retrainer, VersionInfo
from services.trainer.retrain_store import RetrainStore
from services.trainer.server import MIGRATIONS
from services.trainer.service import new_job_id
from services.trainer.spec import TrainingSpec, resolve
from services.trainer.store import JobRecord, JobState

TENANT = "tenant-a"
SPEC = resolve(TrainingSpec(architecture="mlp", dataset="iris-data", builtin=False, dataset_version=1, epochs=3),
               max_epochs=100, max_workers=1)
TRAINED = {TRAINING_SPEC_KEY: json.dumps(SPEC.to_dict()), "task": "classification"}


class Clock:
    def __init__(self) -> None:
        self.moment = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.moment

    def advance(self, seconds: float) -> None:
        self.moment += timedelta(seconds=seconds)


class FakeRegistry:
    def __init__(self) -> None:
        self.versions: dict[tuple[str, str], dict[int, VersionInfo]] = {}
        self.datasets: dict[tuple[str, str], int] = {}
        self.aliases: dict[tuple[str, str, str], int] = {}
        self.updates: list[tuple[str, int, dict[str, str]]] = []
        self.fail_next: dict[str, MaasError] = {}

    def add_version(self, model: str, metadata: dict[str, str] | None = None, tenant: str = TENANT) -> int:
        versions = self.versions.setdefault((tenant, model), {})
        number = max(versions, default=0) + 1
        versions[number] = VersionInfo(number, True, dict(metadata if metadata is not None else TRAINED))
        return number

    def metadata(self, model: str, version: int, tenant: str = TENANT) -> dict[str, str]:
        return self.versions[(tenant, model)][version].metadata

    def _failing(self, method: str) -> None:
        if method in self.fail_next:
            raise self.fail_next.pop(method)

    def _model(self, tenant: str, model: str) -> dict[int, VersionInfo]:
        if (tenant, model) not in self.versions:
            raise NotFound(f"model {model!r} not found")
        return self.versions[(tenant, model)]

    async def get_version(self, tenant: str, model: str, version: int) -> VersionInfo:
        self._failing("get_version")
        versions = self._model(tenant, model)
        if version not in versions:
            raise NotFound(f"model {model!r} has no version {version}")
        return versions[version]

    async def list_versions(self, tenant: str, model: str) -> list[VersionInfo]:
        self._failing("list_versions")
        return list(self._model(tenant, model).values())

    async def alias_version(self, tenant: str, model: str, alias: str) -> int | None:
        return self.aliases.get((tenant, model, alias))

    async def latest_dataset_version(self, tenant: str, dataset: str) -> int:
        self._failing("latest_dataset_version")
        if (tenant, dataset) not in self.datasets:
            raise NotFound(f"dataset {dataset!r} not found")
        return self.datasets[(tenant, dataset)]

    async def update_version_metadata(self, tenant: str, model: str, version: int, entries: dict[str, str]) -> None:
        self._failing("update_version_metadata")
        info = self._model(tenant, model)[version]
        self.versions[(tenant, model)][version] = replace(info, metadata={**info.metadata, **entries})
        self.updates.append((model, version, dict(entries)))

    async def set_alias(self, tenant: str, model: str, alias: str, version: int) -> None:
        self._failing("set_alias")
        self.aliases[(tenant, model, alias)] = version


class FakeInference:
    def __init__(self) -> None:
        self.deployments: dict[tuple[str, str], DeploymentInfo] = {}
        self.calls: list[tuple[str, ...]] = []

    def deploy(self, name: str, model: str, version: int, alias: str = "", tenant: str = TENANT) -> None:
        self.deployments[(tenant, name)] = DeploymentInfo(name, model, version, alias=alias)

    def get(self, name: str, tenant: str = TENANT) -> DeploymentInfo:
        return self.deployments[(tenant, name)]

    def set_canary_state(self, name: str, state: str, message: str = "") -> None:
        self.deployments[(TENANT, name)] = replace(self.get(name), canary_state=state, canary_message=message)

    def roll_back(self, name: str, reason: str) -> None:
        """What the inference service (or the gateway's quality check) does on its own."""
        deployment = self.get(name)
        self.deployments[(TENANT, name)] = replace(
            deployment, canary_version=0, canary_state="",
            message=f"canary version {deployment.canary_version} rolled back: {reason}",
        )

    async def get_deployment(self, tenant: str, name: str) -> DeploymentInfo:
        if (tenant, name) not in self.deployments:
            raise NotFound(f"deployment {name!r} not found")
        return self.deployments[(tenant, name)]

    async def start_canary(self, tenant: str, name: str, version: int, weight: int, max_error_rate: float) -> None:
        self.calls.append(("start_canary", name, str(version), str(weight), str(max_error_rate)))
        deployment = self.deployments[(tenant, name)]
        if deployment.canary_version == version:
            return
        self.deployments[(tenant, name)] = replace(deployment, canary_version=version, canary_state="LOADING")

    async def promote_canary(self, tenant: str, name: str) -> None:
        self.calls.append(("promote_canary", name))
        deployment = self.deployments[(tenant, name)]
        if deployment.canary_state != "READY":
            raise FailedPrecondition("canary is not READY")
        self.deployments[(tenant, name)] = replace(
            deployment, resolved_version=deployment.canary_version, canary_version=0, canary_state=""
        )

    async def rollback_canary(self, tenant: str, name: str) -> None:
        self.calls.append(("rollback_canary", name))
        deployment = self.deployments[(tenant, name)]
        self.deployments[(tenant, name)] = replace(deployment, canary_version=0, canary_state="")


class FakeJobs:
    """The trainer's jobs; `finish` plays a job that trained and registered a version."""

    def __init__(self, registry: FakeRegistry, clock: Clock) -> None:
        self.registry = registry
        self.clock = clock
        self.jobs: dict[str, JobRecord] = {}
        self.created: list[tuple[str, TrainingSpec, str, int, str]] = []
        self.cancelled: list[str] = []
        self.fail_next: MaasError | None = None

    async def create_training_job(
        self, tenant: str, spec: TrainingSpec, model: str, parent_version: int, job_id: str = ""
    ) -> JobRecord:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        job = JobRecord(id=job_id or new_job_id(), tenant=tenant, kind="training", state=JobState.QUEUED,
                        spec=spec.to_dict(), model=model, parent_version=parent_version,
                        dataset_version=spec.dataset_version, create_time=self.clock())
        self.jobs[job.id] = job
        self.created.append((tenant, spec, model, parent_version, job.id))
        return job

    async def find_job(self, job_id: str) -> JobRecord | None:
        return self.jobs.get(job_id)

    async def cancel_job(self, tenant: str, job_id: str) -> JobRecord:
        self.cancelled.append(job_id)
        self.jobs[job_id] = replace(self.jobs[job_id], state=JobState.CANCELLED, message="cancelled by the caller")
        return self.jobs[job_id]

    def finish(self, job_id: str, model: str = "iris") -> int:
        job = self.jobs[job_id]
        version = self.registry.add_version(model, {**TRAINED, "job": job_id}, tenant=job.tenant)
        self.jobs[job_id] = replace(job, state=JobState.SUCCEEDED, result={"model": model, "version": version},
                                    message=f"registered as {model} version {version}")
        return version

    def fail(self, job_id: str, message: str) -> None:
        self.jobs[job_id] = replace(self.jobs[job_id], state=JobState.FAILED, message=message)


@dataclass
class FakeEvaluator:
    """Each version's metric by number; `hold` makes evaluations wait (a trainer killed midway)."""

    metrics: dict[int, float] = field(default_factory=dict)
    samples: int = 23
    requests: list[EvaluationRequest] = field(default_factory=list)
    hold: asyncio.Event | None = None
    fail_next: MaasError | None = None

    async def evaluate(self, tenant: str, request: EvaluationRequest) -> Evaluation:
        self.requests.append(request)
        if self.hold is not None:
            await self.hold.wait()
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        serving = self.metrics[request.serving_version] if request.serving_version else None
        return Evaluation(self.metrics[request.candidate_version], serving, self.samples)


@dataclass
class World:
    """Everything a Retrainer needs, shared by the retrainers a test starts (one per 'process')."""

    store: RetrainStore
    registry: FakeRegistry
    inference: FakeInference
    jobs: FakeJobs
    evaluator: FakeEvaluator
    clock: Clock

    def retrainer(self) -> Retrainer:
        return Retrainer(self.store, self.registry, self.inference, self.jobs, self.evaluator,
                         new_job_id=new_job_id, clock=self.clock)


def make_world(folder: Path) -> World:
    engine = make_engine(f"sqlite:///{folder / 'trainer.db'}")
    upgrade(engine, MIGRATIONS)
    registry, clock = FakeRegistry(), Clock()
    registry.add_version("iris")  # version 1: trained on iris-data version 1
    registry.datasets[(TENANT, "iris-data")] = 1
    return World(RetrainStore(engine), registry, FakeInference(), FakeJobs(registry, clock), FakeEvaluator(), clock)


def events_of(world: World, model: str = "iris", tenant: str = TENANT) -> list[str]:
    return [event.step for event in world.store.events(tenant, model, 1000)]


def only(items: list[Any]) -> Any:
    assert len(items) == 1, items
    return items[0]
