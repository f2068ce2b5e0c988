"""gRPC face of the trainer: protos in, domain calls, protos out. No logic of its own."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc

from services.common.channels import tenant_of
from services.common.errors import InvalidArgument, Unauthenticated
from services.trainer.optimization_spec import OptimizationSpec
from services.trainer.retrain import Retrainer
from services.trainer.retrain_store import Action, Policy, RetrainEvent, Run, RunState, TenantEvent, Trigger
from services.trainer.service import Trainer
from services.trainer.spec import TrainingSpec
from services.trainer.store import EventRecord, JobRecord, JobState

OPTIMIZERS = {
    trainer_pb2.OPTIMIZER_UNSPECIFIED: "adam",
    trainer_pb2.OPTIMIZER_SGD: "sgd",
    trainer_pb2.OPTIMIZER_MOMENTUM: "momentum",
    trainer_pb2.OPTIMIZER_ADAM: "adam",
    trainer_pb2.OPTIMIZER_ADAMW: "adamw",
}
SCHEDULES = {
    trainer_pb2.SCHEDULE_UNSPECIFIED: "constant",
    trainer_pb2.SCHEDULE_STEP: "step",
    trainer_pb2.SCHEDULE_COSINE: "cosine",
}
DEVICES = {trainer_pb2.DEVICE_UNSPECIFIED: "auto", trainer_pb2.DEVICE_CPU: "cpu", trainer_pb2.DEVICE_CUDA: "cuda"}
TASKS = {trainer_pb2.TASK_UNSPECIFIED: "", trainer_pb2.TASK_CLASSIFICATION: "classification",
         trainer_pb2.TASK_REGRESSION: "regression"}
CELLS = {trainer_pb2.RECURRENT_CELL_UNSPECIFIED: "lstm", trainer_pb2.RECURRENT_CELL_LSTM: "lstm",
         trainer_pb2.RECURRENT_CELL_GRU: "gru", trainer_pb2.RECURRENT_CELL_RNN: "rnn"}
PRECISIONS = {trainer_pb2.PRECISION_UNSPECIFIED: "", trainer_pb2.PRECISION_INT8: "int8",
              trainer_pb2.PRECISION_FP16: "fp16"}
KINDS = {"training": trainer_pb2.JOB_KIND_TRAINING, "optimization": trainer_pb2.JOB_KIND_OPTIMIZATION}
STATES = {state: trainer_pb2.JobState.Value(f"JOB_STATE_{state.value}") for state in JobState}
# Spec fields that are `optional` in the proto: unset means "the default".
OPTIONAL_FIELDS = (
    "learning_rate", "weight_decay", "momentum", "step_epochs", "step_gamma", "batch_size", "epochs",
    "early_stopping_patience", "seed", "validation_fraction", "test_fraction", "workers",
)
OPTIONAL_PRUNE_FIELDS = ("learning_rate",)
OPTIONAL_DISTILL_FIELDS = ("temperature", "alpha", "epochs", "learning_rate", "batch_size")


def _reverse(mapping: dict[int, str]) -> dict[str, int]:
    reverse: dict[str, int] = {}
    for number, name in mapping.items():
        if number:  # prefer the explicit value over UNSPECIFIED
            reverse.setdefault(name, number)
    return reverse


TRIGGERS = {
    trainer_pb2.RETRAIN_TRIGGER_NEW_DATASET_VERSION: Trigger.NEW_DATASET_VERSION,
    trainer_pb2.RETRAIN_TRIGGER_SCHEDULE: Trigger.SCHEDULE,
    trainer_pb2.RETRAIN_TRIGGER_DRIFT: Trigger.DRIFT,
}
ACTIONS = {
    trainer_pb2.RETRAIN_ACTION_UNSPECIFIED: Action.REGISTER,
    trainer_pb2.RETRAIN_ACTION_ALIAS: Action.ALIAS,
    trainer_pb2.RETRAIN_ACTION_CANARY: Action.CANARY,
}
RUN_STATES = {state: trainer_pb2.RetrainRunState.Value(f"RETRAIN_RUN_STATE_{state.value}") for state in RunState}
# RetrainPolicy fields that go to the domain as they are.
POLICY_FIELDS = (
    "model", "dataset", "from_version", "interval_seconds", "deployment", "metric", "min_gain", "alias",
    "canary_weight_percent", "canary_window_seconds", "canary_max_error_rate", "drift_threshold", "cooldown_seconds",
)


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, trainer: Trainer, retrainer: Retrainer) -> None:
        self.trainer = trainer
        self.retrainer = retrainer

    async def CreateTrainingJob(self, request, context):  # noqa: N802
        job = await self.trainer.create_training_job(
            tenant_of(context), spec_of(request.spec), request.model, request.parent_version
        )
        return trainer_pb2.CreateTrainingJobResponse(job=job_pb(job))

    async def GetJob(self, request, context):  # noqa: N802
        job = await self.trainer.get_job(tenant_of(context), request.id)
        return trainer_pb2.GetJobResponse(job=job_pb(job))

    async def ListJobs(self, request, context):  # noqa: N802
        state = next((s for s, v in STATES.items() if v == request.state), None)
        jobs, token = await self.trainer.list_jobs(tenant_of(context), state, request.page_size, request.page_token)
        return trainer_pb2.ListJobsResponse(jobs=[job_pb(j) for j in jobs], next_page_token=token)

    async def CancelJob(self, request, context):  # noqa: N802
        job = await self.trainer.cancel_job(tenant_of(context), request.id)
        return trainer_pb2.CancelJobResponse(job=job_pb(job))

    async def WatchJob(self, request, context):  # noqa: N802
        async for event in self.trainer.watch_job(tenant_of(context), request.id, request.after_sequence):
            yield trainer_pb2.WatchJobResponse(event=event_pb(event))

    async def CreateOptimizationJob(self, request, context):  # noqa: N802
        job = await self.trainer.create_optimization_job(
            tenant_of(context), optimization_spec_of(request.spec), request.model
        )
        return trainer_pb2.CreateOptimizationJobResponse(job=job_pb(job))

    async def SetRetrainPolicy(self, request, context):  # noqa: N802
        policy = await self.retrainer.set_policy(tenant_of(context), policy_of(request.policy))
        return trainer_pb2.SetRetrainPolicyResponse(policy=policy_pb(policy))

    async def GetRetrainPolicy(self, request, context):  # noqa: N802
        policy, runs, events = await self.retrainer.get_policy(tenant_of(context), request.model)
        return trainer_pb2.GetRetrainPolicyResponse(
            policy=policy_pb(policy), runs=[run_pb(r) for r in runs], events=[retrain_event_pb(e) for e in events]
        )

    async def DeleteRetrainPolicy(self, request, context):  # noqa: N802
        await self.retrainer.delete_policy(tenant_of(context), request.model)
        return trainer_pb2.DeleteRetrainPolicyResponse()

    async def TriggerRetrain(self, request, context):  # noqa: N802
        run = await self.retrainer.trigger(tenant_of(context), request.model)
        return trainer_pb2.TriggerRetrainResponse(run=run_pb(run))

    async def ReportDrift(self, request, context):  # noqa: N802
        # The monitor names the tenant in the request, the call's metadata, or both (then alike).
        try:
            tenant = tenant_of(context)
        except Unauthenticated:
            if not request.tenant:
                raise
            tenant = request.tenant
        if request.tenant and request.tenant != tenant:
            raise InvalidArgument(f"tenant {request.tenant[:80]!r} is not the tenant the call asserts ({tenant!r})")
        runs = await self.retrainer.report_drift(tenant, request.deployment, request.psi, request.feature)
        return trainer_pb2.ReportDriftResponse(runs=[run_pb(r) for r in runs])

    async def ListRetrainEvents(self, request, context):  # noqa: N802
        # Internal, for the gateway's audit log: every tenant's events, so no tenant is asserted.
        events = await self.retrainer.list_events(request.after_id, request.limit)
        return trainer_pb2.ListRetrainEventsResponse(events=[tenant_retrain_event_pb(e) for e in events])


def _architecture_of(architecture: trainer_pb2.Architecture) -> tuple[str, dict[str, Any]]:
    kind = architecture.WhichOneof("kind") or ""
    params: dict[str, Any] = {}
    if kind:
        arch = getattr(architecture, kind)
        for field, value in arch.ListFields():
            params[field.name] = value if isinstance(value, (int, float, str)) else list(value)
        if kind == "recurrent":
            params["cell"] = CELLS.get(arch.cell, "unknown")
    return kind, params


def _architecture_pb(kind: str, params: dict[str, Any]) -> trainer_pb2.Architecture:
    params = dict(params)
    if kind == "recurrent":
        params["cell"] = _reverse(CELLS)[params["cell"]]
    return trainer_pb2.Architecture(**{kind: params})


def _dataset_of(dataset: trainer_pb2.DatasetSource) -> dict[str, Any]:
    source = dataset.WhichOneof("source")
    return {
        "dataset": dataset.registry.name if source == "registry" else dataset.builtin,
        "builtin": source != "registry",
        "dataset_version": dataset.registry.version if source == "registry" else 0,
        "task": TASKS.get(dataset.task, "unknown"),
        "max_samples": dataset.max_samples,
    }


def _dataset_pb(spec: TrainingSpec | OptimizationSpec) -> trainer_pb2.DatasetSource:
    dataset = trainer_pb2.DatasetSource(task=_reverse(TASKS).get(spec.task, 0), max_samples=spec.max_samples)
    if spec.builtin:
        dataset.builtin = spec.dataset
    else:
        dataset.registry.name = spec.dataset
        dataset.registry.version = spec.dataset_version
    return dataset


def spec_of(spec: trainer_pb2.TrainingSpec) -> TrainingSpec:
    kind, params = _architecture_of(spec.architecture)
    optional = {name: getattr(spec, name) for name in OPTIONAL_FIELDS if spec.HasField(name)}
    return TrainingSpec(
        architecture=kind or "(unset)",
        hyperparameters=params,
        **_dataset_of(spec.dataset),
        optimizer=OPTIMIZERS.get(spec.optimizer, "unknown"),
        schedule=SCHEDULES.get(spec.schedule, "unknown"),
        device=DEVICES.get(spec.device, "unknown"),
        **optional,
    )


def optimization_spec_of(spec: trainer_pb2.OptimizationSpec) -> OptimizationSpec:
    method = spec.WhichOneof("method") or ""
    fields: dict[str, Any] = {}
    if method == "quantize":
        fields["precision"] = PRECISIONS.get(spec.quantize.precision, "unknown")
    elif method == "prune":
        fields["target_sparsity"] = spec.prune.target_sparsity
        fields["finetune_epochs"] = spec.prune.finetune_epochs
        fields.update({n: getattr(spec.prune, n) for n in OPTIONAL_PRUNE_FIELDS if spec.prune.HasField(n)})
    elif method == "distill":
        fields["student"], fields["student_hyperparameters"] = _architecture_of(spec.distill.student)
        fields.update({n: getattr(spec.distill, n) for n in OPTIONAL_DISTILL_FIELDS if spec.distill.HasField(n)})
    # An unset dataset means "the source's own"; only a named one replaces it.
    dataset = _dataset_of(spec.dataset) if spec.dataset.WhichOneof("source") else {}
    return OptimizationSpec(
        model=spec.model, version=spec.version, method=method, **fields, **dataset,
        seed=spec.seed if spec.HasField("seed") else None, device=DEVICES.get(spec.device, "unknown"),
    )


def optimization_pb(data: dict[str, Any]) -> trainer_pb2.OptimizationSpec:
    spec = OptimizationSpec.from_dict(data)
    message = trainer_pb2.OptimizationSpec(model=spec.model, version=spec.version, seed=spec.seed,
                                           device=_reverse(DEVICES).get(spec.device, 0))
    if spec.method == "quantize":
        message.quantize.precision = _reverse(PRECISIONS)[spec.precision]
    elif spec.method == "prune":
        message.prune.CopyFrom(trainer_pb2.PruneMethod(
            target_sparsity=spec.target_sparsity, finetune_epochs=spec.finetune_epochs,
            learning_rate=spec.learning_rate))
    elif spec.method == "distill":
        message.distill.CopyFrom(trainer_pb2.DistillMethod(
            student=_architecture_pb(spec.student, spec.student_hyperparameters),
            **{name: getattr(spec, name) for name in OPTIONAL_DISTILL_FIELDS}))
    else:
        message.export.SetInParent()
    if spec.dataset:
        message.dataset.CopyFrom(_dataset_pb(spec))
    return message


def spec_pb(spec: dict[str, Any]) -> trainer_pb2.TrainingSpec:
    resolved = TrainingSpec.from_dict(spec)
    return trainer_pb2.TrainingSpec(
        architecture=_architecture_pb(resolved.architecture, resolved.hyperparameters),
        dataset=_dataset_pb(resolved),
        optimizer=_reverse(OPTIMIZERS)[resolved.optimizer],
        schedule=_reverse(SCHEDULES).get(resolved.schedule, 0),
        device=_reverse(DEVICES).get(resolved.device, 0),
        **{name: getattr(resolved, name) for name in OPTIONAL_FIELDS if getattr(resolved, name) is not None},
    )


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def progress_pb(progress: dict[str, Any]) -> trainer_pb2.Progress:
    return trainer_pb2.Progress(
        epoch=int(progress.get("epoch") or 0),
        epochs=int(progress.get("epochs") or 0),
        step=int(progress.get("step") or 0),
        total_steps=int(progress.get("total_steps") or 0),
        loss=float(progress.get("loss") or 0.0),
        metrics={k: float(v) for k, v in (progress.get("metrics") or {}).items()},
        samples_per_second=float(progress.get("samples_per_second") or 0.0),
        eta_seconds=float(progress.get("eta_seconds") or 0.0),
    )


def result_pb(result: dict[str, Any]) -> trainer_pb2.JobResult:
    return trainer_pb2.JobResult(
        model=result.get("model", ""), version=int(result.get("version", 0)),
        metrics={k: float(v) for k, v in result.get("metrics", {}).items()},
        parent_metrics={k: float(v) for k, v in result.get("parent_metrics", {}).items()},
    )


def job_pb(job: JobRecord) -> trainer_pb2.Job:
    optimization = job.kind == "optimization"
    return trainer_pb2.Job(
        id=job.id,
        kind=KINDS[job.kind],
        state=STATES[job.state],
        spec=None if optimization else spec_pb(job.spec),
        optimization=optimization_pb(job.spec) if optimization else None,
        model=job.model,
        parent_version=job.parent_version,
        create_time=_timestamp(job.create_time),
        start_time=_timestamp(job.start_time),
        end_time=_timestamp(job.end_time),
        progress=progress_pb(job.progress),
        result=result_pb(job.result) if job.result else None,
        message=job.message,
        attempts=job.attempts,
        dataset_version=job.dataset_version,
        device=job.device,
    )


def event_pb(event: EventRecord) -> trainer_pb2.JobEvent:
    p = event.payload
    message = trainer_pb2.JobEvent(sequence=event.sequence, time=_timestamp(event.time))
    if event.kind == "queued":
        message.queued.position = int(p.get("position", 0))
    elif event.kind == "started":
        message.started.CopyFrom(trainer_pb2.JobStarted(
            attempt=int(p.get("attempt", 0)), resumed_from_epoch=int(p.get("resumed_from_epoch", 0)),
            device=str(p.get("device", "")), workers=int(p.get("workers", 1)),
        ))
    elif event.kind == "progress":
        message.progress.CopyFrom(progress_pb(p))
    elif event.kind == "checkpoint":
        message.checkpoint.CopyFrom(trainer_pb2.JobCheckpoint(
            epoch=int(p.get("epoch", 0)), metrics={k: float(v) for k, v in p.get("metrics", {}).items()}))
    elif event.kind == "log":
        message.log.CopyFrom(trainer_pb2.JobLogLine(level=str(p.get("level", "info")), message=str(p.get("message", ""))))
    else:
        message.finished.CopyFrom(trainer_pb2.JobFinished(
            state=STATES[JobState(p["state"])], reason=p.get("reason", ""),
            result=result_pb(p["result"]) if p.get("result") else None,
        ))
    return message


def policy_of(policy: trainer_pb2.RetrainPolicy) -> Policy:
    if policy.action not in ACTIONS:
        raise InvalidArgument(f"unknown retrain action {policy.action}; choose register, alias or canary")
    return Policy(
        trigger=TRIGGERS.get(policy.trigger), action=ACTIONS[policy.action],
        **{name: getattr(policy, name) for name in POLICY_FIELDS},
    )


def policy_pb(policy: Policy) -> trainer_pb2.RetrainPolicy:
    assert policy.trigger is not None
    return trainer_pb2.RetrainPolicy(
        trigger=_reverse_enum(TRIGGERS)[policy.trigger], action=_reverse_enum(ACTIONS)[policy.action],
        create_time=_timestamp(policy.create_time), last_dataset_version=policy.last_dataset_version,
        **{name: getattr(policy, name) for name in POLICY_FIELDS},
    )


def run_pb(run: Run) -> trainer_pb2.RetrainRun:
    return trainer_pb2.RetrainRun(
        id=run.id, state=RUN_STATES[run.state], reason=run.reason, dataset_version=run.dataset_version,
        job_id=run.job_id, candidate_version=run.candidate_version, serving_version=run.serving_version,
        candidate_metric=run.candidate_metric or 0.0, serving_metric=run.serving_metric or 0.0,
        message=run.message or run.comparison, create_time=_timestamp(run.create_time),
        end_time=_timestamp(run.end_time),
    )


def retrain_event_pb(event: RetrainEvent) -> trainer_pb2.RetrainEvent:
    return trainer_pb2.RetrainEvent(run_id=event.run_id, time=_timestamp(event.time), step=event.step,
                                    message=event.message)


def tenant_retrain_event_pb(event: TenantEvent) -> trainer_pb2.TenantRetrainEvent:
    return trainer_pb2.TenantRetrainEvent(id=event.id, tenant=event.tenant, model=event.model,
                                          event=retrain_event_pb(event.event))


def _reverse_enum(mapping: dict[int, Any]) -> dict[Any, int]:
    return {value: number for number, value in mapping.items()}
