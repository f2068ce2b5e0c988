"""The trainer over gRPC with a real registry and a scripted stand-in for the worker process:
validation and status codes, queueing, fairness, cancel, watch history, registration, recovery."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from maas.registry.v1 import registry_pb2
from maas.trainer.v1 import trainer_pb2
from prometheus_client import REGISTRY

from services.common.database import make_engine, upgrade
from services.common.errors import InvalidArgument, NotFound
from services.common.server import running
from services.common.validation import MIN_ID_PREFIX
from services.trainer.runner import pick_next
from services.trainer.server import MIGRATIONS, create_app
from services.trainer.store import JobRecord, JobState, JobStore, now
from tests.unit.trainer.conftest import TenantStub, trainer_settings, watch
from tests.unit.trainer.trainer_fakes import FakeLauncher, torchscript_result

CODE = grpc.StatusCode


def spec(arch: str = "logistic", dataset: str = "iris", **fields) -> trainer_pb2.TrainingSpec:
    architecture = trainer_pb2.Architecture(**{arch: {}})
    return trainer_pb2.TrainingSpec(
        architecture=architecture, dataset=trainer_pb2.DatasetSource(builtin=dataset), **fields
    )


async def create(stub: TenantStub, training: trainer_pb2.TrainingSpec, model: str = "m", **fields) -> trainer_pb2.Job:
    request = trainer_pb2.CreateTrainingJobRequest(spec=training, model=model, **fields)
    return (await stub.CreateTrainingJob(request)).job


async def expect(code: grpc.StatusCode, call, match: str = "") -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    assert match in caught.value.details(), caught.value.details()
    return caught.value.details()


@pytest.fixture
def launcher() -> FakeLauncher:
    return FakeLauncher()


@pytest.fixture
async def trainer_server(settings, launcher):
    async with running(await create_app(settings, launcher)) as server:
        yield server


async def wait_state(stub: TenantStub, job_id: str, state: int, timeout: float = 10.0) -> trainer_pb2.Job:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        job = (await stub.GetJob(trainer_pb2.GetJobRequest(id=job_id))).job
        if job.state == state:
            return job
        assert asyncio.get_running_loop().time() < deadline, f"job still {trainer_pb2.JobState.Name(job.state)}"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("training", "code", "match"),
    [
        (trainer_pb2.TrainingSpec(dataset=trainer_pb2.DatasetSource(builtin="iris")), CODE.INVALID_ARGUMENT, "architecture"),
        (spec(dataset="mnist"), CODE.INVALID_ARGUMENT, "unknown built-in dataset 'mnist'"),
        (spec(learning_rate=0), CODE.INVALID_ARGUMENT, "learning_rate must be positive"),
        (spec(learning_rate=-1), CODE.INVALID_ARGUMENT, "learning_rate"),
        (spec(epochs=0), CODE.INVALID_ARGUMENT, "epochs must be between 1"),
        (spec(epochs=10**6), CODE.INVALID_ARGUMENT, "epochs must be between 1"),
        (spec(batch_size=0), CODE.INVALID_ARGUMENT, "batch_size"),
        (spec(workers=99), CODE.INVALID_ARGUMENT, "workers must be between 1 and 8"),
        (spec(validation_fraction=0.7), CODE.INVALID_ARGUMENT, "validation_fraction"),
        (spec("cnn", "iris"), CODE.INVALID_ARGUMENT, "cnn needs images"),
        (spec("linear", "digits"), CODE.INVALID_ARGUMENT, "linear regression needs a numeric target"),
        (spec("logistic", "diabetes"), CODE.INVALID_ARGUMENT, "logistic regression predicts classes"),
        (spec("gpt", "iris"), CODE.INVALID_ARGUMENT, "gpt trains on text"),
        (spec("mlp", "shakespeare"), CODE.INVALID_ARGUMENT, "train the gpt architecture"),
        (trainer_pb2.TrainingSpec(architecture=trainer_pb2.Architecture(cnn=trainer_pb2.CnnArchitecture(
            channels=[8, 8, 8, 8])), dataset=trainer_pb2.DatasetSource(builtin="digits")),
         CODE.INVALID_ARGUMENT, "at most 3 channels"),
        (trainer_pb2.TrainingSpec(architecture=trainer_pb2.Architecture(gpt=trainer_pb2.GptArchitecture(
            embedding_dim=30, num_heads=4)), dataset=trainer_pb2.DatasetSource(builtin="shakespeare")),
         CODE.INVALID_ARGUMENT, "multiple of num_heads"),
        (spec(device=trainer_pb2.DEVICE_CUDA), CODE.FAILED_PRECONDITION, "no CUDA device"),
    ],
)
async def test_bad_specs_are_refused_and_nothing_is_left(trainer, settings, training, code, match) -> None:
    if code is CODE.FAILED_PRECONDITION:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    await expect(code, create(trainer, training), match)
    assert not (await trainer.ListJobs(trainer_pb2.ListJobsRequest())).jobs
    assert not list(settings.trainer_jobs_dir.iterdir())


async def test_bad_model_names_and_parents(trainer, registry) -> None:
    await expect(CODE.INVALID_ARGUMENT, create(trainer, spec(), model="Bad Name"), "invalid model name")
    await expect(CODE.INVALID_ARGUMENT, create(trainer, spec(), parent_version=-1), "parent_version")
    await expect(CODE.NOT_FOUND, create(trainer, spec(), model="nope", parent_version=3))
    await expect(CODE.INVALID_ARGUMENT, trainer.GetJob(trainer_pb2.GetJobRequest(id="x; drop")), "invalid job id")
    await expect(CODE.NOT_FOUND, trainer.GetJob(trainer_pb2.GetJobRequest(id="job-0123abcd")))


async def upload_dataset(registry: TenantStub, name: str, data: bytes, fmt: int, target: str = "") -> None:
    await registry.CreateDataset(registry_pb2.CreateDatasetRequest(name=name, format=fmt, target_column=target))
    header = registry_pb2.DatasetVersionHeader(dataset=name, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    await registry.UploadDatasetVersion(iter([
        registry_pb2.UploadDatasetVersionRequest(header=header), registry_pb2.UploadDatasetVersionRequest(chunk=data)]))


def npz_bytes(x: np.ndarray, y: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, X=x, y=y)
    return buffer.getvalue()


def registry_spec(name: str, arch: str = "mlp", version: int = 0) -> trainer_pb2.TrainingSpec:
    return trainer_pb2.TrainingSpec(
        architecture=trainer_pb2.Architecture(**{arch: {}}),
        dataset=trainer_pb2.DatasetSource(registry=trainer_pb2.RegistryDataset(name=name, version=version)),
    )


async def test_registry_datasets_are_fetched_checked_and_tenant_scoped(
    trainer, other_trainer, registry, settings
) -> None:
    rng = np.random.default_rng(0)
    await upload_dataset(registry, "blobs", npz_bytes(rng.normal(size=(60, 5)).astype(np.float32),
                                                      rng.integers(0, 3, 60)), registry_pb2.DATASET_FORMAT_NPZ)
    csv = "a,b,label\n" + "".join(f"{i},{i % 7},{'yes' if i % 2 else 'no'}\n" for i in range(40))
    await upload_dataset(registry, "table", csv.encode(), registry_pb2.DATASET_FORMAT_CSV, "label")

    job = await create(trainer, registry_spec("blobs"))
    assert job.dataset_version == 1 and job.spec.dataset.registry.name == "blobs"
    assert (settings.trainer_jobs_dir / job.id / "dataset.npz").exists()
    job = await create(trainer, registry_spec("table", "logistic"))
    assert (settings.trainer_jobs_dir / job.id / "dataset.csv").exists()
    await expect(CODE.INVALID_ARGUMENT, create(trainer, registry_spec("blobs", "cnn")), "cnn needs images")
    await expect(CODE.INVALID_ARGUMENT, create(trainer, registry_spec("table", "linear")), "linear regression")
    await expect(CODE.NOT_FOUND, create(trainer, registry_spec("blobs", version=9)))
    # Another tenant's dataset does not exist for this tenant.
    await expect(CODE.NOT_FOUND, create(other_trainer, registry_spec("blobs")), "blobs")
    assert len((await trainer.ListJobs(trainer_pb2.ListJobsRequest())).jobs) == 2
    assert not (await other_trainer.ListJobs(trainer_pb2.ListJobsRequest())).jobs


async def test_a_job_runs_registers_and_a_late_watcher_gets_the_history(trainer, registry, launcher) -> None:
    progress = {"type": "progress", "epoch": 1, "epochs": 1, "step": 5, "total_steps": 5, "loss": 0.5,
                "metrics": {"val_accuracy": 0.9}, "samples_per_second": 100.0, "eta_seconds": 0.0}
    launcher.scripts.append((lambda folder: [
        {"type": "started", "device": "cpu", "workers": 1, "resumed_from_epoch": 0},
        progress,
        {"type": "checkpoint", "epoch": 1, "metrics": {"val_loss": 0.3}},
        "not json",
        torchscript_result(folder),
    ], 0))
    launcher.scripts[0] = (lambda folder, make=launcher.scripts[0][0]: [
        e if isinstance(e, dict) else {"type": "log", "level": "info", "message": e} for e in make(folder)], 0)
    job = await create(trainer, spec(), model="iris-clf")
    done = await wait_state(trainer, job.id, trainer_pb2.JOB_STATE_SUCCEEDED)
    assert done.result.model == "iris-clf" and done.result.version == 1
    assert done.attempts == 1 and done.progress.step == 5 and done.start_time.seconds and done.end_time.seconds
    events = await watch(trainer, job.id)
    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds == ["queued", "started", "progress", "checkpoint", "log", "finished"]
    assert [e.sequence for e in events] == list(range(1, 7))
    assert events[-1].finished.state == trainer_pb2.JOB_STATE_SUCCEEDED
    assert [e.sequence for e in await watch(trainer, job.id, after=4)] == [5, 6]
    version = (await registry.GetVersion(registry_pb2.GetVersionRequest(model="iris-clf", version=1))).version
    assert version.lineage.job_id == job.id
    assert version.lineage.hyperparameters["architecture"] == "logistic"
    assert version.metadata["dataset"] == "builtin:iris"
    assert version.metrics["test_accuracy"] == pytest.approx(0.9)


@pytest.mark.parametrize(("reported", "device"), [("cuda:1", "cuda"), ("cuda", "cuda"), ("cpu", "cpu")])
async def test_the_job_names_the_kind_of_device_it_started_on(trainer, launcher, reported, device) -> None:
    """What the gateway bills training time by: CPU-seconds or GPU-seconds."""
    launcher.scripts.append(([{"type": "started", "device": reported, "workers": 1, "resumed_from_epoch": 0}], None))
    job = await create(trainer, spec())
    assert job.device == ""  # queued: not started anywhere yet
    for _ in range(250):
        job = (await trainer.GetJob(trainer_pb2.GetJobRequest(id=job.id))).job
        if job.device:
            break
        await asyncio.sleep(0.02)
    assert job.device == device
    await trainer.CancelJob(trainer_pb2.CancelJobRequest(id=job.id))
    assert (await trainer.GetJob(trainer_pb2.GetJobRequest(id=job.id))).job.device == device


async def test_a_failed_registration_leaves_no_model(trainer, registry, launcher) -> None:
    def broken(folder: Path):
        result = torchscript_result(folder)
        (folder / "model.pt").write_bytes(b"\x80not torchscript")
        return [result]

    launcher.scripts.append((broken, 0))
    job = await create(trainer, spec(), model="never")
    failed = await wait_state(trainer, job.id, trainer_pb2.JOB_STATE_FAILED)
    assert "registering the result failed" in failed.message and "pickle" in failed.message
    await expect(CODE.NOT_FOUND, registry.GetModel(registry_pb2.GetModelRequest(name="never")))


async def test_worker_errors_become_the_reason(trainer, launcher) -> None:
    launcher.scripts.append(([{"type": "error", "message": "y must hold finite numbers"}], 1))
    launcher.scripts.append(([], 9))
    first = await create(trainer, spec())
    assert (await wait_state(trainer, first.id, trainer_pb2.JOB_STATE_FAILED)).message == "y must hold finite numbers"
    second = await create(trainer, spec())
    assert "exited with code 9" in (await wait_state(trainer, second.id, trainer_pb2.JOB_STATE_FAILED)).message


async def test_cancel_queued_and_running_jobs(trainer, other_trainer, launcher) -> None:
    running_job = await create(trainer, spec())
    await wait_state(trainer, running_job.id, trainer_pb2.JOB_STATE_RUNNING)
    queued = await create(trainer, spec())  # the tenant's one slot is taken
    await asyncio.sleep(0.1)
    assert (await trainer.GetJob(trainer_pb2.GetJobRequest(id=queued.id))).job.state == trainer_pb2.JOB_STATE_QUEUED
    assert backlog() == (1, 1)  # what the queue-backlog alert reads
    await expect(CODE.NOT_FOUND, other_trainer.CancelJob(trainer_pb2.CancelJobRequest(id=queued.id)))
    cancelled = (await trainer.CancelJob(trainer_pb2.CancelJobRequest(id=queued.id))).job
    assert cancelled.state == trainer_pb2.JOB_STATE_CANCELLED
    cancelled = (await trainer.CancelJob(trainer_pb2.CancelJobRequest(id=running_job.id))).job
    assert cancelled.state == trainer_pb2.JOB_STATE_CANCELLED and cancelled.message == "cancelled by the caller"
    assert launcher.launched[0][1].stop_calls == 1
    await expect(CODE.FAILED_PRECONDITION, trainer.CancelJob(trainer_pb2.CancelJobRequest(id=queued.id)), "already CANCELLED")
    events = await watch(trainer, running_job.id)
    assert events[-1].finished.state == trainer_pb2.JOB_STATE_CANCELLED
    assert len(launcher.launched) == 1  # the cancelled queued job never started
    for _ in range(50):
        if backlog() == (0, 0):
            break
        await asyncio.sleep(0.05)
    assert backlog() == (0, 0)


def backlog() -> tuple[float | None, float | None]:
    """The trainer's queued and running job gauges."""
    return REGISTRY.get_sample_value("maas_trainer_queued_jobs"), REGISTRY.get_sample_value("maas_trainer_running_jobs")


