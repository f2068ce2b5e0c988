"""Optimization jobs over gRPC with a real registry and a scripted stand-in for the worker:
validation and status codes, the source fetched into the job folder, the spec round trip,
registration with precision, format, lineage and parent metrics, cancel, both job kinds, and a
trainer restart that runs an interrupted optimization job again."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from pathlib import Path

import grpc
import pytest
import torch
from maas.common.v1 import common_pb2
from maas.registry.v1 import registry_pb2
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from onnx import TensorProto, helper

from services.common.server import running
from services.trainer.server import create_app
from tests.unit.trainer.conftest import TenantStub, registry_server, trainer_settings, watch  # noqa: F401
from tests.unit.trainer.test_trainer_jobs import (  # noqa: F401  (fixtures)
    CODE,
    create,
    expect,
    launcher,
    spec,
    trainer_server,
    wait_state,
)
from tests.unit.trainer.trainer_fakes import RESULT_SIGNATURE, FakeLauncher, torchscript_result

SIGNATURE = common_pb2.Signature(
    inputs=[common_pb2.TensorSpec(name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=[4])],
    outputs=[common_pb2.TensorSpec(name="logits", datatype=common_pb2.DATA_TYPE_FP32, shape=[3])],
)


def torchscript_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 3)), buffer)
    return buffer.getvalue()


def onnx_bytes() -> bytes:
    """A real one-node graph, logits = x @ W, with a dynamic batch."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], [0.1] * 12)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def optimization(version: int = 1, model: str = "iris", **method) -> trainer_pb2.OptimizationSpec:
    return trainer_pb2.OptimizationSpec(model=model, version=version, **method)


INT8 = {"quantize": trainer_pb2.QuantizeMethod(precision=trainer_pb2.PRECISION_INT8)}


def distill(**fields) -> dict:
    student = fields.pop("student", trainer_pb2.Architecture(mlp=trainer_pb2.MlpArchitecture(hidden_sizes=[8])))
    return {"distill": trainer_pb2.DistillMethod(student=student, **fields)}


async def optimize(stub: TenantStub, spec: trainer_pb2.OptimizationSpec, model: str = "") -> trainer_pb2.Job:
    request = trainer_pb2.CreateOptimizationJobRequest(spec=spec, model=model)
    return (await stub.CreateOptimizationJob(request)).job


async def trained_source(trainer: TenantStub, launcher, model: str = "iris", training=None,  # noqa: F811
                         task: str = "classification") -> None:
    """Version 1 of `model`, registered by a (scripted) training job: it carries the training spec."""
    launcher.scripts.append((lambda folder: [{**torchscript_result(folder), "metadata": {"task": task}}], 0))
    job = await create(trainer, training or spec(), model=model)
    await wait_state(trainer, job.id, trainer_pb2.JOB_STATE_SUCCEEDED)


async def upload(registry: TenantStub, model: str, data: bytes, fmt: int, precision: str = "fp32",
                 metadata: dict | None = None) -> None:
    header = registry_pb2.VersionHeader(model=model, format=fmt, signature=SIGNATURE, precision=precision,
                                        sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data),
                                        metadata=metadata or {})
    await registry.UploadVersion(iter([registry_pb2.UploadVersionRequest(header=header),
                                       registry_pb2.UploadVersionRequest(chunk=data)]))


@pytest.mark.parametrize(
    ("request_spec", "code", "match"),
    [
        (optimization(), CODE.INVALID_ARGUMENT, "choose a method"),
        (optimization(0, **INT8), CODE.INVALID_ARGUMENT, "version must name"),
        (optimization(quantize=trainer_pb2.QuantizeMethod()), CODE.INVALID_ARGUMENT, "quantize needs a precision"),
        (optimization(prune=trainer_pb2.PruneMethod()), CODE.INVALID_ARGUMENT, "target_sparsity must be between 0 and 1"),
        (optimization(prune=trainer_pb2.PruneMethod(target_sparsity=1.0)), CODE.INVALID_ARGUMENT, "target_sparsity"),
        (optimization(prune=trainer_pb2.PruneMethod(target_sparsity=0.5, finetune_epochs=-1)), CODE.INVALID_ARGUMENT,
         "finetune_epochs must be between 0"),
        (optimization(**distill(alpha=1.5)), CODE.INVALID_ARGUMENT, "alpha weighs the teacher"),
        (optimization(**distill(temperature=0)), CODE.INVALID_ARGUMENT, "temperature must be positive"),
        (optimization(**distill(epochs=0)), CODE.INVALID_ARGUMENT, "epochs must be between 1"),
        (optimization(**distill(student=trainer_pb2.Architecture(gpt=trainer_pb2.GptArchitecture()))),
         CODE.INVALID_ARGUMENT, "the student must be a classifier"),
        (optimization(**distill(student=trainer_pb2.Architecture())), CODE.INVALID_ARGUMENT, "needs a student"),
        (optimization(model="Bad Name", **INT8), CODE.INVALID_ARGUMENT, "invalid model name"),
        (optimization(model="nothing", **INT8), CODE.NOT_FOUND, "nothing"),
        (optimization(version=7, **INT8), CODE.NOT_FOUND, ""),
        (optimization(dataset=trainer_pb2.DatasetSource(builtin="mnist"), **INT8), CODE.INVALID_ARGUMENT,
         "unknown built-in dataset"),
    ],
)
async def test_bad_requests_are_refused_and_nothing_is_left(
    trainer, launcher, settings, request_spec, code, match  # noqa: F811
) -> None:
    await trained_source(trainer, launcher)
    await expect(code, optimize(trainer, request_spec), match)
    jobs = (await trainer.ListJobs(trainer_pb2.ListJobsRequest())).jobs
    assert [j.kind for j in jobs] == [trainer_pb2.JOB_KIND_TRAINING]
    assert len(list(settings.trainer_jobs_dir.iterdir())) == 1  # the training job's folder only


