"""Continuous retraining with an evaluation gate: plain Python, no gRPC. Raises services.common.errors.*.

A model's policy names what starts a run (a new version of its dataset, a schedule, drift on its
deployment, or a person), the training spec to reuse (the one that made `from_version`), the
metric a candidate must improve by `min_gain` over the serving version, and what happens to a
winner: registered only, an alias moved to it, or a canary on the deployment promoted once it
held for a window.

A run is a normal training job (queued, run, resumed and listed like any other) on the policy's
dataset at the run's version, registered as a new version of the model. The candidate and the
serving version are then measured on the same held-out split: the test split of that dataset
version as training splits it (the spec's seed and fractions). The candidate is labelled with
the verdict and the comparison (version metadata maas.retrain.*); a loser changes nothing else.

Every step is stored before the next is taken, so a trainer killed at any point carries the run
on when it starts again: a TRAINING run follows its job (which resumes as jobs do), an
EVALUATING run without a stored evaluation is evaluated again from scratch, one with it carries
out its verdict (each step of which may be repeated safely), and a ROLLING_OUT run goes on
waiting for its window. A candidate is never rolled out before its evaluation is stored.

`tick` is one round of the retrain loop: only the trainer holding the leader lock calls it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from services.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MaasError,
    NotFound,
    Unavailable,
)
from services.common.summaries import DEFAULT_THRESHOLD
from services.common.validation import check_name
from services.trainer.optimization_spec import TRAINING_SPEC_KEY
from services.trainer.retrain_store import (
    Action,
    Policy,
    RetrainEvent,
    RetrainStore,
    Run,
    RunState,
    TenantEvent,
    Trigger,
)
from services.trainer.spec import TrainingSpec
from services.trainer.store import JobRecord, JobState, now

log = logging.getLogger(__name__)

# Version metadata the verdict is written to (the registry lets the trainer set maas.retrain.*).
RETRAIN_KEY_PREFIX = "maas.retrain."
VERDICT_KEY = "maas.retrain.verdict"
COMPARISON_KEY = "maas.retrain.comparison"
RUN_KEY = "maas.retrain.run"
ROLLBACK_KEY = "maas.retrain.rollback"
ACCEPTED, REJECTED, ROLLED_BACK = "accepted", "rejected", "rolled_back"

METRICS = {"classification": "accuracy", "regression": "r2"}
DEFAULT_CANARY_WEIGHT_PERCENT = 10
DEFAULT_CANARY_WINDOW_SECONDS = 60
DEFAULT_CANARY_MAX_ERROR_RATE = 0.05
DEFAULT_COOLDOWN_SECONDS = 600
MIN_INTERVAL_SECONDS = 60
MAX_SECONDS = 365 * 24 * 3600
# GetRetrainPolicy: the newest runs, and the latest events.
SHOWN_RUNS = 20
SHOWN_EVENTS = 100
# Failures worth waiting out: the next round tries the same step again.
PASSING = (Unavailable, DeadlineExceeded)
# ListRetrainEvents: events per call by default, and at most.
EVENT_PAGE = 500
MAX_EVENT_PAGE = 5000
# ListRetrainEvents hands out only events at least this old. In PostgreSQL an event whose
# transaction is still open can hold a smaller id than one already committed: a reader moving its
# cursor past the committed one would never see it. Stamping and storing an event takes far less.
EVENT_SETTLE_SECONDS = 1.0


@dataclass(frozen=True)
class VersionInfo:
    version: int
    ready: bool  # READY (not archived)
    metadata: dict[str, str]


@dataclass(frozen=True)
class DeploymentInfo:
    name: str
    model: str
    resolved_version: int
    alias: str = ""  # the alias it follows; "" when pinned to a version
    canary_version: int = 0  # 0: no canary
    canary_state: str = ""  # LOADING, READY or FAILED
    canary_message: str = ""
    message: str = ""  # e.g. why the last canary was rolled back


@dataclass(frozen=True)
class EvaluationRequest:
    run_id: str
    model: str
    candidate_version: int
    serving_version: int  # 0: none to compare with
    dataset: str
    dataset_version: int
    spec: dict[str, Any]  # the training spec: its seed and fractions make the split
    metric: str


@dataclass(frozen=True)
class Evaluation:
    candidate: float
    serving: float | None  # None when there was no serving version
    samples: int  # of the test split


class RetrainRegistry(Protocol):
    async def get_version(self, tenant: str, model: str, version: int) -> VersionInfo: ...
    async def list_versions(self, tenant: str, model: str) -> list[VersionInfo]: ...
    async def alias_version(self, tenant: str, model: str, alias: str) -> int | None: ...
    async def latest_dataset_version(self, tenant: str, dataset: str) -> int: ...
    async def update_version_metadata(self, tenant: str, model: str, version: int, entries: dict[str, str]) -> None: ...
    async def set_alias(self, tenant: str, model: str, alias: str, version: int) -> None: ...


class RetrainInference(Protocol):
    async def get_deployment(self, tenant: str, name: str) -> DeploymentInfo: ...
    async def start_canary(self, tenant: str, name: str, version: int, weight: int, max_error_rate: float) -> None: ...
    async def promote_canary(self, tenant: str, name: str) -> None: ...
    async def rollback_canary(self, tenant: str, name: str) -> None: ...


class JobRunner(Protocol):
    """The trainer's own jobs: what CreateTrainingJob, GetJob and CancelJob do."""

    async def create_training_job(
        self, tenant: str, spec: TrainingSpec, model: str, parent_version: int, job_id: str = ""
    ) -> JobRecord: ...
    async def find_job(self, job_id: str) -> JobRecord | None: ...
    async def cancel_job(self, tenant: str, job_id: str) -> JobRecord: ...