async def test_list_pages_newest_first_and_filters_by_state(trainer) -> None:
    ids = [(await create(trainer, spec())).id for _ in range(5)]
    first = await trainer.ListJobs(trainer_pb2.ListJobsRequest(page_size=2))
    second = await trainer.ListJobs(trainer_pb2.ListJobsRequest(page_size=2, page_token=first.next_page_token))
    third = await trainer.ListJobs(trainer_pb2.ListJobsRequest(page_size=2, page_token=second.next_page_token))
    assert [j.id for j in [*first.jobs, *second.jobs, *third.jobs]] == ids[::-1]
    assert not third.next_page_token
    queued = await trainer.ListJobs(trainer_pb2.ListJobsRequest(state=trainer_pb2.JOB_STATE_QUEUED))
    assert len(queued.jobs) == 4


def job(tenant: str, number: int) -> JobRecord:
    return JobRecord(id=f"job-{number:04d}", tenant=tenant, kind="training", state=JobState.QUEUED, spec={},
                     model="m", parent_version=0, dataset_version=0, create_time=now())


def test_scheduling_is_fair_between_tenants() -> None:
    queued = [job("busy", n) for n in range(50)] + [job("small", 99)]
    limits = {"global_limit": 2, "tenant_limit": 2}
    assert pick_next(queued, {}, last_start={}, **limits).tenant == "busy"  # oldest first
    # busy runs one job: small (no running jobs) goes before busy's second.
    assert pick_next(queued, {"busy": 1}, last_start={}, **limits).tenant == "small"
    assert pick_next(queued, {"busy": 1, "small": 1}, last_start={}, **limits) is None  # global limit
    # Equal running counts: the tenant served longest ago goes first.
    assert pick_next(queued, {}, last_start={"busy": 2.0, "small": 1.0}, **limits).tenant == "small"
    assert pick_next(queued, {"busy": 2}, last_start={}, global_limit=4, tenant_limit=2).tenant == "small"
    assert pick_next(queued[:50], {"busy": 2}, last_start={}, global_limit=4, tenant_limit=2) is None