async def test_sources_that_cannot_be_optimized(trainer, registry, launcher) -> None:  # noqa: F811
    await registry.CreateModel(registry_pb2.CreateModelRequest(name="plain"))
    await upload(registry, "plain", onnx_bytes(), registry_pb2.ARTIFACT_FORMAT_ONNX)
    await expect(CODE.INVALID_ARGUMENT, optimize(trainer, optimization(model="plain", export=trainer_pb2.ExportMethod())),
                 "plain version 1 is already ONNX: export starts from a TorchScript version")
    await upload(registry, "plain", torchscript_bytes(), registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT)
    await expect(CODE.INVALID_ARGUMENT, optimize(trainer, optimization(2, model="plain", **distill())),
                 "distillation needs a dataset: pass --dataset NAME")
    await expect(CODE.INVALID_ARGUMENT, optimize(trainer, optimization(
        2, model="plain", dataset=trainer_pb2.DatasetSource(builtin="digits"), **INT8)),
        "digits has samples of shape [8, 8]; plain version 2 takes x of shape [4]")
    await expect(CODE.INVALID_ARGUMENT, optimize(trainer, optimization(
        2, model="plain", dataset=trainer_pb2.DatasetSource(builtin="wine"), **INT8)),
        "wine has samples of shape [13]")
    await trained_source(trainer, launcher)
    metadata = dict((await registry.GetVersion(registry_pb2.GetVersionRequest(model="iris", version=1))).version.metadata)
    await upload(registry, "iris", torchscript_bytes(), registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, "int8", metadata)
    await expect(CODE.INVALID_ARGUMENT, optimize(trainer, optimization(2, **INT8)),
                 "iris version 2 is already int8: quantize starts from an fp32 version")
    await expect(CODE.INVALID_ARGUMENT, optimize(trainer, optimization(2, **distill())), "already int8: distill")
    await trained_source(trainer, launcher, "sugar", spec("linear", "diabetes"), "regression")
    await expect(CODE.INVALID_ARGUMENT, optimize(trainer, optimization(model="sugar", **distill())),
                 "distillation needs a classifier teacher; sugar version 1 is a regression model")
    await expect(CODE.INVALID_ARGUMENT, optimize(trainer, optimization(
        **distill(student=trainer_pb2.Architecture(cnn=trainer_pb2.CnnArchitecture())))), "cnn needs images")
    await expect(CODE.INVALID_ARGUMENT, optimize(trainer, optimization(
        dataset=trainer_pb2.DatasetSource(builtin="shakespeare"), **INT8)), "is a text corpus")