class Evaluator(Protocol):
    async def evaluate(self, tenant: str, request: EvaluationRequest) -> Evaluation: ...


def resolve_policy(policy: Policy) -> Policy:
    """The policy with its defaults; InvalidArgument for settings that can never work. The
    metric's default and its fit with the model's task are checked once the task is known."""
    check_name("model", policy.model)
    if policy.trigger is None:
        raise InvalidArgument("choose a trigger: new-dataset-version, schedule or drift")
    check_name("dataset", policy.dataset)
    if policy.from_version < 0:
        raise InvalidArgument("from_version must be a version number, or 0 for the newest version training made")
    schedule = policy.trigger is Trigger.SCHEDULE
    if schedule and not MIN_INTERVAL_SECONDS <= policy.interval_seconds <= MAX_SECONDS:
        raise InvalidArgument(
            f"a schedule needs interval_seconds between {MIN_INTERVAL_SECONDS} and {MAX_SECONDS}, "
            f"got {policy.interval_seconds}"
        )
    if not schedule and policy.interval_seconds:
        raise InvalidArgument("interval_seconds applies to the schedule trigger only")
    if policy.deployment:
        check_name("deployment", policy.deployment)
    if policy.trigger is Trigger.DRIFT and not policy.deployment:
        raise InvalidArgument("the drift trigger watches a deployment: name it (--deployment)")
    if policy.metric and policy.metric not in METRICS.values():
        raise InvalidArgument(f"unknown metric {policy.metric[:40]!r}; choose accuracy (classifiers) or r2 (regressors)")
    if not math.isfinite(policy.min_gain) or policy.min_gain < 0:
        raise InvalidArgument(f"min_gain must be a number of at least 0, got {policy.min_gain}")
    _check_action(policy)
    if policy.trigger is Trigger.DRIFT:
        threshold = policy.drift_threshold or DEFAULT_THRESHOLD
        if not math.isfinite(threshold) or threshold < 0:
            raise InvalidArgument(f"drift_threshold must be a PSI above 0, e.g. 0.2; got {policy.drift_threshold}")
    elif policy.drift_threshold:
        raise InvalidArgument("drift_threshold applies to the drift trigger only")
    else:
        threshold = 0.0
    if not 0 <= policy.cooldown_seconds <= MAX_SECONDS:
        raise InvalidArgument(f"cooldown_seconds must be between 0 and {MAX_SECONDS}, got {policy.cooldown_seconds}")
    canary = policy.action is Action.CANARY
    return replace(
        policy,
        canary_weight_percent=policy.canary_weight_percent or (DEFAULT_CANARY_WEIGHT_PERCENT if canary else 0),
        canary_window_seconds=policy.canary_window_seconds or (DEFAULT_CANARY_WINDOW_SECONDS if canary else 0),
        canary_max_error_rate=policy.canary_max_error_rate or (DEFAULT_CANARY_MAX_ERROR_RATE if canary else 0.0),
        drift_threshold=threshold,
        cooldown_seconds=policy.cooldown_seconds or DEFAULT_COOLDOWN_SECONDS,
    )


