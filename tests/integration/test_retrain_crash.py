"""A retraining policy on a real trainer process (real workers, the real evaluation process) with
a real registry, the trainer killed with SIGKILL mid-run: during its training job, and during its
evaluation. Each run carries on after the restart and ends measured, never rolled out half-evaluated.

The data: digits as CSV. Version 1 holds 200 rows; version 2 all 1797; version 3 is version 2
with the training rows' labels scrambled (their features permuted among them, which keeps every
row's label and so the split), its test rows intact: a deliberately worse dataset."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from sklearn.datasets import load_digits

from services.stack.ephemeral import free_port
from services.trainer import data as datasets
from services.trainer.retrain import VERDICT_KEY
from tests.integration.test_trainer_training import first_event, serving, worker_processes
from tests.unit.trainer.conftest import TOKEN, TenantStub, registry_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
ACTIVE = (trainer_pb2.RETRAIN_RUN_STATE_TRAINING, trainer_pb2.RETRAIN_RUN_STATE_EVALUATING,
          trainer_pb2.RETRAIN_RUN_STATE_ROLLING_OUT)
# Long enough to be killed mid-way, short enough for a test: about a second of training.
SPEC = trainer_pb2.TrainingSpec(
    architecture=trainer_pb2.Architecture(mlp=trainer_pb2.MlpArchitecture(hidden_sizes=[64])),
    dataset=trainer_pb2.DatasetSource(registry=trainer_pb2.RegistryDataset(name="digits-data")),
    device=trainer_pb2.DEVICE_CPU, epochs=40,
)


def digits_csv(x: np.ndarray, y: np.ndarray) -> bytes:
    header = ",".join([f"p{i}" for i in range(64)] + ["digit"])
    rows = [",".join([*(str(int(v)) for v in row), str(int(t))]) for row, t in zip(x, y, strict=True)]
    return ("\n".join([header, *rows]) + "\n").encode()


def dataset_versions() -> list[bytes]:
    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target
    arrays = datasets.Arrays(x, y.astype(np.int64), "classification", 10)
    # The split every run makes (the spec's defaults: seed 0, 0.15 and 0.15).
    train, val, _ = datasets.split(arrays, 0.15, 0.15, 0, 0)
    kept = np.concatenate([train, val])
    scrambled = x.copy()
    scrambled[kept] = x[np.random.default_rng(1).permutation(kept)]
    return [digits_csv(x[:200], y[:200]), digits_csv(x, y), digits_csv(scrambled, y)]


def start_trainer(home: Path, registry_port: int, port: int) -> subprocess.Popen:
    env = dict(os.environ, MAAS_HOME=str(home), MAAS_TRAINER_ADDR=f"127.0.0.1:{port}",
               MAAS_TRAINER_METRICS_ADDR=f"127.0.0.1:{free_port()}", MAAS_REGISTRY_ADDR=f"127.0.0.1:{registry_port}",
               # No deployment in this policy: the inference service is never asked.
               MAAS_INFERENCE_ADDR=f"127.0.0.1:{free_port()}", MAAS_INTERNAL_TOKEN=TOKEN,
               MAAS_TRAINER_RETRAIN_POLL_SECONDS="0.2")
    return subprocess.Popen([sys.executable, "-m", "services.trainer"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=(home / "trainer.log").open("ab"))


async def upload(registry: TenantStub, data: bytes) -> int:
    header = registry_pb2.DatasetVersionHeader(dataset="digits-data", sha256=hashlib.sha256(data).hexdigest(),
                                               size_bytes=len(data))
    response = await registry.UploadDatasetVersion(iter([registry_pb2.UploadDatasetVersionRequest(header=header),
                                                         registry_pb2.UploadDatasetVersionRequest(chunk=data)]))
    return response.version.version


async def status(stub: TenantStub) -> trainer_pb2.GetRetrainPolicyResponse:
    return await stub.GetRetrainPolicy(trainer_pb2.GetRetrainPolicyRequest(model="digits"))


async def run_for(stub: TenantStub, dataset_version: int, states: tuple[int, ...], timeout: float = 120
                  ) -> trainer_pb2.RetrainRun:
    """The run on `dataset_version`, once it is in one of `states`."""
    deadline = time.monotonic() + timeout
    while True:
        runs = [run for run in (await status(stub)).runs if run.dataset_version == dataset_version]
        if runs and runs[0].state in states:
            return runs[0]
        assert time.monotonic() < deadline, f"no run on dataset version {dataset_version} in {states}: {runs}"
        await asyncio.sleep(0.05)


async def job_created(stub: TenantStub, job_id: str, timeout: float = 60) -> None:
    """A run names its job before creating it (fetching its dataset first): wait for the job."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await stub.GetJob(trainer_pb2.GetJobRequest(id=job_id))
            return
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND and time.monotonic() < deadline, error
        await asyncio.sleep(0.05)


def evaluation_processes() -> list[int]:
    return [pid for pid in worker_processes("services.trainer.retrain_eval") if pid != os.getpid()]