async def test_a_job_fetches_its_source_registers_its_result_with_lineage(
    trainer, registry, launcher, settings  # noqa: F811
) -> None:
    await trained_source(trainer, launcher)
    source = (await registry.GetVersion(registry_pb2.GetVersionRequest(model="iris", version=1))).version
    training_spec = json.loads(source.metadata["training_spec"])
    assert training_spec["dataset"] == "iris" and training_spec["seed"] == 0  # what the split is rebuilt from

    def worker(folder: Path) -> list[dict]:
        result = torchscript_result(folder)
        return [{"type": "started", "device": "cpu", "workers": 1, "resumed_from_epoch": 0},
                {**result, "precision": "int8", "format": "TORCHSCRIPT",
                 "metrics": {"test_accuracy": 0.93, "artifact_bytes": 900.0, "latency_ms_per_sample": 0.02},
                 "parent_metrics": {"test_accuracy": 0.94, "artifact_bytes": 2000.0, "latency_ms_per_sample": 0.03}}]

    launcher.scripts.append((worker, 0))
    job = await optimize(trainer, optimization(**INT8, seed=3))
    assert job.kind == trainer_pb2.JOB_KIND_OPTIMIZATION and not job.HasField("spec")
    assert job.optimization.quantize.precision == trainer_pb2.PRECISION_INT8 and job.optimization.seed == 3
    assert job.model == "iris" and job.parent_version == 1
    folder = settings.trainer_jobs_dir / job.id
    assert (folder / "source.pt").read_bytes() == (folder.parent / _training_job(settings) / "model.pt").read_bytes()
    config = json.loads((folder / "job.json").read_text())
    assert config["kind"] == "optimization" and config["spec"]["dataset"] == "iris"

    done = await wait_state(trainer, job.id, trainer_pb2.JOB_STATE_SUCCEEDED)
    assert done.result.version == 2 and done.result.metrics["artifact_bytes"] == 900
    assert dict(done.result.parent_metrics) == {"test_accuracy": 0.94, "artifact_bytes": 2000.0,
                                                "latency_ms_per_sample": 0.03}
    finished = [e for e in (await watch(trainer, job.id)) if e.WhichOneof("kind") == "finished"][0]
    assert finished.finished.result.parent_metrics["test_accuracy"] == pytest.approx(0.94)
    version = (await registry.GetVersion(registry_pb2.GetVersionRequest(model="iris", version=2))).version
    assert version.precision == "int8" and version.lineage.parent_version == 1 and version.lineage.job_id == job.id
    assert version.metadata["optimization"] == "quantize int8" and version.metadata["parent"] == "iris:1"
    assert version.metadata["training_spec"] == source.metadata["training_spec"]  # it can be optimized further
    assert version.lineage.hyperparameters["precision"] == "int8"


async def test_an_uploaded_version_is_optimized_as_the_artifact_it_is(
    trainer, registry, launcher, settings  # noqa: F811
) -> None:
    await registry.CreateModel(registry_pb2.CreateModelRequest(name="plain"))
    await upload(registry, "plain", torchscript_bytes(), registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
                 metadata={"owner": "team-a"})
    launcher.scripts.append((lambda folder: [{**torchscript_result(folder), "precision": "int8", "metadata": {},
                                              "metrics": {"artifact_bytes": 900.0},
                                              "parent_metrics": {"artifact_bytes": 2000.0}}], 0))
    job = await optimize(trainer, optimization(model="plain", **INT8))
    config = json.loads((settings.trainer_jobs_dir / job.id / "job.json").read_text())
    assert config["uploaded"] and config["spec"] is None  # no dataset: random inputs of its signature
    assert config["source"]["format"] == "TORCHSCRIPT" and config["source"]["signature"] == RESULT_SIGNATURE
    await wait_state(trainer, job.id, trainer_pb2.JOB_STATE_SUCCEEDED)
    version = (await registry.GetVersion(registry_pb2.GetVersionRequest(model="plain", version=2))).version
    assert version.precision == "int8" and version.lineage.parent_version == 1
    assert version.metadata["parent"] == "plain:1" and version.metadata["owner"] == "team-a"
    assert json.loads(version.metadata["parent_metrics"]) == {"artifact_bytes": 2000.0}
    assert "dataset" not in version.metadata and "training_spec" not in version.metadata

    # A dataset that fits the signature (iris: 4 features, 3 classes) is split with the job's seed.
    launcher.scripts.append(([], None))
    distilled = await optimize(trainer, optimization(model="plain", dataset=trainer_pb2.DatasetSource(builtin="iris"),
                                                     seed=5, **distill()))
    config = json.loads((settings.trainer_jobs_dir / distilled.id / "job.json").read_text())
    assert (config["spec"]["dataset"], config["spec"]["seed"], config["spec"]["test_fraction"]) == ("iris", 5, 0.15)


async def test_a_student_of_an_onnx_export_does_not_inherit_its_training_spec(
    trainer, registry, launcher  # noqa: F811
) -> None:
    await trained_source(trainer, launcher)
    training_spec = (await registry.GetVersion(registry_pb2.GetVersionRequest(model="iris", version=1))
                     ).version.metadata["training_spec"]
    # An ONNX export keeps its parent's metadata: it is measured on the parent's data split.
    await upload(registry, "iris", onnx_bytes(), registry_pb2.ARTIFACT_FORMAT_ONNX,
                 metadata={"training_spec": training_spec, "task": "classification"})
    launcher.scripts.append((lambda folder: [{**torchscript_result(folder), "metadata": {"architecture": "mlp"},
                                              "parent_metrics": {}}], 0))
    job = await optimize(trainer, optimization(2, **distill()))
    await wait_state(trainer, job.id, trainer_pb2.JOB_STATE_SUCCEEDED)
    student = (await registry.GetVersion(registry_pb2.GetVersionRequest(model="iris", version=3))).version
    # The teacher's spec would rebuild the wrong network: the student is optimized as an upload.
    assert student.metadata["architecture"] == "mlp" and "training_spec" not in student.metadata


