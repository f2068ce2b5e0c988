"""Training minutes: a job's quota is checked when it is created (Admission.check_training) and
what it really ran is counted once it ends.

Every job created through the gateway is recorded in the gateway's SQL with its tenant and
key. A background task asks the trainer about unsettled jobs and, for each one that reached a
terminal state, counts its seconds (end - start, times its workers) against the tenant's
training quota and in usage. The record is marked settled in the same step (a conditional
update, so only one replica counts a job); a gateway that restarts picks up whatever was left
unsettled. The same transaction adds the seconds to billable usage, as CPU-seconds or
GPU-seconds by the device the job ran on, on the UTC day it ended: billed exactly once."""

from __future__ import annotations

import asyncio
import logging
import math
from datetime import UTC, datetime

import grpc
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from prometheus_client import Counter

from services.common.channels import internal_metadata
from services.common.periodic import Periodic
from services.gateway.admission import Admission
from services.gateway.store import BillableRecord, GatewayStore, TrainingJobRecord
from services.gateway.usage import TRAINING_CPU_SECONDS, TRAINING_GPU_SECONDS

log = logging.getLogger(__name__)

TERMINAL = frozenset(
    {trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED}
)
SETTLED = Counter(
    "maas_gateway_training_seconds_settled_total", "Training seconds counted once jobs ended", ["tenant"]
)
# Unsettled jobs read from SQL at a time; a round goes through all of them.
PAGE = 100


def job_seconds(job: trainer_pb2.Job) -> int:
    """What a terminal job ran: its wall time times its workers, rounded up; 0 if it never started."""
    if not (job.HasField("start_time") and job.HasField("end_time")):
        return 0
    elapsed = (job.end_time.ToDatetime() - job.start_time.ToDatetime()).total_seconds()
    workers = job.spec.workers if job.spec.HasField("workers") and job.spec.workers > 0 else 1
    return max(0, math.ceil(elapsed * workers))


def billed_seconds(tenant: str, job: trainer_pb2.Job, seconds: int) -> BillableRecord | None:
    """A terminal job's seconds as billable usage on the UTC day it ended, per GPU-second when it
    ran on CUDA, else per CPU-second; None when it ran none."""
    if not seconds:
        return None
    resource = TRAINING_GPU_SECONDS if job.device == "cuda" else TRAINING_CPU_SECONDS
    day = job.end_time.ToDatetime().strftime("%Y-%m-%d")  # a Timestamp reads back in UTC
    return BillableRecord(day, tenant, resource, "", seconds)


class TrainingSettlement:
    def __init__(
        self,
        store: GatewayStore,
        trainer: grpc.aio.Channel,
        token: str,
        admission: Admission,
        interval_seconds: float,
    ) -> None:
        self.store = store
        self.trainer = trainer_pb2_grpc.TrainerServiceStub(trainer)
        self.token = token
        self.admission = admission
        self._rounds = Periodic("training-settlement", self.settle_ended, interval_seconds)

    async def record(self, tenant: str, key_id: str, response: bytes) -> None:
        """After CreateTrainingJob or CreateOptimizationJob succeeded: remember the job to settle."""
        # Both responses carry the job as field 1.
        job = trainer_pb2.CreateTrainingJobResponse.FromString(response).job
        record = TrainingJobRecord(job.id, tenant, key_id, datetime.now(UTC))
        await asyncio.to_thread(self.store.add_training_job, record)

    def start(self) -> None:
        self._rounds.start()

    async def close(self) -> None:
        await self._rounds.close()

    async def settle_ended(self) -> int:
        """Count every recorded job that has ended; returns how many were settled."""
        settled = 0
        for record in await self._unsettled():
            job = await self._job(record)
            if job is not None and job.state not in TERMINAL:
                continue
            # A job the trainer no longer knows is settled with nothing to count.
            seconds = job_seconds(job) if job is not None else 0
            billed = billed_seconds(record.tenant, job, seconds) if job is not None else None
            settled_now = await asyncio.to_thread(
                self.store.settle_training_job, record.job_id, seconds, datetime.now(UTC), billed
            )
            if settled_now:
                if seconds:
                    await self.admission.settle_training(record.tenant, record.api_key_id, seconds)
                    SETTLED.labels(record.tenant).inc(seconds)
                settled += 1
                log.info("training job settled", extra={"job": record.job_id, "seconds": seconds})
        return settled

    async def _unsettled(self) -> list[TrainingJobRecord]:
        records: list[TrainingJobRecord] = []
        while True:
            after = records[-1].job_id if records else ""
            page = await asyncio.to_thread(self.store.unsettled_training_jobs, after, PAGE)
            records += page
            if len(page) < PAGE:
                return records

    async def _job(self, record: TrainingJobRecord) -> trainer_pb2.Job | None:
        request = trainer_pb2.GetJobRequest(id=record.job_id)
        try:
            response = await self.trainer.GetJob(
                request, metadata=internal_metadata(self.token, record.tenant), timeout=10
            )
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return response.job