class Trainer:
    """The trainer process and a stub on it, restartable."""

    def __init__(self, home: Path, registry_port: int) -> None:
        self.home, self.registry_port, self.port = home, registry_port, free_port()
        self.process: subprocess.Popen | None = None
        self.channel: grpc.aio.Channel | None = None

    async def start(self) -> TenantStub:
        self.process = start_trainer(self.home, self.registry_port, self.port)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        await serving(self.process, self.channel, self.home)
        await asyncio.sleep(0.5)  # the server listens before its start-up work ends
        return TenantStub(trainer_pb2_grpc.TrainerServiceStub(self.channel), "tenant-a")

    async def kill(self) -> None:
        assert self.process is not None and self.channel is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        await self.channel.close()

    async def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)
        if self.channel is not None:
            await self.channel.close()


async def test_a_trainer_killed_mid_run_carries_its_runs_on(tmp_path: Path, registry_server) -> None:  # noqa: F811
    v1, v2, v3 = dataset_versions()
    trainer = Trainer(tmp_path, registry_server.port)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry_server.port}") as registry_channel:
        registry = TenantStub(registry_pb2_grpc.RegistryServiceStub(registry_channel), "tenant-a")
        await registry.CreateDataset(registry_pb2.CreateDatasetRequest(
            name="digits-data", format=registry_pb2.DATASET_FORMAT_CSV, target_column="digit"))
        await upload(registry, v1)
        try:
            stub = await trainer.start()
            first = (await stub.CreateTrainingJob(trainer_pb2.CreateTrainingJobRequest(spec=SPEC, model="digits"))).job
            await first_event(stub, first.id, "finished")
            policy = trainer_pb2.RetrainPolicy(model="digits", trigger=trainer_pb2.RETRAIN_TRIGGER_NEW_DATASET_VERSION,
                                               dataset="digits-data", cooldown_seconds=1)
            await stub.SetRetrainPolicy(trainer_pb2.SetRetrainPolicyRequest(policy=policy))

            # Killed while the run's job trains: the job resumes from its checkpoint, the run follows it.
            assert await upload(registry, v2) == 2
            run = await run_for(stub, 2, (trainer_pb2.RETRAIN_RUN_STATE_TRAINING,))
            await job_created(stub, run.job_id)
            await first_event(stub, run.job_id, "checkpoint")
            await trainer.kill()
            deadline = time.monotonic() + 10
            while worker_processes(run.job_id):  # orphaned workers notice and exit
                assert time.monotonic() < deadline, "the worker outlived its trainer"
                await asyncio.sleep(0.1)
            stub = await trainer.start()
            done = await run_for(stub, 2, (trainer_pb2.RETRAIN_RUN_STATE_PROMOTED, trainer_pb2.RETRAIN_RUN_STATE_REJECTED))
            job = (await stub.GetJob(trainer_pb2.GetJobRequest(id=run.job_id))).job
            assert job.attempts == 2 and job.state == trainer_pb2.JOB_STATE_SUCCEEDED
            candidate = (await registry.GetVersion(registry_pb2.GetVersionRequest(model="digits", version=2))).version
            # Measured on the test split the job itself measured: the same figure.
            assert done.candidate_metric == pytest.approx(candidate.metrics["test_accuracy"], abs=1e-6)
            assert (done.candidate_version, done.serving_version) == (2, 1)
            won = done.candidate_metric >= done.serving_metric
            assert done.state == (trainer_pb2.RETRAIN_RUN_STATE_PROMOTED if won else trainer_pb2.RETRAIN_RUN_STATE_REJECTED)
            assert candidate.metadata[VERDICT_KEY] == ("accepted" if won else "rejected")

            # Killed while the run evaluates: evaluated again from scratch after the restart.
            await asyncio.sleep(1.0)  # the cooldown
            assert await upload(registry, v3) == 3
            run = await run_for(stub, 3, (trainer_pb2.RETRAIN_RUN_STATE_EVALUATING,))
            await trainer.kill()
            deadline = time.monotonic() + 10
            while evaluation_processes():  # the evaluation notices its trainer is gone and exits
                assert time.monotonic() < deadline, "the evaluation outlived its trainer"
                await asyncio.sleep(0.1)
            stub = await trainer.start()
            done = await run_for(stub, 3, (trainer_pb2.RETRAIN_RUN_STATE_REJECTED, trainer_pb2.RETRAIN_RUN_STATE_PROMOTED,
                                           trainer_pb2.RETRAIN_RUN_STATE_FAILED))
            assert done.state == trainer_pb2.RETRAIN_RUN_STATE_REJECTED, done
            expected_serving = 2 if won else 1
            assert (done.candidate_version, done.serving_version) == (3, expected_serving)
            assert done.candidate_metric < 0.3 < 0.6 < done.serving_metric
            scrambled = (await registry.GetVersion(registry_pb2.GetVersionRequest(model="digits", version=3))).version
            assert scrambled.metadata[VERDICT_KEY] == "rejected"
            events = [e for e in (await status(stub)).events if e.run_id == run.id]
            assert [e.step for e in events].count("evaluated") == 1
            assert [e.step for e in events][-1] == "rejected"
            assert json.loads(scrambled.metadata["maas.baseline"])["samples"] > 0
        finally:
            await trainer.stop()
