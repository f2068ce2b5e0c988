"""Real training jobs: worker processes, torchrun, the quality bars, determinism, cancel, and a
trainer killed with SIGKILL that resumes its job from the checkpoint after a restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc

from services.common.server import running
from services.stack.ephemeral import free_port
from services.trainer.server import create_app
from tests.unit.trainer.conftest import (  # noqa: F401  (fixtures)
    TOKEN,
    TenantStub,
    registry_server,
    trainer_settings,
    watch,
)

pytestmark = pytest.mark.slow
TERMINAL = (trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED)


def spec(arch: str, dataset: str, architecture: object = None, **fields) -> trainer_pb2.TrainingSpec:
    return trainer_pb2.TrainingSpec(
        architecture=trainer_pb2.Architecture(**{arch: architecture or {}}),
        dataset=trainer_pb2.DatasetSource(builtin=dataset, max_samples=fields.pop("max_samples", 0)),
        device=trainer_pb2.DEVICE_CPU, **fields,
    )


QUALITY = {
    "digits-cnn": (spec("cnn", "digits", epochs=8), "test_accuracy", 0.97),
    "iris-softmax": (spec("logistic", "iris", epochs=60, learning_rate=0.05, batch_size=16), "test_accuracy", 0.93),
    "cancer-logistic": (spec("logistic", "breast_cancer", epochs=20, learning_rate=0.01, batch_size=32),
                        "test_accuracy", 0.94),
    "diabetes-linear": (spec("linear", "diabetes", epochs=60, learning_rate=0.01, batch_size=32), "test_r2", 0.4),
}
GPT = spec("gpt", "shakespeare", epochs=2, max_samples=3000, batch_size=32, learning_rate=3e-3)


@pytest.fixture
async def trainer(tmp_path: Path, registry_server) -> AsyncIterator[TenantStub]:  # noqa: F811
    settings = trainer_settings(tmp_path, registry_server.port, trainer_max_running_jobs=2,
                                trainer_max_running_jobs_per_tenant=2)
    async with running(await create_app(settings)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield TenantStub(trainer_pb2_grpc.TrainerServiceStub(channel), "tenant-a")


@pytest.fixture
async def registry(registry_server) -> AsyncIterator[TenantStub]:  # noqa: F811
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry_server.port}") as channel:
        yield TenantStub(registry_pb2_grpc.RegistryServiceStub(channel), "tenant-a")


async def submit(stub: TenantStub, training: trainer_pb2.TrainingSpec, model: str) -> str:
    request = trainer_pb2.CreateTrainingJobRequest(spec=training, model=model)
    return (await stub.CreateTrainingJob(request)).job.id


async def finish(stub: TenantStub, job_id: str) -> trainer_pb2.Job:
    events = await watch(stub, job_id)
    assert events[-1].WhichOneof("kind") == "finished"
    job = (await stub.GetJob(trainer_pb2.GetJobRequest(id=job_id))).job
    assert job.state == trainer_pb2.JOB_STATE_SUCCEEDED, job.message
    return job


async def test_quality_bars_and_the_same_seed_gives_the_same_metrics(trainer, registry) -> None:
    ids = {name: await submit(trainer, training, name) for name, (training, _, _) in QUALITY.items()}
    ids["iris-again"] = await submit(trainer, QUALITY["iris-softmax"][0], "iris-softmax")
    jobs = {name: await finish(trainer, job_id) for name, job_id in ids.items()}
    for name, (_, metric, bar) in QUALITY.items():
        assert jobs[name].result.metrics[metric] >= bar, (name, dict(jobs[name].result.metrics))
    assert dict(jobs["iris-again"].result.metrics) == dict(jobs["iris-softmax"].result.metrics)
    assert jobs["iris-again"].result.version == 2
    version = (await registry.GetVersion(registry_pb2.GetVersionRequest(model="digits-cnn", version=1))).version
    assert [s.name for s in version.signature.inputs] == ["x"] and list(version.signature.inputs[0].shape) == [8, 8]
    assert list(version.signature.outputs[0].shape) == [10]
    assert version.lineage.job_id == ids["digits-cnn"] and version.lineage.hyperparameters["cnn.channels"] == "[32, 64]"


async def test_the_gpt_learns_shakespeare(trainer, registry) -> None:
    job = await finish(trainer, await submit(trainer, GPT, "shakespeare-gpt"))
    metrics = job.result.metrics
    assert metrics["val_loss"] < metrics["unigram_loss"] - 0.5, dict(metrics)
    text = (await registry.GetVersion(registry_pb2.GetVersionRequest(model="shakespeare-gpt", version=1))).version
    assert [s.name for s in text.signature.inputs] == ["tokens"] and list(text.signature.inputs[0].shape) == [-1]
    assert len(text.metadata["vocabulary"]) == list(text.signature.outputs[0].shape)[-1]


async def test_two_workers_with_torchrun_reach_the_same_band(trainer) -> None:
    training = spec("mlp", "digits", epochs=10, batch_size=64)
    single = await submit(trainer, training, "digits-one")
    training.workers = 2
    double = await submit(trainer, training, "digits-two")
    one, two = await finish(trainer, single), await finish(trainer, double)
    events = await watch(trainer, double)
    assert next(e.started for e in events if e.WhichOneof("kind") == "started").workers == 2
    assert one.result.metrics["test_accuracy"] >= 0.95 and two.result.metrics["test_accuracy"] >= 0.95
    assert abs(one.result.metrics["test_accuracy"] - two.result.metrics["test_accuracy"]) <= 0.03


def worker_processes(job_id: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if job_id.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


async def first_event(stub: TenantStub, job_id: str, kind: str) -> trainer_pb2.JobEvent:
    stream = stub.WatchJob(trainer_pb2.WatchJobRequest(id=job_id), timeout=120)
    async for response in stream:
        if response.event.WhichOneof("kind") == kind:
            stream.cancel()
            return response.event
    raise AssertionError(f"no {kind} event")


async def test_cancel_stops_a_running_job_promptly(trainer) -> None:
    job_id = await submit(trainer, spec("cnn", "digits", epochs=500), "endless")
    await first_event(trainer, job_id, "progress")
    assert worker_processes(job_id)
    started = time.monotonic()
    job = (await trainer.CancelJob(trainer_pb2.CancelJobRequest(id=job_id))).job
    assert job.state == trainer_pb2.JOB_STATE_CANCELLED
    # The call returns once the worker is gone; 2 s is the promise, the margin is for busy CI.
    assert time.monotonic() - started < 5
    assert not worker_processes(job_id)


def start_trainer(home: Path, registry_port: int, port: int) -> subprocess.Popen:
    env = dict(os.environ, MAAS_HOME=str(home), MAAS_TRAINER_ADDR=f"127.0.0.1:{port}",
               MAAS_TRAINER_METRICS_ADDR=f"127.0.0.1:{free_port()}", MAAS_REGISTRY_ADDR=f"127.0.0.1:{registry_port}",
               MAAS_INTERNAL_TOKEN=TOKEN)
    return subprocess.Popen([sys.executable, "-m", "services.trainer"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=(home / "trainer.log").open("ab"))


async def serving(process: subprocess.Popen, channel: grpc.aio.Channel, home: Path, timeout: float = 120) -> None:
    """Until the trainer listens; a trainer that exits or hangs fails the test with its own log."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await asyncio.wait_for(channel.channel_ready(), 1)
            return
        except TimeoutError:
            log = (home / "trainer.log").read_text(errors="replace")[-4000:]
            assert process.poll() is None, f"the trainer exited with {process.returncode}:\n{log}"
            assert time.monotonic() < deadline, f"the trainer did not listen in {timeout:.0f} s:\n{log}"


