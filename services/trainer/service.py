"""The trainer's domain logic: plain Python, no gRPC. Raises services.common.errors.*.

Two kinds of job share this machinery: training jobs, and optimization jobs (quantize, prune,
distil or export an existing version, whose artifact is fetched into the job folder at creation).
A job is validated and its dataset fetched when it is created, so a bad request fails at once
and never reaches a worker. Queued jobs start as slots free up (fair between tenants); each
runs in its own worker process whose events are stored in order and fanned out to watchers.
A finished worker's artifact is registered in the registry; only then is the job SUCCEEDED.
On start-up, jobs a previous trainer left RUNNING are queued again and resume from their
checkpoint, or are marked FAILED when they cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prometheus_client import Gauge

from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, MaasError
from services.common.validation import Page, check_id_prefix, check_name
from services.trainer import data as datasets
from services.trainer.config import TrainerSettings
from services.trainer.optimization_spec import (
    PARENT_METRICS_KEY,
    TRAINING_SPEC_KEY,
    OptimizationSpec,
    SourceVersion,
    check_source,
    check_uploaded_data,
    resolve_optimization,
    student_spec,
)
from services.trainer.registry_link import Registration, RegistryLink
from services.trainer.retrain import RETRAIN_KEY_PREFIX
from services.trainer.runner import WorkerProcess, launch, log_tail, pick_next, running_by_tenant
from services.trainer.spec import DatasetInfo, TrainingSpec, check_fits, resolve
from services.trainer.store import EventRecord, JobRecord, JobState, JobStore, now
from services.trainer.worker import JOB_FILE

log = logging.getLogger(__name__)

Launcher = Callable[[Path, int, int], Awaitable[WorkerProcess]]
WATCH_QUEUE_SIZE = 1000
ACTIVE = (JobState.QUEUED, JobState.RUNNING)
# The version an optimization job starts from, downloaded into its folder when it is created.
SOURCE_ARTIFACT = "source.pt"
# Read by the queue-backlog alert; set on every scheduling pass (job created, started, ended).
QUEUED_JOBS = Gauge("maas_trainer_queued_jobs", "Jobs waiting for a worker slot")
RUNNING_JOBS = Gauge("maas_trainer_running_jobs", "Jobs with a worker running")
PROGRESS_FIELDS = ("epoch", "epochs", "step", "total_steps", "loss", "metrics", "samples_per_second", "eta_seconds")


@dataclass
class RunningJob:
    job: JobRecord
    task: asyncio.Task[None] | None = None
    process: WorkerProcess | None = None
    cancelled: bool = False
    registering: bool = False
    # The job's latest progress, plus the epoch of its newest checkpoint (what a restart resumes).
    progress: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)  # compared and hashed by identity: watchers live in sets
class Watcher:
    queue: asyncio.Queue[EventRecord] = field(default_factory=lambda: asyncio.Queue(WATCH_QUEUE_SIZE))
    # Set when the queue overflowed: the watcher re-reads the store instead.
    lagged: bool = False


class Trainer:
    def __init__(
        self, store: JobStore, registry: RegistryLink, settings: TrainerSettings, launcher: Launcher = launch
    ) -> None:
        self._store = store
        self._registry = registry
        self._settings = settings
        self._launch = launcher
        self._running: dict[str, RunningJob] = {}
        self._watchers: dict[str, set[Watcher]] = {}
        self._last_start: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._stopping = False

    # Life cycle

    async def start(self) -> None:
        await self._recover()
        self._loop = asyncio.create_task(self._schedule_forever())
        self._wake.set()

    async def stop(self) -> None:
        """Stop every worker but leave its job RUNNING: the next start resumes it."""
        self._stopping = True
        if self._loop:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        running = list(self._running.values())
        await asyncio.gather(*(r.process.stop(0.2) for r in running if r.process), return_exceptions=True)
        await asyncio.gather(*(r.task for r in running if r.task), return_exceptions=True)

    # The API

    async def create_training_job(
        self, tenant: str, spec: TrainingSpec, model: str, parent_version: int, job_id: str = ""
    ) -> JobRecord:
        """Queue a training job. `job_id`: an id from new_job_id() chosen beforehand (a retraining
        run stores it first, so that a restart finds the job or creates it, never two)."""
        check_name("model", model)
        if parent_version < 0:
            raise InvalidArgument("parent_version must be a version number, or 0 for none")
        spec = self._resolve(spec)
        if job_id and await self.find_job(job_id) is not None:
            raise AlreadyExists(f"job {job_id} exists already")
        job_id, folder = self._new_folder(job_id)
        try:
            config, dataset_version = await self._prepare(tenant, spec, folder)
            if parent_version:
                await self._registry.check_version(tenant, model, parent_version)
            job = await self._queue(JobRecord(
                id=job_id, tenant=tenant, kind="training", state=JobState.QUEUED, spec=spec.to_dict(),
                model=model, parent_version=parent_version, dataset_version=dataset_version, create_time=now(),
                message="queued",
            ), config)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        log.info("job queued", extra={"job": job_id, "tenant": tenant, "architecture": spec.architecture})
        return job

    async def create_optimization_job(self, tenant: str, spec: OptimizationSpec, model: str) -> JobRecord:
        """Queue a job that quantizes, prunes, distils or exports `spec.model` version
        `spec.version`; its result becomes a new version of `model` (default: the same model)."""
        check_name("model", spec.model)
        model = model or spec.model
        check_name("model", model)
        spec = resolve_optimization(spec, max_epochs=self._settings.trainer_max_epochs)
        job_id, folder = self._new_folder()
        try:
            source = await self._registry.fetch_version(tenant, spec.model, spec.version, folder / SOURCE_ARTIFACT)
            data = check_source(spec, source)
            # Quantized, pruned, distilled or exported, the result carries the source's weights.
            no_download = await self._registry.no_download(tenant, spec.model)
            if no_download and model != spec.model:
                await self._registry.check_no_download_target(tenant, model, spec.model)
            if source.trained:
                assert data is not None
                training = replace(data, device=spec.device)
                students = [self._resolve(student_spec(spec, training))] if spec.method == "distill" else []
                config, dataset_version = await self._prepare(tenant, training, folder, students)
            else:
                config, dataset_version = await self._prepare_uploaded(tenant, spec, source, data, folder)
            config.update(kind="optimization", optimization=spec.to_dict(),
                          source={"model": source.model, "version": source.version, "metadata": source.metadata,
                                  "format": source.format, "signature": source.signature,
                                  "no_download": no_download})
            job = await self._queue(JobRecord(
                id=job_id, tenant=tenant, kind="optimization", state=JobState.QUEUED, spec=spec.to_dict(),
                # Lineage links versions of one model; another target model names its parent in metadata.
                model=model, parent_version=spec.version if model == spec.model else 0,
                dataset_version=dataset_version, create_time=now(), message="queued",
            ), config)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        log.info("job queued", extra={"job": job_id, "tenant": tenant, "optimization": spec.summary})
        return job

    async def find_job(self, job_id: str) -> JobRecord | None:
        """The job with exactly this id, of any tenant (for the trainer's own bookkeeping)."""
        return await asyncio.to_thread(self._store.find, job_id)

    async def get_job(self, tenant: str, job_id: str) -> JobRecord:
        """The tenant's job `job_id` names: its id or a unique prefix of it."""
        _check_job_id(job_id)
        return await asyncio.to_thread(self._store.get, tenant, job_id)

    async def list_jobs(
        self, tenant: str, state: JobState | None, page_size: int, page_token: str
    ) -> tuple[list[JobRecord], str]:
        page = Page.parse(page_size, page_token)
        jobs = await asyncio.to_thread(self._store.list, tenant, state, page.after, page.size + 1)
        if len(jobs) > page.size:
            jobs = jobs[: page.size]
            return jobs, Page.token_after(jobs[-1].id)
        return jobs, ""

    async def cancel_job(self, tenant: str, job_id: str) -> JobRecord:
        job = await self.get_job(tenant, job_id)
        job_id = job.id  # the whole id, where a prefix was given
        if job.state.terminal:
            raise FailedPrecondition(f"job {job_id} is already {job.state.value}; only queued or running jobs can be cancelled")
        running = self._running.get(job_id)
        if running and running.registering:
            raise FailedPrecondition(f"job {job_id} has finished training and is registering its result")
        if running:
            running.cancelled = True
        changed = await self._finish(job_id, ACTIVE, JobState.CANCELLED, "cancelled by the caller")
        if changed is None:  # it finished meanwhile
            return await self.get_job(tenant, job_id)
        if running and running.process:
            await running.process.stop(self._settings.trainer_stop_grace_seconds)
        self._wake.set()
        return changed

    async def watch_job(self, tenant: str, job_id: str, after_sequence: int) -> AsyncIterator[EventRecord]:
        """The job's stored events after `after_sequence`, then live ones until the terminal event."""
        job_id = (await self.get_job(tenant, job_id)).id  # the whole id, where a prefix was given
        if after_sequence < 0:
            raise InvalidArgument("after_sequence must not be negative")
        watcher = Watcher()
        self._watchers.setdefault(job_id, set()).add(watcher)
        last = after_sequence
        try:
            while True:
                # History first; again whenever live events skip a number or the queue overflowed.
                for event in await asyncio.to_thread(self._store.events, job_id, last):
                    yield event
                    last = event.sequence
                    if event.kind == "finished":
                        return
                watcher.lagged = False
                while not watcher.lagged:
                    event = await watcher.queue.get()
                    if event.sequence <= last:
                        continue
                    if event.sequence > last + 1:
                        break
                    yield event
                    last = event.sequence
                    if event.kind == "finished":
                        return
                while not watcher.queue.empty():
                    watcher.queue.get_nowait()
        finally:
            watchers = self._watchers.get(job_id, set())
            watchers.discard(watcher)
            if not watchers:
                self._watchers.pop(job_id, None)

    # Preparing a job

    def _resolve(self, spec: TrainingSpec) -> TrainingSpec:
        return resolve(spec, max_epochs=self._settings.trainer_max_epochs, max_workers=self._settings.trainer_max_workers)

    def _new_folder(self, job_id: str = "") -> tuple[str, Path]:
        if job_id:
            # A chosen id's folder may be left from a creation a restart interrupted (no job row).
            shutil.rmtree(self._folder(job_id), ignore_errors=True)
        job_id = job_id or new_job_id()
        folder = self._folder(job_id)
        folder.mkdir(parents=True)
        return job_id, folder

    async def _queue(self, job: JobRecord, config: dict[str, Any]) -> JobRecord:
        await asyncio.to_thread((self._folder(job.id) / JOB_FILE).write_text, json.dumps(config))
        queued = await asyncio.to_thread(self._store.in_states, [JobState.QUEUED])
        job = await asyncio.to_thread(self._store.create, job, ("queued", {"position": len(queued)}))
        self._wake.set()
        return job

    async def _prepare(
        self, tenant: str, spec: TrainingSpec, folder: Path, also_fits: Sequence[TrainingSpec] = ()
    ) -> tuple[dict[str, Any], int]:
        """Check the spec (and `also_fits`, e.g. a distillation student) against its dataset;
        fetch a registry dataset into the job folder."""
        config, dataset_version, info = await self._fetch_data(tenant, spec, folder)
        for fitting in (spec, *also_fits):
            check_fits(fitting, info)
        await self._check_device(spec.device)
        return config, dataset_version

    async def _prepare_uploaded(
        self, tenant: str, spec: OptimizationSpec, source: SourceVersion, data: TrainingSpec | None, folder: Path
    ) -> tuple[dict[str, Any], int]:
        """_prepare for a version optimized as the artifact it is (no network to rebuild): its data,
        if any, must fit its signature, and a distillation student the data as the job reshapes it."""
        config: dict[str, Any] = {"spec": None}
        dataset_version = 0
        if data is not None:
            config, dataset_version, info = await self._fetch_data(tenant, data, folder)
            info = check_uploaded_data(spec, source, data, info)
            if spec.method == "distill":
                check_fits(self._resolve(student_spec(spec, data)), info)
        await self._check_device(spec.device)
        config["uploaded"] = True
        return config, dataset_version

    async def _fetch_data(
        self, tenant: str, spec: TrainingSpec, folder: Path
    ) -> tuple[dict[str, Any], int, DatasetInfo]:
        """The job config naming the spec's data, the registry dataset version (0 for built-in data)
        and the data's description; a registry dataset is fetched into the job folder."""
        config: dict[str, Any] = {"spec": spec.to_dict()}
        if spec.builtin:
            info = await asyncio.to_thread(datasets.describe_builtin, spec.dataset)
            return config, 0, info
        check_name("dataset", spec.dataset)
        if spec.dataset_version < 0:
            raise InvalidArgument("dataset version must be a version number, or 0 for the newest")
        fetched = await self._registry.fetch_dataset(tenant, spec.dataset, spec.dataset_version, folder)
        info = await asyncio.to_thread(
            datasets.describe_file, spec.dataset, fetched.path, fetched.format, fetched.target_column, spec.task
        )
        config.update(dataset_file=fetched.path.name, dataset_format=fetched.format,
                      target_column=fetched.target_column)
        return config, fetched.version, info

    async def _check_device(self, device: str) -> None:
        if device == "cuda" and not await asyncio.to_thread(_cuda_available):
            raise FailedPrecondition("device cuda was asked for, but this trainer has no CUDA device: use auto or cpu")

    # Scheduling and running

    async def _schedule_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._start_what_fits()
            except Exception:
                log.exception("scheduling failed; retrying shortly")
                await asyncio.sleep(1.0)
                self._wake.set()

    async def _start_what_fits(self) -> None:
        while not self._stopping:
            queued = await asyncio.to_thread(self._store.in_states, [JobState.QUEUED])
            QUEUED_JOBS.set(len(queued))
            RUNNING_JOBS.set(len(self._running))
            job = pick_next(
                queued,
                running_by_tenant([r.job for r in self._running.values()]),
                global_limit=self._settings.trainer_max_running_jobs,
                tenant_limit=self._settings.trainer_max_running_jobs_per_tenant,
                last_start=self._last_start,
            )
            if job is None:
                return
            changed = await asyncio.to_thread(
                self._store.transition, job.id, [JobState.QUEUED], JobState.RUNNING, None,
                start_time=job.start_time or now(), attempts=job.attempts + 1, message="starting",
            )
            if changed is None:
                continue  # cancelled meanwhile
            started, _ = changed
            self._last_start[job.tenant] = time.monotonic()
            running = self._running[job.id] = RunningJob(started, progress=dict(started.progress))
            running.task = asyncio.create_task(self._run(running))

    async def _run(self, running: RunningJob) -> None:
        job = running.job
        folder = self._folder(job.id)
        try:
            config = json.loads(await asyncio.to_thread((folder / JOB_FILE).read_text))
            config["threads"] = self._settings.threads_per_job()
            await asyncio.to_thread((folder / JOB_FILE).write_text, json.dumps(config))
            running.process = await self._launch(folder, int(job.spec.get("workers", 1)), config["threads"])
            if running.cancelled or self._stopping:  # either came while the worker was starting
                await running.process.stop(self._settings.trainer_stop_grace_seconds)
            result, error = await self._follow(running)
            code = await running.process.wait()
            if running.cancelled or self._stopping:
                return
            if code == 0 and result:
                await self._register(running, result, config)
                return
            reason = error or f"the worker exited with code {code}: {log_tail(folder) or 'no output'}"
            await self._finish(job.id, [JobState.RUNNING], JobState.FAILED, reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("job failed in the trainer", extra={"job": job.id})
            await self._finish(job.id, [JobState.RUNNING], JobState.FAILED, f"the trainer could not run the job: {exc}")
        finally:
            self._running.pop(job.id, None)
            self._wake.set()

    async def _follow(self, running: RunningJob) -> tuple[dict[str, Any] | None, str]:
        """Store and fan out the worker's events; returns its result event and error message."""
        assert running.process is not None
        result, error = None, ""
        async for event in running.process.events():
            kind = event.pop("type", "")
            if kind == "result":
                result = event
            elif kind == "error":
                error = str(event.get("message", ""))[:4000]
            elif kind == "started":
                event["attempt"] = running.job.attempts
                # torch names a GPU "cuda" or "cuda:N"; the job is billed by the kind of device.
                device = "cuda" if str(event.get("device", "")).startswith("cuda") else "cpu"
                await self._emit(running.job.id, "started", event, message="running", device=device)
            elif kind == "progress":
                running.progress.update({k: event.get(k) for k in PROGRESS_FIELDS})
                await self._emit(running.job.id, "progress", event, progress=dict(running.progress))
            elif kind == "checkpoint":
                running.progress["checkpoint_epoch"] = event.get("epoch", 0)
                await self._emit(running.job.id, kind, event, progress=dict(running.progress))
            elif kind == "log":
                await self._emit(running.job.id, kind, event)
        return result, error

    async def _register(self, running: RunningJob, result: dict[str, Any], config: dict[str, Any]) -> None:
        job = running.job
        running.registering = True
        metrics = _finite(result["metrics"])
        # The spec of the data (and, for training, the network): what an optimization job rebuilds.
        # None for an uploaded version optimized without a dataset.
        data = TrainingSpec.from_dict(config["spec"]) if config["spec"] else None
        metadata = {**result["metadata"], "job": job.id}
        if data:
            metadata["dataset"] = f"builtin:{data.dataset}" if data.builtin else f"registry:{data.dataset}"
        if job.kind == "optimization":
            spec = OptimizationSpec.from_dict(job.spec)
            # A retraining verdict judged the parent, not what is made of it.
            inherited = {k: v for k, v in config["source"]["metadata"].items() if not k.startswith(RETRAIN_KEY_PREFIX)}
            if spec.method == "distill":  # another network: only the student's own training spec describes it
                inherited.pop(TRAINING_SPEC_KEY, None)
            # The parent's measurements travel with the child: the parent's own version predates them.
            metadata = {**inherited, **metadata, "optimization": spec.summary,
                        "parent": f"{spec.model}:{spec.version}",
                        PARENT_METRICS_KEY: json.dumps(_finite(result.get("parent_metrics", {})))}
            hyperparameters = spec.lineage_hyperparameters()
            source, source_no_download = spec.model, bool(config["source"].get("no_download"))
        else:
            assert data is not None
            metadata[TRAINING_SPEC_KEY] = json.dumps(data.to_dict())
            hyperparameters = data.lineage_hyperparameters()
            source, source_no_download = "", False
        registration = Registration(
            model=job.model, artifact=self._folder(job.id) / result["artifact"], signature=result["signature"],
            metrics=metrics, metadata=metadata, job_id=job.id, dataset="" if not data or data.builtin else data.dataset,
            dataset_version=job.dataset_version, parent_version=job.parent_version,
            hyperparameters=hyperparameters, format=result.get("format", "TORCHSCRIPT"),
            precision=result.get("precision", "fp32"), source=source, source_no_download=source_no_download,
        )
        try:
            version = await self._registry.register(job.tenant, registration)
        except MaasError as exc:
            await self._finish(job.id, [JobState.RUNNING], JobState.FAILED, f"registering the result failed: {exc}")
            return
        outcome = {"model": job.model, "version": version, "metrics": metrics}
        if "parent_metrics" in result:
            outcome["parent_metrics"] = _finite(result["parent_metrics"])
        await self._finish(job.id, [JobState.RUNNING], JobState.SUCCEEDED,
                           f"registered as {job.model} version {version}", result=outcome)

    async def _finish(
        self, job_id: str, from_states: Any, state: JobState, reason: str, result: dict[str, Any] | None = None
    ) -> JobRecord | None:
        payload = {"state": state.value, "reason": reason, "result": result or {}}
        fields: dict[str, Any] = {"end_time": now(), "message": reason}
        if result:
            fields["result"] = result
        changed = await asyncio.to_thread(
            self._store.transition, job_id, from_states, state, ("finished", payload), **fields
        )
        if changed is None:
            return None
        job, event = changed
        log.info("job finished", extra={"job": job_id, "state": state.value, "reason": reason[:200]})
        if event:
            self._publish(event)
        return job

    async def _emit(self, job_id: str, kind: str, payload: dict[str, Any], **fields: Any) -> None:
        for event in await asyncio.to_thread(self._store.add_events, job_id, [(kind, payload)], **fields):
            self._publish(event)

    def _publish(self, event: EventRecord) -> None:
        for watcher in self._watchers.get(event.job_id, ()):
            try:
                watcher.queue.put_nowait(event)
            except asyncio.QueueFull:
                watcher.lagged = True

    # Recovery after a restart

    async def _recover(self) -> None:
        for job in await asyncio.to_thread(self._store.in_states, [JobState.RUNNING]):
            folder = self._folder(job.id)
            if job.attempts >= self._settings.trainer_max_attempts:
                await self._finish(job.id, [JobState.RUNNING], JobState.FAILED,
                                   f"the trainer stopped while the job ran, {job.attempts} times: giving up")
            elif not (folder / JOB_FILE).exists():
                await self._finish(job.id, [JobState.RUNNING], JobState.FAILED,
                                   f"the trainer restarted and the job's folder {folder} is gone: it cannot resume")
            else:
                epoch = int(job.progress.get("checkpoint_epoch", 0))
                line = (f"the trainer restarted while this job ran; it resumes from its checkpoint of epoch {epoch}"
                        if epoch else "the trainer restarted before the first checkpoint; the job starts over")
                await asyncio.to_thread(
                    self._store.transition, job.id, [JobState.RUNNING], JobState.QUEUED,
                    ("log", {"level": "warning", "message": line}), message="queued to resume",
                )
                log.warning("job requeued after a restart", extra={"job": job.id, "checkpoint_epoch": epoch})

    def _folder(self, job_id: str) -> Path:
        return self._settings.trainer_jobs_dir / job_id


def new_job_id() -> str:
    """job-<12 hex digits of milliseconds><8 random hex digits>: ids sort by creation time."""
    return f"job-{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


def _check_job_id(job_id: str) -> None:
    if not job_id.startswith("job-") or len(job_id) > 40 or not job_id[4:].isalnum():
        raise InvalidArgument(f"invalid job id {job_id[:60]!r}: job ids look like job-0193a2b4c5d6e7f8a9b0")
    check_id_prefix("job id", job_id, start="job-")


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
