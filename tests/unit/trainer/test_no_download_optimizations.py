"""The optimization side door of a no-download model: what an optimization of it registers
(quantized, pruned, distilled or an ONNX export: all carry its weights) is no-download too. A new
target model is created marked; a target that allows downloads is refused when the job is
created, and again at registration if it appeared or the source was marked meanwhile."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from maas.registry.v1 import registry_pb2
from maas.trainer.v1 import trainer_pb2

from services.common.channels import CALLER_ROLE_KEY
from tests.unit.registry.conftest import expect_status
from tests.unit.trainer.conftest import TenantStub, registry_server  # noqa: F401  (fixture)
from tests.unit.trainer.test_optimization_jobs import (
    INT8,
    onnx_bytes,
    optimization,
    optimize,
    torchscript_bytes,
    upload,
)
from tests.unit.trainer.test_trainer_jobs import CODE, expect, trainer_server, wait_state  # noqa: F401
from tests.unit.trainer.trainer_fakes import FakeWorker, torchscript_result

EXPORT = {"export": trainer_pb2.ExportMethod()}


class GatedWorker(FakeWorker):
    """Reports its result only once the test opens the gate: the registry changes meanwhile."""

    def __init__(self, events: list[dict[str, Any]], gate: asyncio.Event) -> None:
        super().__init__(events, 0)
        self.gate = gate

    async def events(self):
        await self.gate.wait()
        async for event in super().events():
            yield event

    async def stop(self, grace: float) -> None:
        self.gate.set()  # a trainer stopping never waits for a closed gate
        await super().stop(grace)


class GatedLauncher:
    """Every job's worker writes a real artifact for its result (ONNX for an export) and waits
    for `gate`, which is open unless a test closes it."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, folder: Path, workers: int, threads: int) -> GatedWorker:
        result = torchscript_result(folder)
        if "export" in (folder / "job.json").read_text():
            (folder / "model.onnx").write_bytes(onnx_bytes())
            result.update(artifact="model.onnx", format="ONNX")
        return GatedWorker([{**result, "parent_metrics": {}}], self.gate)


@pytest.fixture
def launcher() -> GatedLauncher:
    return GatedLauncher()


async def source(registry: TenantStub, name: str, no_download: bool) -> None:
    await registry.CreateModel(registry_pb2.CreateModelRequest(name=name, no_download=no_download))
    await upload(registry, name, torchscript_bytes(), registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT)


async def model(registry: TenantStub, name: str) -> registry_pb2.Model:
    return (await registry.GetModel(registry_pb2.GetModelRequest(name=name))).model


async def developer_download(registry: TenantStub, name: str) -> None:
    metadata = (*registry.metadata, (CALLER_ROLE_KEY, "developer"))
    request = registry_pb2.DownloadVersionRequest(model=name, version=1)
    _ = [part async for part in registry._stub.DownloadVersion(request, metadata=metadata)]


@pytest.mark.parametrize("method", [INT8, EXPORT], ids=["quantize", "export"])
async def test_an_optimization_into_a_new_model_registers_it_no_download(trainer, registry, method) -> None:
    await source(registry, "secret", no_download=True)
    job = await optimize(trainer, optimization(model="secret", **method), model="secret-copy")
    done = await wait_state(trainer, job.id, trainer_pb2.JOB_STATE_SUCCEEDED)
    assert done.result.model == "secret-copy"
    copy = await model(registry, "secret-copy")
    assert copy.no_download and copy.latest_version == 1
    await expect_status(CODE.PERMISSION_DENIED, developer_download(registry, "secret-copy"), "marked no-download")
    # Into the source itself: a new version of a no-download model.
    job = await optimize(trainer, optimization(model="secret", **method))
    await wait_state(trainer, job.id, trainer_pb2.JOB_STATE_SUCCEEDED)
    assert (await model(registry, "secret")).latest_version == 2


async def test_a_target_that_allows_downloads_is_refused_and_nothing_is_left(
    trainer, registry, settings
) -> None:
    await source(registry, "secret", no_download=True)
    await registry.CreateModel(registry_pb2.CreateModelRequest(name="open"))
    for method in (INT8, EXPORT):
        await expect(CODE.FAILED_PRECONDITION, optimize(trainer, optimization(model="secret", **method), model="open"),
                     "model 'secret' is marked no-download, so every model its optimizations register into must be "
                     "too, and model 'open' allows downloads")
    assert list(settings.trainer_jobs_dir.iterdir()) == []
    assert not (await trainer.ListJobs(trainer_pb2.ListJobsRequest())).jobs
    # Once the target is marked (any developer may), the job runs.
    await registry.UpdateModel(registry_pb2.UpdateModelRequest(
        model=registry_pb2.Model(name="open", no_download=True), update_mask={"paths": ["no_download"]}))
    job = await optimize(trainer, optimization(model="secret", **INT8), model="open")
    await wait_state(trainer, job.id, trainer_pb2.JOB_STATE_SUCCEEDED)
    # A model that allows downloads optimizes into any target as before.
    await source(registry, "plain", no_download=False)
    job = await optimize(trainer, optimization(model="plain", **EXPORT), model="plain-edge")
    await wait_state(trainer, job.id, trainer_pb2.JOB_STATE_SUCCEEDED)
    assert not (await model(registry, "plain-edge")).no_download


async def test_a_downloadable_target_created_while_the_job_ran_gets_nothing(trainer, registry, launcher) -> None:
    await source(registry, "secret", no_download=True)
    launcher.gate.clear()
    job = await optimize(trainer, optimization(model="secret", **INT8), model="later")
    await wait_state(trainer, job.id, trainer_pb2.JOB_STATE_RUNNING)
    await registry.CreateModel(registry_pb2.CreateModelRequest(name="later"))
    launcher.gate.set()
    failed = await wait_state(trainer, job.id, trainer_pb2.JOB_STATE_FAILED)
    assert "registering the result failed" in failed.message and "'later' allows downloads" in failed.message
    assert (await model(registry, "later")).latest_version == 0


async def test_a_source_marked_or_deleted_while_the_job_ran_still_marks_the_result(
    trainer, registry, launcher
) -> None:
    await source(registry, "marked-later", no_download=False)
    await source(registry, "deleted-later", no_download=True)
    # Made while the job runs (a gRPC call starts when it is made, not when awaited).
    def mark():
        return registry.UpdateModel(registry_pb2.UpdateModelRequest(
            model=registry_pb2.Model(name="marked-later", no_download=True), update_mask={"paths": ["no_download"]}))

    def delete():
        return registry.DeleteModel(registry_pb2.DeleteModelRequest(name="deleted-later"))

    # One at a time: a tenant runs one job at once here.
    for name, change, copy in (("marked-later", mark, "copy-a"), ("deleted-later", delete, "copy-b")):
        launcher.gate.clear()
        job = await optimize(trainer, optimization(model=name, **INT8), model=copy)
        await wait_state(trainer, job.id, trainer_pb2.JOB_STATE_RUNNING)
        await change()
        launcher.gate.set()
        await wait_state(trainer, job.id, trainer_pb2.JOB_STATE_SUCCEEDED)
        assert (await model(registry, copy)).no_download