async def test_a_killed_trainer_resumes_its_job_from_the_checkpoint(tmp_path, registry_server) -> None:  # noqa: F811
    port = free_port()
    training = spec("cnn", "digits", epochs=6)
    process = start_trainer(tmp_path, registry_server.port, port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await serving(process, channel, tmp_path)
            stub = TenantStub(trainer_pb2_grpc.TrainerServiceStub(channel), "tenant-a")
            await asyncio.sleep(0.5)  # the server listens before its start-up work ends
            job_id = await submit(stub, training, "resumed")
            checkpoint = await first_event(stub, job_id, "checkpoint")
            assert checkpoint.checkpoint.epoch >= 1
        process.send_signal(signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 10
        while worker_processes(job_id):  # orphaned workers notice and exit
            assert time.monotonic() < deadline, "the worker outlived its trainer"
            await asyncio.sleep(0.1)
        process = start_trainer(tmp_path, registry_server.port, port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await serving(process, channel, tmp_path)
            stub = TenantStub(trainer_pb2_grpc.TrainerServiceStub(channel), "tenant-a")
            resumed = await finish(stub, job_id)
            assert resumed.attempts == 2
            starts = [e.started for e in await watch(stub, job_id) if e.WhichOneof("kind") == "started"]
            assert [s.attempt for s in starts] == [1, 2] and starts[1].resumed_from_epoch >= 1
            # Seeded per epoch: the resumed run ends exactly where an uninterrupted one does.
            fresh = await finish(stub, await submit(stub, training, "fresh"))
            assert dict(fresh.result.metrics) == dict(resumed.result.metrics)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