def _check_action(policy: Policy) -> None:
    action = policy.action
    if action is Action.ALIAS:
        if not policy.alias:
            raise InvalidArgument("the alias action moves an alias to a winner: name it (--alias)")
        check_name("alias", policy.alias)
    elif policy.alias:
        raise InvalidArgument("alias applies to the alias action only (--action alias)")
    canary_settings = (policy.canary_weight_percent, policy.canary_window_seconds, policy.canary_max_error_rate)
    if action is not Action.CANARY:
        if any(canary_settings):
            raise InvalidArgument("the canary settings apply to the canary action only (--action canary)")
        return
    if not policy.deployment:
        raise InvalidArgument("the canary action starts a canary on a deployment: name it (--deployment)")
    if policy.canary_weight_percent and not 1 <= policy.canary_weight_percent <= 99:
        raise InvalidArgument(f"canary_weight_percent must be between 1 and 99, got {policy.canary_weight_percent}")
    if not 0 <= policy.canary_window_seconds <= MAX_SECONDS:
        raise InvalidArgument(
            f"canary_window_seconds must be between 1 and {MAX_SECONDS}, got {policy.canary_window_seconds}"
        )
    rate = policy.canary_max_error_rate
    if not math.isfinite(rate) or not 0 <= rate <= 1:
        raise InvalidArgument(f"canary_max_error_rate must be between 0 and 1, got {rate}")


def new_run_id() -> str:
    return f"run-{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


