"""gRPC face of the trainer: protos in, domain calls, protos out. No logic of its own."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc

from services.common.channels import tenant_of
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
STATES = {state: trainer_pb2.JobState.Value(f"JOB_STATE_{state.value}") for state in JobState}
# Spec fields that are `optional` in the proto: unset means "the default".
OPTIONAL_FIELDS = (
    "learning_rate", "weight_decay", "momentum", "step_epochs", "step_gamma", "batch_size", "epochs",
    "early_stopping_patience", "seed", "validation_fraction", "test_fraction", "workers",
)


def _reverse(mapping: dict[int, str]) -> dict[str, int]:
    reverse: dict[str, int] = {}
    for number, name in mapping.items():
        if number:  # prefer the explicit value over UNSPECIFIED
            reverse.setdefault(name, number)
    return reverse


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

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


def spec_of(spec: trainer_pb2.TrainingSpec) -> TrainingSpec:
    kind = spec.architecture.WhichOneof("kind") or ""
    params: dict[str, Any] = {}
    if kind:
        arch = getattr(spec.architecture, kind)
        for field, value in arch.ListFields():
            params[field.name] = value if isinstance(value, (int, float, str)) else list(value)
        if kind == "recurrent":
            params["cell"] = CELLS.get(arch.cell, "unknown")
    source = spec.dataset.WhichOneof("source")
    optional = {name: getattr(spec, name) for name in OPTIONAL_FIELDS if spec.HasField(name)}
    return TrainingSpec(
        architecture=kind or "(unset)",
        dataset=spec.dataset.registry.name if source == "registry" else spec.dataset.builtin,
        builtin=source != "registry",
        dataset_version=spec.dataset.registry.version if source == "registry" else 0,
        hyperparameters=params,
        task=TASKS.get(spec.dataset.task, "unknown"),
        max_samples=spec.dataset.max_samples,
        optimizer=OPTIMIZERS.get(spec.optimizer, "unknown"),
        schedule=SCHEDULES.get(spec.schedule, "unknown"),
        device=DEVICES.get(spec.device, "unknown"),
        **optional,
    )


def spec_pb(spec: dict[str, Any]) -> trainer_pb2.TrainingSpec:
    resolved = TrainingSpec.from_dict(spec)
    params = dict(resolved.hyperparameters)
    if resolved.architecture == "recurrent":
        params["cell"] = _reverse(CELLS)[params["cell"]]
    architecture = trainer_pb2.Architecture(**{resolved.architecture: params})
    dataset = trainer_pb2.DatasetSource(task=_reverse(TASKS).get(resolved.task, 0), max_samples=resolved.max_samples)
    if resolved.builtin:
        dataset.builtin = resolved.dataset
    else:
        dataset.registry.name = resolved.dataset
        dataset.registry.version = resolved.dataset_version
    return trainer_pb2.TrainingSpec(
        architecture=architecture,
        dataset=dataset,
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
    )


def job_pb(job: JobRecord) -> trainer_pb2.Job:
    return trainer_pb2.Job(
        id=job.id,
        kind=trainer_pb2.JOB_KIND_TRAINING,
        state=STATES[job.state],
        spec=spec_pb(job.spec),
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