async def test_restart_requeues_running_jobs_or_fails_them(tmp_path, registry_server) -> None:
    settings = trainer_settings(tmp_path, registry_server.port, trainer_max_attempts=2)
    async with running(await create_app(settings, FakeLauncher())) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            from maas.trainer.v1 import trainer_pb2_grpc

            stub = TenantStub(trainer_pb2_grpc.TrainerServiceStub(channel), "tenant-a")
            resumable = await create(stub, spec())
            await wait_state(stub, resumable.id, trainer_pb2.JOB_STATE_RUNNING)
    # The trainer stopped with the job RUNNING; the next one queues it again to resume.
    launcher = FakeLauncher(([], None), ([], None))
    async with running(await create_app(settings, launcher)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = TenantStub(trainer_pb2_grpc.TrainerServiceStub(channel), "tenant-a")
            again = await wait_state(stub, resumable.id, trainer_pb2.JOB_STATE_RUNNING)
            assert again.attempts == 2
            stream = stub.WatchJob(trainer_pb2.WatchJobRequest(id=resumable.id, after_sequence=1))
            resumed = (await stream.read()).event
            stream.cancel()
            assert "resumes" in resumed.log.message or "starts over" in resumed.log.message
    # A third start finds it interrupted twice (the limit): FAILED with the reason.
    async with running(await create_app(settings, FakeLauncher())) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = TenantStub(trainer_pb2_grpc.TrainerServiceStub(channel), "tenant-a")
            failed = await wait_state(stub, resumable.id, trainer_pb2.JOB_STATE_FAILED)
            assert "2 times: giving up" in failed.message


async def test_a_unique_prefix_names_a_job_within_the_tenant(trainer, other_trainer) -> None:
    first, second = await create(trainer, spec()), await create(trainer, spec())
    foreign = await create(other_trainer, spec())
    shared = os.path.commonprefix([first.id, second.id, foreign.id])
    assert len(shared) >= len("job-") + MIN_ID_PREFIX  # created a moment apart: the same time digits
    # Everything but the last character is this job's alone: get, cancel and watch accept it.
    prefix = second.id[:-1]
    assert (await trainer.GetJob(trainer_pb2.GetJobRequest(id=prefix))).job.id == second.id
    cancelled = (await trainer.CancelJob(trainer_pb2.CancelJobRequest(id=prefix))).job
    assert cancelled.id == second.id and cancelled.state == trainer_pb2.JOB_STATE_CANCELLED
    assert (await watch(trainer, prefix))[-1].finished.state == trainer_pb2.JOB_STATE_CANCELLED
    # A prefix of two is refused, naming both.
    details = await expect(CODE.INVALID_ARGUMENT, trainer.GetJob(trainer_pb2.GetJobRequest(id=shared)), "give more")
    assert first.id in details and second.id in details and foreign.id not in details
    # Another tenant's job is as unknown as a missing one, and never makes a prefix ambiguous.
    missing = await expect(CODE.NOT_FOUND, trainer.GetJob(trainer_pb2.GetJobRequest(id=foreign.id)))
    assert missing == f"job {foreign.id!r} not found"
    await expect(CODE.NOT_FOUND, trainer.CancelJob(trainer_pb2.CancelJobRequest(id=foreign.id[:-1])))
    mine = await other_trainer.GetJob(trainer_pb2.GetJobRequest(id=shared))
    assert mine.job.id == foreign.id
    # Too short a prefix is refused with the rule.
    await expect(CODE.INVALID_ARGUMENT, trainer.GetJob(trainer_pb2.GetJobRequest(id="job-01")), "at least 8")


def test_the_job_store_takes_a_prefix_literally(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    upgrade(engine, MIGRATIONS)
    store = JobStore(engine)
    for job_id in ("job-ab%cd", "job-abxcd", "job-ab_cd", "job-abycd"):
        store.create(replace(job("acme", 0), id=job_id), ("queued", {}))
    # `%` and `_` are no wildcards: each names the one job that holds it.
    assert store.get("acme", "job-ab%").id == "job-ab%cd"
    assert store.get("acme", "job-ab_").id == "job-ab_cd"
    with pytest.raises(NotFound):
        store.get("acme", "job-a%d")
    with pytest.raises(InvalidArgument, match="job-abxcd, job-abycd"):
        store.get("acme", "job-ab")  # `_`, `%`, x and y: four matches
    with pytest.raises(NotFound):
        store.get("other", "job-abxcd")