class Retrainer:
    def __init__(
        self,
        store: RetrainStore,
        registry: RetrainRegistry,
        inference: RetrainInference,
        jobs: JobRunner,
        evaluator: Evaluator,
        *,
        new_job_id: Callable[[], str],
        clock: Callable[[], datetime] = now,
    ) -> None:
        self._store = store
        self._registry = registry
        self._inference = inference
        self._jobs = jobs
        self._evaluator = evaluator
        self._new_job_id = new_job_id
        self._clock = clock
        # Runs whose job this process is creating: the loop leaves them alone until it exists.
        self._starting: set[str] = set()

    # The API

    async def set_policy(self, tenant: str, policy: Policy) -> Policy:
        """Store (or replace) the model's policy after checking everything it names."""
        policy = resolve_policy(policy)
        spec, from_version = await self._training_spec(tenant, policy.model, policy.from_version)
        task = spec.task or _task_of(await self._registry.get_version(tenant, policy.model, from_version))
        if task not in METRICS:
            raise FailedPrecondition(
                f"{policy.model} version {from_version} has no task metadata (classification or regression), "
                "so no metric fits it: name a version the trainer trained with --from-version"
            )
        metric = policy.metric or METRICS[task]
        if metric != METRICS[task]:
            raise InvalidArgument(f"{policy.model} is a {task} model: its metric is {METRICS[task]}, not {metric}")
        latest = await self._registry.latest_dataset_version(tenant, policy.dataset)
        if policy.deployment:
            await self._check_deployment(tenant, policy)
        try:
            previous: Policy | None = await asyncio.to_thread(self._store.get_policy, tenant, policy.model)
        except NotFound:
            previous = None
        # A new policy watches for versions after the newest one now; a replaced one on the same
        # dataset keeps the newest version its runs took.
        seen = previous.last_dataset_version if previous and previous.dataset == policy.dataset else latest
        stored = await asyncio.to_thread(self._store.put_policy, replace(
            policy, tenant=tenant, from_version=from_version, metric=metric, spec=spec.to_dict(), task=task,
            create_time=self._clock(), last_dataset_version=seen,
        ))
        log.info("retrain policy set", extra={"tenant": tenant, "model": policy.model,
                                              "trigger": policy.trigger.value if policy.trigger else ""})
        return stored

    async def get_policy(self, tenant: str, model: str) -> tuple[Policy, list[Run], list[RetrainEvent]]:
        check_name("model", model)
        policy = await asyncio.to_thread(self._store.get_policy, tenant, model)
        runs = await asyncio.to_thread(self._store.runs, tenant, model, SHOWN_RUNS)
        events = await asyncio.to_thread(self._store.events, tenant, model, SHOWN_EVENTS)
        return policy, runs, events

    async def list_events(self, after_id: int, limit: int) -> list[TenantEvent]:
        """Every tenant's events with an id above `after_id`, oldest first, at most `limit` (0: the
        default), up to the first one younger than EVENT_SETTLE_SECONDS (the gateway's audit log
        copies them by id)."""
        if after_id < 0:
            raise InvalidArgument(f"after_id must be 0 or the id of an event, got {after_id}")
        if limit < 0:
            raise InvalidArgument(f"limit must not be negative, got {limit}")
        events = await asyncio.to_thread(self._store.events_after, after_id, min(limit or EVENT_PAGE, MAX_EVENT_PAGE))
        settled = self._clock() - timedelta(seconds=EVENT_SETTLE_SECONDS)
        return list(itertools.takewhile(lambda tenant_event: tenant_event.event.time <= settled, events))

    async def delete_policy(self, tenant: str, model: str) -> None:
        """Delete the policy with its history; a run in progress stops first: its job is
        cancelled and a canary it started is rolled back, so the serving version stays."""
        check_name("model", model)
        policy = await asyncio.to_thread(self._store.get_policy, tenant, model)
        run = await asyncio.to_thread(self._store.get_run, policy.active_run) if policy.active_run else None
        if run is not None and not run.state.terminal:
            await self._stop(run)
        await asyncio.to_thread(self._store.delete_policy, tenant, model)
        log.info("retrain policy deleted", extra={"tenant": tenant, "model": model})

    async def trigger(self, tenant: str, model: str) -> Run:
        """Start a run now, whatever the policy's trigger and cooldown."""
        check_name("model", model)
        policy = await asyncio.to_thread(self._store.get_policy, tenant, model)
        if policy.active_run:
            raise FailedPrecondition(
                f"run {policy.active_run} of {model}'s policy is in progress: wait for it to end "
                f"(maas models retrain status {model})"
            )
        version = await self._registry.latest_dataset_version(tenant, policy.dataset)
        if version == 0:
            raise FailedPrecondition(f"dataset {policy.dataset!r} has no versions yet: upload one first")
        run = await self._start(policy, version, "manual")
        if run is None:
            raise FailedPrecondition(f"another run of {model}'s policy started meanwhile: wait for it to end")
        return run

    async def report_drift(self, tenant: str, deployment: str, psi: float, feature: str) -> list[Run]:
        """Start the runs of the tenant's drift policies on `deployment` whose threshold `psi`
        reaches, unless they are running or cooling down."""
        check_name("tenant", tenant)
        check_name("deployment", deployment)
        if not math.isfinite(psi) or psi < 0:
            raise InvalidArgument(f"psi must be a number of at least 0, got {psi}")
        if len(feature) > 200:
            raise InvalidArgument("feature must be at most 200 characters")
        started = []
        for policy in await asyncio.to_thread(self._store.policies, tenant):
            if policy.trigger is not Trigger.DRIFT or policy.deployment != deployment or psi < policy.drift_threshold:
                continue
            if policy.active_run or self._cooling(policy):
                continue
            version = await self._registry.latest_dataset_version(tenant, policy.dataset)
            if version == 0:
                continue
            where = f" on {feature}" if feature else ""
            run = await self._start(policy, version, f"drift {psi:.3g}{where}")
            if run is not None:
                started.append(run)
        return started

    # The retrain loop

    async def tick(self) -> None:
        """One round: start the runs that triggers call for, then carry every run in progress one
        step further."""
        for policy in await asyncio.to_thread(self._store.policies):
            # One policy's trouble (its dataset deleted, the registry away) holds up no other.
            try:
                await self._check_trigger(policy)
            except MaasError as exc:
                log.warning("retrain trigger check failed", extra={"tenant": policy.tenant, "model": policy.model,
                                                                   "reason": str(exc)[:300]})
            except Exception:
                log.exception("retrain trigger check failed", extra={"tenant": policy.tenant, "model": policy.model})
        runs = await asyncio.to_thread(self._store.active_runs)
        await asyncio.gather(*(self._advance(run) for run in runs if run.id not in self._starting))

    async def _check_trigger(self, policy: Policy) -> None:
        if policy.active_run or self._cooling(policy):
            return
        if policy.trigger is Trigger.NEW_DATASET_VERSION:
            latest = await self._registry.latest_dataset_version(policy.tenant, policy.dataset)
            if latest > policy.last_dataset_version:
                await self._start(policy, latest, f"new dataset version {latest}")
        elif policy.trigger is Trigger.SCHEDULE:
            since = policy.last_run_time or policy.create_time
            assert since is not None
            if self._clock() >= since + timedelta(seconds=policy.interval_seconds):
                latest = await self._registry.latest_dataset_version(policy.tenant, policy.dataset)
                if latest:
                    await self._start(policy, latest, "schedule")

    def _cooling(self, policy: Policy) -> bool:
        last = policy.last_run_time
        return last is not None and self._clock() < last + timedelta(seconds=policy.cooldown_seconds)

    # Starting a run

    async def _start(self, policy: Policy, dataset_version: int, reason: str) -> Run | None:
        """Claim the policy and create the run's training job; None when another run holds it."""
        run = Run(
            id=new_run_id(), tenant=policy.tenant, model=policy.model, state=RunState.TRAINING, reason=reason,
            dataset_version=dataset_version, job_id=self._new_job_id(), policy=policy.to_dict(),
            create_time=self._clock(),
        )
        message = f"{reason}: training on dataset {policy.dataset} version {dataset_version}"
        claimed = await asyncio.to_thread(self._store.start_run, run, self._event(run, "triggered", message))
        if claimed is None:
            return None
        self._log(run, "triggered", message)
        self._starting.add(run.id)
        try:
            return await self._create_job(run)
        except PASSING as exc:
            log.warning("retrain run's job not created yet; the loop tries again",
                        extra={"run": run.id, "reason": str(exc)[:300]})
            return run
        except MaasError as exc:
            await self._fail(run, f"its training job could not be created: {exc}")
            return await self._current(run)
        finally:
            self._starting.discard(run.id)

    async def _create_job(self, run: Run) -> Run:
        policy = run.settings
        spec = replace(TrainingSpec.from_dict(policy.spec), dataset=policy.dataset, builtin=False,
                       dataset_version=run.dataset_version)
        job = await self._jobs.create_training_job(run.tenant, spec, run.model, policy.from_version, run.job_id)
        message = f"training job {job.id} queued: {spec.architecture} on {policy.dataset} version {run.dataset_version}"
        await self._note(run, "training", message)
        return run

    # Carrying a run on

    async def _advance(self, run: Run) -> None:
        try:
            if run.state is RunState.TRAINING:
                await self._follow_job(run)
            elif run.state is RunState.EVALUATING:
                await self._evaluate(run)
            elif run.state is RunState.ROLLING_OUT:
                await self._watch_canary(run)
        except PASSING as exc:
            log.warning("retrain run waits: %s", exc, extra={"run": run.id})
        except MaasError as exc:
            await self._fail(await self._current(run), str(exc))
        except Exception as exc:
            log.exception("retrain run failed in the trainer", extra={"run": run.id})
            await self._fail(await self._current(run), f"the trainer could not carry the run on: {exc}")

    async def _current(self, run: Run) -> Run:
        return await asyncio.to_thread(self._store.get_run, run.id) or run

    async def _follow_job(self, run: Run) -> None:
        job = await self._jobs.find_job(run.job_id)
        if job is None:  # the trainer stopped between claiming the run and creating its job
            await self._create_job(run)
            return
        if not job.state.terminal:
            return
        if job.state is not JobState.SUCCEEDED:
            await self._fail(run, f"training job {job.id} {job.state.value.lower()}: {job.message}")
            return
        candidate = int(job.result.get("version", 0))
        message = f"training job {job.id} registered {run.model} version {candidate}"
        updated = await self._update(run, (RunState.TRAINING,), "trained", message,
                                     state=RunState.EVALUATING, candidate_version=candidate)
        if updated is not None:
            await self._evaluate(updated)

    async def _evaluate(self, run: Run) -> None:
        if not run.verdict:
            updated = await self._measure(run)
            if updated is None:
                return
            run = updated
        await self._carry_out(run)

    async def _measure(self, run: Run) -> Run | None:
        """Measure the candidate and the serving version on the same test split; store both
        metrics and the verdict in one step."""
        policy = run.settings
        serving = await self._serving_version(run, policy)
        evaluation = await self._evaluator.evaluate(run.tenant, EvaluationRequest(
            run_id=run.id, model=run.model, candidate_version=run.candidate_version, serving_version=serving,
            dataset=policy.dataset, dataset_version=run.dataset_version, spec=policy.spec, metric=policy.metric,
        ))
        split = f"on dataset {policy.dataset} v{run.dataset_version} test split (n={evaluation.samples})"
        if evaluation.serving is None:
            verdict = ACCEPTED
            comparison = f"{policy.metric} {evaluation.candidate:.4f} {split}; no other version to compare with"
        else:
            gain = evaluation.candidate - evaluation.serving
            verdict = ACCEPTED if gain >= policy.min_gain - 1e-12 else REJECTED
            comparison = (f"{policy.metric} {evaluation.candidate:.4f} vs {evaluation.serving:.4f} of version "
                          f"{serving} {split}")
        outcome = "wins" if verdict == ACCEPTED else f"does not gain {policy.min_gain:g}"
        return await self._update(
            run, (RunState.EVALUATING,), "evaluated", f"version {run.candidate_version} {outcome}: {comparison}",
            serving_version=serving, candidate_metric=evaluation.candidate, serving_metric=evaluation.serving,
            samples=evaluation.samples, verdict=verdict, comparison=comparison,
        )

    async def _serving_version(self, run: Run, policy: Policy) -> int:
        """The version to beat: the deployment's; else the alias a winner would move; else the
        newest READY version no run turned down (0 when there is none)."""
        if policy.deployment:
            return (await self._inference.get_deployment(run.tenant, policy.deployment)).resolved_version
        if policy.action is Action.ALIAS:
            aliased = await self._registry.alias_version(run.tenant, run.model, policy.alias)
            if aliased and aliased != run.candidate_version:
                return aliased
        versions = [
            v.version for v in await self._registry.list_versions(run.tenant, run.model)
            if v.ready and v.version != run.candidate_version
            and v.metadata.get(VERDICT_KEY) not in (REJECTED, ROLLED_BACK)
        ]
        return max(versions, default=0)

    async def _carry_out(self, run: Run) -> None:
        """Label the candidate with the stored verdict, then act on it. Each step may run again
        after a restart: labels merge, an alias set twice stays put, a canary started twice holds."""
        policy = run.settings
        assert run.verdict and run.candidate_metric is not None  # evaluated, and stored
        await self._registry.update_version_metadata(run.tenant, run.model, run.candidate_version, {
            VERDICT_KEY: run.verdict, COMPARISON_KEY: run.comparison, RUN_KEY: run.id,
        })
        if run.verdict == REJECTED:
            await self._end(run, RunState.REJECTED, "rejected",
                            f"version {run.candidate_version} rejected: {run.comparison}; version "
                            f"{run.serving_version} keeps serving")
            return
        await self._note(run, "registered", f"version {run.candidate_version} accepted: {run.comparison}")
        if policy.action is Action.REGISTER:
            await self._end(run, RunState.PROMOTED, "promoted", f"version {run.candidate_version} registered")
        elif policy.action is Action.ALIAS:
            await self._registry.set_alias(run.tenant, run.model, policy.alias, run.candidate_version)
            await self._end(run, RunState.PROMOTED, "alias_moved",
                            f"alias {policy.alias} moved to version {run.candidate_version}")
        else:
            await self._inference.start_canary(run.tenant, policy.deployment, run.candidate_version,
                                               policy.canary_weight_percent, policy.canary_max_error_rate)
            await self._update(
                run, (RunState.EVALUATING,), "canary_started",
                f"canary of version {run.candidate_version} on {policy.deployment} at "
                f"{policy.canary_weight_percent}%: promoted once it held {policy.canary_window_seconds} s",
                state=RunState.ROLLING_OUT,
            )

    async def _watch_canary(self, run: Run) -> None:
        policy = run.settings
        deployment = await self._inference.get_deployment(run.tenant, policy.deployment)
        if deployment.canary_version != run.candidate_version:
            if deployment.resolved_version == run.candidate_version:
                await self._end(run, RunState.PROMOTED, "promoted",
                                f"version {run.candidate_version} was promoted on {policy.deployment} meanwhile")
                return
            reason = deployment.message or "the canary is gone"
            await self._registry.update_version_metadata(run.tenant, run.model, run.candidate_version, {
                VERDICT_KEY: ROLLED_BACK, ROLLBACK_KEY: reason[:1000],
            })
            await self._end(run, RunState.REJECTED, "rolled_back",
                            f"canary of version {run.candidate_version} rolled back: {reason}; version "
                            f"{deployment.resolved_version} keeps serving")
            return
        if deployment.canary_state == "FAILED":
            await self._inference.rollback_canary(run.tenant, policy.deployment)
            await self._fail(run, f"the canary of version {run.candidate_version} could not load: "
                                  f"{deployment.canary_message}")
            return
        if deployment.canary_state != "READY":
            return  # still loading: its window starts once it serves
        moment = self._clock()
        if run.canary_ready_time is None:
            await self._update(run, (RunState.ROLLING_OUT,), None, "", canary_ready_time=moment)
            return
        if moment < run.canary_ready_time + timedelta(seconds=policy.canary_window_seconds):
            return
        await self._inference.promote_canary(run.tenant, policy.deployment)
        await self._end(run, RunState.PROMOTED, "promoted",
                        f"version {run.candidate_version} promoted on {policy.deployment} after its canary held "
                        f"{policy.canary_window_seconds} s")

    async def _stop(self, run: Run) -> None:
        """Stop a run in progress (its policy is being deleted), leaving the serving version."""
        policy = run.settings
        if run.state is RunState.TRAINING:
            job = await self._jobs.find_job(run.job_id)
            if job is not None and not job.state.terminal:
                try:
                    await self._jobs.cancel_job(run.tenant, run.job_id)
                except FailedPrecondition:
                    pass  # it finished (or is registering) meanwhile; its version stays unlabelled
        elif run.state is RunState.ROLLING_OUT:
            deployment = await self._inference.get_deployment(run.tenant, policy.deployment)
            if deployment.canary_version == run.candidate_version:
                await self._inference.rollback_canary(run.tenant, policy.deployment)
        await self._fail(run, "its policy was deleted")

    # Bookkeeping

    async def _update(
        self, run: Run, from_states: tuple[RunState, ...], step: str | None, note: str, **changes: Any
    ) -> Run | None:
        """Change the run if it is still in `from_states`, with the event `step` saying `note`."""
        event = self._event(run, step, note) if step else None
        updated = await asyncio.to_thread(self._store.update_run, run, from_states, event, **changes)
        if updated is not None and step:
            self._log(run, step, note)
        return updated

    async def _end(self, run: Run, state: RunState, step: str, message: str) -> None:
        await self._update(run, (run.state,), step, message, state=state, message=message, end_time=self._clock())

    async def _fail(self, run: Run, reason: str) -> None:
        if run.state.terminal:
            return
        await self._update(run, (run.state,), "failed", reason, state=RunState.FAILED, message=reason[:4000],
                           end_time=self._clock())

    async def _note(self, run: Run, step: str, message: str) -> None:
        await asyncio.to_thread(self._store.add_event, run, self._event(run, step, message))
        self._log(run, step, message)

    def _event(self, run: Run, step: str, message: str) -> RetrainEvent:
        return RetrainEvent(run.id, self._clock(), step, message)

    @staticmethod
    def _log(run: Run, step: str, message: str) -> None:
        log.info("retrain %s: %s", step, message,
                 extra={"run": run.id, "tenant": run.tenant, "model": run.model, "step": step})

    # Checks that need the registry or the inference service

    async def _training_spec(self, tenant: str, model: str, from_version: int) -> tuple[TrainingSpec, int]:
        """The training spec that made `from_version` (0: the newest version training made)."""
        if from_version:
            version = await self._registry.get_version(tenant, model, from_version)
        else:
            made = [v for v in await self._registry.list_versions(tenant, model) if v.metadata.get(TRAINING_SPEC_KEY)]
            if not made:
                raise FailedPrecondition(
                    f"model {model!r} has no version the trainer made (none has {TRAINING_SPEC_KEY} metadata): train "
                    f"one with `maas train`, then set the policy; retraining reuses the spec that made it"
                )
            version = max(made, key=lambda v: v.version)
        text = version.metadata.get(TRAINING_SPEC_KEY)
        if not text:
            raise FailedPrecondition(
                f"{model} version {version.version} has no {TRAINING_SPEC_KEY} metadata (it was uploaded, or "
                f"optimized by distillation): name a version the trainer trained with --from-version, or train one "
                f"with `maas train`"
            )
        try:
            spec = TrainingSpec.from_dict(json.loads(text))
        except (ValueError, TypeError) as exc:
            raise FailedPrecondition(f"{model} version {version.version} has unreadable {TRAINING_SPEC_KEY}: {exc}") from None
        if spec.architecture == "gpt":
            raise FailedPrecondition(
                f"{model} version {version.version} is a gpt text model, trained on a built-in corpus: "
                "retraining policies train classifiers and regressors on a registry dataset"
            )
        return spec, version.version

    async def _check_deployment(self, tenant: str, policy: Policy) -> None:
        deployment = await self._inference.get_deployment(tenant, policy.deployment)
        if deployment.model != policy.model:
            raise FailedPrecondition(
                f"deployment {policy.deployment!r} serves model {deployment.model!r}, not {policy.model!r}: "
                "name a deployment of this model"
            )
        if policy.action is Action.CANARY and deployment.alias:
            raise FailedPrecondition(
                f"deployment {policy.deployment!r} follows alias {deployment.alias!r}, and a canary needs a pinned "
                f"version: use --action alias --alias {deployment.alias}, or pin the deployment to a version"
            )


def _task_of(version: VersionInfo) -> str:
    return version.metadata.get("task", "")

