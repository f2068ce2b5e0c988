"""Retraining through the trainer's gRPC face with a real registry in-process, the real retrain
loop and the real evaluation process (the worker is the scripted stand-in): status codes, and a
manual run from the trigger to a labelled, measured version."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from datetime import UTC, timedelta

import grpc
import numpy as np
import pytest
import torch
from maas.common.v1 import common_pb2
from maas.registry.v1 import registry_pb2
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from sklearn.datasets import load_iris

from services.common.database import make_engine
from services.common.interceptors import INTERNAL_TOKEN_KEY
from services.common.server import running
from services.stack.ephemeral import free_port
from services.trainer import data as datasets
from services.trainer.optimization_spec import TRAINING_SPEC_KEY
from services.trainer.retrain import EVENT_SETTLE_SECONDS, VERDICT_KEY
from services.trainer.retrain_store import RetrainEvent, RetrainStore, Run, RunState
from services.trainer.server import create_app
from services.trainer.spec import TrainingSpec, resolve
from services.trainer.store import now
from tests.unit.trainer.conftest import TOKEN, TenantStub, trainer_settings
from tests.unit.trainer.trainer_fakes import FakeLauncher, torchscript_result

CODE = grpc.StatusCode
SPEC = resolve(TrainingSpec(architecture="logistic", dataset="iris-data", builtin=False, dataset_version=1),
               max_epochs=1000, max_workers=8)


@pytest.fixture
def launcher() -> FakeLauncher:
    return FakeLauncher((lambda folder: [torchscript_result(folder)], 0))


@pytest.fixture
def settings(tmp_path, registry_server):
    # No inference service here: a closed port, which no policy in these tests reaches.
    return trainer_settings(tmp_path, registry_server.port, inference_addr=f"127.0.0.1:{free_port()}",
                            trainer_retrain_poll_seconds=0.1)


@pytest.fixture
async def trainer_server(settings, launcher):
    async with running(await create_app(settings, launcher)) as server:
        yield server


def iris_csv() -> bytes:
    bunch = load_iris()
    names = [str(name) for name in bunch.target_names]
    rows = ["a,b,c,d,species"] + [",".join([*map(str, x), names[t]]) for x, t in zip(bunch.data, bunch.target, strict=True)]
    return ("\n".join(rows) + "\n").encode()


async def upload_dataset(registry: TenantStub, data: bytes) -> None:
    await registry.CreateDataset(registry_pb2.CreateDatasetRequest(
        name="iris-data", format=registry_pb2.DATASET_FORMAT_CSV, target_column="species"))
    header = registry_pb2.DatasetVersionHeader(dataset="iris-data", sha256=hashlib.sha256(data).hexdigest(),
                                               size_bytes=len(data))
    await registry.UploadDatasetVersion(iter([registry_pb2.UploadDatasetVersionRequest(header=header),
                                              registry_pb2.UploadDatasetVersionRequest(chunk=data)]))


async def upload_version(registry: TenantStub, metadata: dict[str, str]) -> None:
    buffer = io.BytesIO()
    torch.manual_seed(3)
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 3)), buffer)
    data = buffer.getvalue()
    fp32 = common_pb2.DATA_TYPE_FP32
    header = registry_pb2.VersionHeader(
        model="iris", format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data), metadata=metadata,
        signature=common_pb2.Signature(inputs=[common_pb2.TensorSpec(name="x", datatype=fp32, shape=[4])],
                                       outputs=[common_pb2.TensorSpec(name="logits", datatype=fp32, shape=[3])]),
    )
    await registry.UploadVersion(iter([registry_pb2.UploadVersionRequest(header=header),
                                       registry_pb2.UploadVersionRequest(chunk=data)]))


async def download(registry: TenantStub, version: int) -> torch.jit.ScriptModule:
    parts = [p async for p in registry.DownloadVersion(registry_pb2.DownloadVersionRequest(model="iris", version=version))]
    return torch.jit.load(io.BytesIO(b"".join(p.chunk for p in parts[1:])))


async def expect(code: grpc.StatusCode, call, match: str = "") -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    assert match in (caught.value.details() or ""), caught.value.details()


def policy(**fields) -> trainer_pb2.RetrainPolicy:
    return trainer_pb2.RetrainPolicy(**{"model": "iris", "trigger": trainer_pb2.RETRAIN_TRIGGER_NEW_DATASET_VERSION,
                                        "dataset": "iris-data", **fields})


def set_policy(trainer: TenantStub, **fields):
    return trainer.SetRetrainPolicy(trainer_pb2.SetRetrainPolicyRequest(policy=policy(**fields)))


async def test_status_codes(trainer: TenantStub, registry: TenantStub) -> None:
    await expect(CODE.NOT_FOUND, set_policy(trainer), "model 'iris' not found")
    await registry.CreateModel(registry_pb2.CreateModelRequest(name="iris"))
    await upload_version(registry, {"task": "classification"})
    await upload_dataset(registry, iris_csv())
    await expect(CODE.FAILED_PRECONDITION, set_policy(trainer, from_version=1), "--from-version")
    await upload_version(registry, {TRAINING_SPEC_KEY: json.dumps(SPEC.to_dict()), "task": "classification"})
    await expect(CODE.NOT_FOUND, set_policy(trainer, from_version=7), "no version 7")
    await expect(CODE.NOT_FOUND, set_policy(trainer, dataset="nope"), "dataset 'nope' not found")
    await expect(CODE.INVALID_ARGUMENT, set_policy(trainer, trigger=trainer_pb2.RETRAIN_TRIGGER_UNSPECIFIED),
                 "choose a trigger")
    await expect(CODE.INVALID_ARGUMENT, set_policy(trainer, trigger=trainer_pb2.RETRAIN_TRIGGER_SCHEDULE,
                                                   interval_seconds=30), "between 60")
    await expect(CODE.INVALID_ARGUMENT, set_policy(trainer, action=trainer_pb2.RETRAIN_ACTION_CANARY),
                 "--deployment")
    await expect(CODE.INVALID_ARGUMENT, set_policy(trainer, action=trainer_pb2.RETRAIN_ACTION_ALIAS), "--alias")
    await expect(CODE.INVALID_ARGUMENT, set_policy(trainer, min_gain=-1), "min_gain")
    await expect(CODE.NOT_FOUND, trainer.GetRetrainPolicy(trainer_pb2.GetRetrainPolicyRequest(model="iris")))
    await expect(CODE.NOT_FOUND, trainer.TriggerRetrain(trainer_pb2.TriggerRetrainRequest(model="iris")))
    await expect(CODE.INVALID_ARGUMENT, trainer.ReportDrift(trainer_pb2.ReportDriftRequest(
        tenant="tenant-b", deployment="iris-prod", psi=0.5)), "not the tenant the call asserts")
    nothing = await trainer.ReportDrift(trainer_pb2.ReportDriftRequest(deployment="iris-prod", psi=0.5))
    assert list(nothing.runs) == []
    stored = (await set_policy(trainer)).policy
    assert (stored.from_version, stored.metric, stored.last_dataset_version) == (2, "accuracy", 1)
    assert stored.create_time.seconds > 0


async def test_a_manual_run_is_a_job_then_a_measured_labelled_version(
    trainer: TenantStub, other_trainer: TenantStub, registry: TenantStub
) -> None:
    await registry.CreateModel(registry_pb2.CreateModelRequest(name="iris"))
    await upload_dataset(registry, iris_csv())
    await upload_version(registry, {TRAINING_SPEC_KEY: json.dumps(SPEC.to_dict()), "task": "classification",
                                    "class_names": "setosa,versicolor,virginica"})
    await set_policy(trainer, cooldown_seconds=3600)
    run = (await trainer.TriggerRetrain(trainer_pb2.TriggerRetrainRequest(model="iris"))).run
    assert (run.state, run.reason, run.dataset_version) == (trainer_pb2.RETRAIN_RUN_STATE_TRAINING, "manual", 1)
    # The run's job is an ordinary job of the tenant's.
    job = (await trainer.GetJob(trainer_pb2.GetJobRequest(id=run.job_id))).job
    assert (job.model, job.parent_version, job.spec.dataset.registry.name) == ("iris", 1, "iris-data")
    await expect(CODE.NOT_FOUND, other_trainer.GetRetrainPolicy(trainer_pb2.GetRetrainPolicyRequest(model="iris")))
    deadline = asyncio.get_running_loop().time() + 120
    while True:
        status = await trainer.GetRetrainPolicy(trainer_pb2.GetRetrainPolicyRequest(model="iris"))
        if status.runs[0].state not in (trainer_pb2.RETRAIN_RUN_STATE_TRAINING, trainer_pb2.RETRAIN_RUN_STATE_EVALUATING):
            break
        assert asyncio.get_running_loop().time() < deadline, status
        await asyncio.sleep(0.1)
    done = status.runs[0]
    assert (done.candidate_version, done.serving_version) == (2, 1)
    # Both measured on the test split of iris-data version 1 as training splits it.
    x, y = load_iris().data.astype(np.float32), load_iris().target
    arrays = datasets.Arrays(x, y.astype(np.int64), "classification", 3)
    _, _, test = datasets.split(arrays, SPEC.validation_fraction, SPEC.test_fraction, SPEC.seed, 0)
    with torch.no_grad():
        expected = [float((model(torch.from_numpy(x[test])).argmax(1).numpy() == y[test]).mean())
                    for model in (await download(registry, 2), await download(registry, 1))]
    assert (done.candidate_metric, done.serving_metric) == pytest.approx(expected)
    won = expected[0] >= expected[1]
    assert done.state == (trainer_pb2.RETRAIN_RUN_STATE_PROMOTED if won else trainer_pb2.RETRAIN_RUN_STATE_REJECTED)
    version = (await registry.GetVersion(registry_pb2.GetVersionRequest(model="iris", version=2))).version
    assert version.metadata[VERDICT_KEY] == ("accepted" if won else "rejected")
    steps = [event.step for event in status.events]
    assert steps[:4] == ["triggered", "training", "trained", "evaluated"]
    assert steps[-1] == ("promoted" if won else "rejected")
    assert all(event.run_id == run.id for event in status.events)
    await trainer.DeleteRetrainPolicy(trainer_pb2.DeleteRetrainPolicyRequest(model="iris"))
    await expect(CODE.NOT_FOUND, trainer.GetRetrainPolicy(trainer_pb2.GetRetrainPolicyRequest(model="iris")))


async def test_a_drift_report_may_name_its_tenant_in_the_request(channels, trainer: TenantStub) -> None:
    stub = trainer_pb2_grpc.TrainerServiceStub(channels[1])
    token_only = ((INTERNAL_TOKEN_KEY, TOKEN),)
    request = trainer_pb2.ReportDriftRequest(tenant="tenant-a", deployment="iris-prod", psi=0.5, feature="x[1]")
    assert list((await stub.ReportDrift(request, metadata=token_only)).runs) == []
    await expect(CODE.UNAUTHENTICATED, stub.ReportDrift(trainer_pb2.ReportDriftRequest(deployment="iris-prod", psi=0.5),
                                                        metadata=token_only))
    await expect(CODE.UNAUTHENTICATED, stub.ReportDrift(request, metadata=()))


async def test_the_gateway_lists_every_tenants_events_with_the_internal_token_alone(channels, settings) -> None:
    store = RetrainStore(make_engine(settings.trainer_database_url))
    written = now() - timedelta(seconds=EVENT_SETTLE_SECONDS)
    for tenant, model in (("tenant-a", "iris"), ("tenant-b", "wine")):
        run = Run("run-1", tenant, model, RunState.TRAINING, "manual", 1, "job-1", {}, written)
        await asyncio.to_thread(store.add_event, run, RetrainEvent(run.id, written, "triggered", f"{model} by hand"))
    stub = trainer_pb2_grpc.TrainerServiceStub(channels[1])
    token_only = ((INTERNAL_TOKEN_KEY, TOKEN),)
    listed = (await stub.ListRetrainEvents(trainer_pb2.ListRetrainEventsRequest(), metadata=token_only)).events
    assert [(e.tenant, e.model, e.event.run_id, e.event.step, e.event.message) for e in listed] == [
        ("tenant-a", "iris", "run-1", "triggered", "iris by hand"),
        ("tenant-b", "wine", "run-1", "triggered", "wine by hand"),
    ]
    assert listed[0].event.time.ToDatetime(UTC) == written
    after_first = trainer_pb2.ListRetrainEventsRequest(after_id=listed[0].id, limit=1)
    assert list((await stub.ListRetrainEvents(after_first, metadata=token_only)).events) == [listed[1]]
    await expect(CODE.INVALID_ARGUMENT, stub.ListRetrainEvents(trainer_pb2.ListRetrainEventsRequest(after_id=-1),
                                                               metadata=token_only), "after_id")
    await expect(CODE.UNAUTHENTICATED, stub.ListRetrainEvents(trainer_pb2.ListRetrainEventsRequest(), metadata=()))


async def test_an_optimized_version_does_not_inherit_its_parents_verdict(
    trainer: TenantStub, registry: TenantStub, launcher: FakeLauncher
) -> None:
    await registry.CreateModel(registry_pb2.CreateModelRequest(name="iris"))
    await upload_version(registry, {"task": "classification", "owner": "team-a"})
    await registry.UpdateVersionMetadata(registry_pb2.UpdateVersionMetadataRequest(
        model="iris", version=1, metadata={VERDICT_KEY: "accepted", "maas.retrain.comparison": "accuracy 1 vs 0"}))
    launcher.scripts[:] = [(lambda folder: [{**torchscript_result(folder), "precision": "int8", "metadata": {},
                                             "metrics": {"artifact_bytes": 900.0}}], 0)]
    spec = trainer_pb2.OptimizationSpec(model="iris", version=1,
                                        quantize=trainer_pb2.QuantizeMethod(precision=trainer_pb2.PRECISION_INT8))
    job = (await trainer.CreateOptimizationJob(trainer_pb2.CreateOptimizationJobRequest(spec=spec))).job
    deadline = asyncio.get_running_loop().time() + 30
    while (await trainer.GetJob(trainer_pb2.GetJobRequest(id=job.id))).job.state != trainer_pb2.JOB_STATE_SUCCEEDED:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    version = (await registry.GetVersion(registry_pb2.GetVersionRequest(model="iris", version=2))).version
    assert version.metadata["owner"] == "team-a" and version.metadata["parent"] == "iris:1"
    assert not [key for key in version.metadata if key.startswith("maas.retrain.")]