async def test_another_target_model_and_an_onnx_result(trainer, registry, launcher) -> None:  # noqa: F811
    await trained_source(trainer, launcher)

    def worker(folder: Path) -> list[dict]:
        (folder / "model.onnx").write_bytes(onnx_bytes())
        return [{"type": "result", "artifact": "model.onnx", "format": "ONNX", "precision": "fp32",
                 "signature": torchscript_result(folder)["signature"], "metrics": {"test_accuracy": 0.9},
                 "parent_metrics": {"test_accuracy": 0.9}, "metadata": {}}]

    launcher.scripts.append((worker, 0))
    job = await optimize(trainer, optimization(export=trainer_pb2.ExportMethod()), model="iris-edge")
    assert job.parent_version == 0 and job.optimization.HasField("export")
    done = await wait_state(trainer, job.id, trainer_pb2.JOB_STATE_SUCCEEDED)
    version = (await registry.GetVersion(registry_pb2.GetVersionRequest(model="iris-edge", version=1))).version
    assert done.result.model == "iris-edge" and version.format == registry_pb2.ARTIFACT_FORMAT_ONNX
    assert version.metadata["parent"] == "iris:1" and version.lineage.parent_version == 0


async def test_cancel_and_failure_work_for_optimization_jobs(trainer, launcher) -> None:  # noqa: F811
    await trained_source(trainer, launcher)
    launcher.scripts.append(([{"type": "error", "message": "the ONNX export differs from the source by 0.3"}], 1))
    failed = await optimize(trainer, optimization(export=trainer_pb2.ExportMethod()))
    failed = await wait_state(trainer, failed.id, trainer_pb2.JOB_STATE_FAILED)
    assert "differs from the source by 0.3" in failed.message
    launcher.scripts.append(([{"type": "started", "device": "cpu", "workers": 1}], None))
    running = await optimize(trainer, optimization(prune=trainer_pb2.PruneMethod(target_sparsity=0.5)))
    await wait_state(trainer, running.id, trainer_pb2.JOB_STATE_RUNNING)
    cancelled = (await trainer.CancelJob(trainer_pb2.CancelJobRequest(id=running.id))).job
    assert cancelled.state == trainer_pb2.JOB_STATE_CANCELLED
    # A cancel that lands while the worker is still starting stops it once the launch returns.
    for _ in range(100):
        if launcher.launched[-1][1].stop_calls:
            break
        await asyncio.sleep(0.05)
    assert launcher.launched[-1][1].stop_calls == 1
    kinds = [j.kind for j in (await trainer.ListJobs(trainer_pb2.ListJobsRequest())).jobs]
    assert kinds == [trainer_pb2.JOB_KIND_OPTIMIZATION] * 2 + [trainer_pb2.JOB_KIND_TRAINING]


def _training_job(settings) -> str:
    folders = sorted(p.name for p in settings.trainer_jobs_dir.iterdir())
    return folders[0]





async def test_a_restart_runs_an_interrupted_optimization_job_again(tmp_path, registry_server) -> None:  # noqa: F811
    settings = trainer_settings(tmp_path, registry_server.port)
    first = FakeLauncher()
    async with running(await create_app(settings, first)) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = TenantStub(trainer_pb2_grpc.TrainerServiceStub(channel), "tenant-a")
        await trained_source(stub, first)
        job = await optimize(stub, optimization(**INT8))
        await wait_state(stub, job.id, trainer_pb2.JOB_STATE_RUNNING)
    # No checkpoint to resume from: the next trainer starts the job over from its folder.
    again = FakeLauncher((lambda folder: [{**torchscript_result(folder), "precision": "int8",
                                           "parent_metrics": {"test_accuracy": 0.9}}], 0))
    async with running(await create_app(settings, again)) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = TenantStub(trainer_pb2_grpc.TrainerServiceStub(channel), "tenant-a")
        done = await wait_state(stub, job.id, trainer_pb2.JOB_STATE_SUCCEEDED)
        assert done.attempts == 2 and done.kind == trainer_pb2.JOB_KIND_OPTIMIZATION
        assert done.result.version == 2 and done.result.parent_metrics["test_accuracy"] == pytest.approx(0.9)
        assert (again.launched[0][0] / "source.pt").exists()
        lines = [e.log.message for e in await watch(stub, job.id) if e.WhichOneof("kind") == "log"]
        assert any("starts over" in line for line in lines)
