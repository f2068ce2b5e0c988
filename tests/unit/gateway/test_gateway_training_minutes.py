"""Training minutes through the real gateway and a real redis-server, in front of a scripted
trainer: jobs created through the gateway are recorded, settled once they end (run time times
workers) into usage and the training quota, also by a gateway started after the one that saw
the job created; a used-up quota refuses the next CreateTrainingJob and CreateOptimizationJob.
Settling also bills the seconds once, per CPU-second or GPU-second by the device the job ran on."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from maas.gateway.v1 import admin_pb2
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from prometheus_client import REGISTRY

from services.common.channels import tenant_of
from services.common.database import make_engine, upgrade
from services.common.server import running
from services.gateway.server import MIGRATIONS, create_app
from services.gateway.store import BillableRecord, GatewayStore, TrainingJobRecord
from services.gateway.training import billed_seconds, job_seconds
from tests.unit.gateway.gateway_fakes import gateway_stack, serve
from tests.unit.gateway.test_gateway_limits import set_quota


def stamp(value: datetime) -> Timestamp:
    result = Timestamp()
    result.FromDatetime(value)
    return result


class ScriptedTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    """Queues every job it is given; the test ends them with the run time it wants."""

    def __init__(self) -> None:
        self.jobs: dict[str, tuple[str, trainer_pb2.Job]] = {}  # id -> (tenant, job)

    def _create(self, context, **fields) -> trainer_pb2.Job:  # type: ignore[no-untyped-def]
        job = trainer_pb2.Job(id=f"job-{len(self.jobs) + 1}", state=trainer_pb2.JOB_STATE_QUEUED, **fields)
        self.jobs[job.id] = (tenant_of(context), job)
        return job

    async def CreateTrainingJob(self, request, context):  # noqa: N802
        return trainer_pb2.CreateTrainingJobResponse(job=self._create(context, spec=request.spec))

    async def CreateOptimizationJob(self, request, context):  # noqa: N802
        return trainer_pb2.CreateOptimizationJobResponse(job=self._create(context))

    async def GetJob(self, request, context):  # noqa: N802
        tenant, job = self.jobs.get(request.id, ("", None))
        if job is None or tenant != tenant_of(context):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.id} not found")
        return trainer_pb2.GetJobResponse(job=job)

    def end(
        self, job_id: str, seconds: float, state: int = trainer_pb2.JOB_STATE_SUCCEEDED, ended: datetime | None = None
    ) -> None:
        job = self.jobs[job_id][1]
        start = (ended or datetime.now(UTC)) - timedelta(seconds=seconds)
        job.state = state
        job.start_time.CopyFrom(stamp(start))
        job.end_time.CopyFrom(stamp(start + timedelta(seconds=seconds)))


@pytest.fixture
async def trainer():
    scripted = ScriptedTrainer()
    server, address = await serve((trainer_pb2_grpc.add_TrainerServiceServicer_to_server, scripted))
    yield scripted, address
    await server.stop(0)


async def training_seconds(stack) -> int:  # type: ignore[no-untyped-def]
    response = await stack.admin.GetUsage(
        admin_pb2.GetUsageRequest(tenant="acme"), metadata=stack.auth("admin-of-admin")
    )
    return sum(row.training_seconds for row in response.rows)


async def eventually(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def test_job_seconds_are_wall_time_times_workers() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    job = trainer_pb2.Job(start_time=stamp(start), end_time=stamp(start + timedelta(seconds=10.2)))
    assert job_seconds(job) == 11
    job.spec.workers = 4
    assert job_seconds(job) == 41
    assert job_seconds(trainer_pb2.Job(state=trainer_pb2.JOB_STATE_CANCELLED)) == 0  # cancelled while queued


def test_a_job_from_a_trainer_that_names_no_device_is_billed_per_cpu_second() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    job = trainer_pb2.Job(start_time=stamp(start), end_time=stamp(start + timedelta(seconds=5)))
    assert billed_seconds("acme", job, 5) == BillableRecord("2026-01-01", "acme", "training_cpu_seconds", "", 5)
    assert billed_seconds("acme", job, 0) is None


async def test_jobs_are_settled_after_a_gateway_restart_and_then_the_quota_refuses(tmp_path, redis_server,
                                                                                     trainer) -> None:
    scripted, address = trainer
    # The first gateway records jobs but never settles (as if it stopped before they ended).
    async with gateway_stack(
        tmp_path, redis_url=redis_server.url, trainer_addr=address, training_settle_seconds=0
    ) as stack:
        await set_quota(stack, "acme", training_minutes_per_day=1)
        stub = trainer_pb2_grpc.TrainerServiceStub(stack.channel)
        spec = trainer_pb2.TrainingSpec(workers=2)
        created = await stub.CreateTrainingJob(
            trainer_pb2.CreateTrainingJobRequest(model="m", spec=spec), metadata=stack.auth("developer")
        )
        optimized = await stub.CreateOptimizationJob(
            trainer_pb2.CreateOptimizationJobRequest(), metadata=stack.auth("developer")
        )
        store = GatewayStore(make_engine(stack.settings.gateway_database_url))
        pending = {job.job_id: job for job in store.unsettled_training_jobs("", 10)}
        assert set(pending) == {created.job.id, optimized.job.id}
        assert pending[created.job.id].tenant == "acme"
        assert pending[created.job.id].api_key_id == stack.key_ids["developer"]

        # A later gateway on the same database settles what has ended, and only that.
        scripted.end(created.job.id, seconds=40)  # 2 workers: 80 s, over the 60 s budget
        restarted = stack.settings.model_copy(update={"training_settle_seconds": 0.05})
        async with running(await create_app(restarted)):

            async def first_settled() -> bool:
                return store.get_training_job(created.job.id).settle_time is not None

            await eventually(first_settled)
            assert store.get_training_job(created.job.id).seconds == 80
            assert store.get_training_job(optimized.job.id).settle_time is None  # still queued

            async def in_usage() -> bool:  # the settling gateway's meter pushes through Redis
                return await training_seconds(stack) == 80

            await eventually(in_usage)
            labels = {"tenant": "acme", "resource": "training_seconds", "period": "day"}
            assert REGISTRY.get_sample_value("maas_gateway_quota_used_ratio", labels) == pytest.approx(80 / 60)

            for call, request in (
                (stub.CreateTrainingJob, trainer_pb2.CreateTrainingJobRequest(model="m", spec=spec)),
                (stub.CreateOptimizationJob, trainer_pb2.CreateOptimizationJobRequest()),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call(request, metadata=stack.auth("developer"))
                assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "training seconds per day" in refused.value.details()

            # A job cancelled before it started costs nothing, and is settled all the same.
            scripted.jobs[optimized.job.id][1].state = trainer_pb2.JOB_STATE_CANCELLED

            async def second_settled() -> bool:
                return store.get_training_job(optimized.job.id).settle_time is not None

            await eventually(second_settled)
            assert store.get_training_job(optimized.job.id).seconds == 0
            assert await training_seconds(stack) == 80
        store.engine.dispose()


async def test_training_is_billed_once_by_device_on_the_day_the_job_ended(tmp_path, redis_server, trainer) -> None:
    scripted, address = trainer
    async with gateway_stack(
        tmp_path, redis_url=redis_server.url, trainer_addr=address, training_settle_seconds=0.05
    ) as stack:
        stub = trainer_pb2_grpc.TrainerServiceStub(stack.channel)
        spec = trainer_pb2.TrainingSpec(workers=2)
        on_cpu = await stub.CreateTrainingJob(
            trainer_pb2.CreateTrainingJobRequest(model="m", spec=spec), metadata=stack.auth("developer")
        )
        on_gpu = await stub.CreateOptimizationJob(
            trainer_pb2.CreateOptimizationJobRequest(), metadata=stack.auth("developer")
        )
        never_started = await stub.CreateTrainingJob(
            trainer_pb2.CreateTrainingJobRequest(model="m"), metadata=stack.auth("developer")
        )
        scripted.jobs[on_cpu.job.id][1].device = "cpu"
        scripted.end(on_cpu.job.id, seconds=30, ended=datetime(2026, 1, 31, 12, tzinfo=UTC))  # 2 workers
        scripted.jobs[on_gpu.job.id][1].device = "cuda"
        # Started before midnight, ended after: billed on the day it ended.
        scripted.end(on_gpu.job.id, seconds=12.5, state=trainer_pb2.JOB_STATE_FAILED,
                     ended=datetime(2026, 2, 1, 0, 0, 2, tzinfo=UTC))
        scripted.jobs[never_started.job.id][1].state = trainer_pb2.JOB_STATE_CANCELLED
        store = GatewayStore(make_engine(stack.settings.gateway_database_url))

        async def all_settled() -> bool:
            return store.unsettled_training_jobs("", 10) == []

        await eventually(all_settled)
        await asyncio.sleep(0.2)  # later rounds find nothing left to bill
        billed = {(row.day, row.resource, row.tier): row.quantity
                  for row in store.billable_usage("acme", "2026-01-01", "2026-02-28")}
        assert billed == {("2026-01-31", "training_cpu_seconds", ""): 60,
                          ("2026-02-01", "training_gpu_seconds", ""): 13}
        assert store.billable_usage("other", "2026-01-01", "2026-02-28") == []
        store.engine.dispose()


async def test_a_refused_or_failed_create_records_no_job(tmp_path, redis_server, trainer) -> None:
    _, address = trainer
    async with gateway_stack(
        tmp_path, redis_url=redis_server.url, trainer_addr=address, training_settle_seconds=0
    ) as stack:
        stub = trainer_pb2_grpc.TrainerServiceStub(stack.channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # a reader may not train
            await stub.CreateTrainingJob(trainer_pb2.CreateTrainingJobRequest(), metadata=stack.auth("reader"))
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        store = GatewayStore(make_engine(stack.settings.gateway_database_url))
        assert store.unsettled_training_jobs("", 10) == []
        store.engine.dispose()


def test_the_store_pages_unsettled_jobs_and_settles_each_once(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    upgrade(engine, MIGRATIONS)
    store = GatewayStore(engine)
    now = datetime.now(UTC)
    for number in range(5):
        store.add_training_job(TrainingJobRecord(f"job-{number}", "acme", "key", now))
    store.add_training_job(TrainingJobRecord("job-0", "acme", "key", now))  # recorded twice: kept once
    first = store.unsettled_training_jobs("", 3)
    assert [job.job_id for job in first] == ["job-0", "job-1", "job-2"]
    assert [job.job_id for job in store.unsettled_training_jobs(first[-1].job_id, 3)] == ["job-3", "job-4"]
    billed = BillableRecord("2026-03-01", "acme", "training_cpu_seconds", "", 42)
    assert store.settle_training_job("job-1", 42, now, billed) is True
    assert store.settle_training_job("job-1", 42, now, billed) is False  # another replica got there first
    assert store.billable_usage("acme", "2026-03-01", "2026-03-01") == [billed]  # billed once
    assert store.get_training_job("job-1").seconds == 42
    assert "job-1" not in [job.job_id for job in store.unsettled_training_jobs("", 10)]
    engine.dispose()
