"""Real optimization jobs on a digits MLP the trainer trained: the quality bars (int8 loses at most
a point and is at least 2x smaller; 50% pruning loses at most a point after fine-tuning; a student
with at most a quarter of the teacher's parameters reaches 95%), lineage and measurements in the
registry, `maas models compare`'s table, and the precision tiers served side by side by Triton:
fp32, int8 and the ONNX export, each deployment answering like its own artifact. Then the same for
the README tour's MLP uploaded without a training spec (and its ONNX export uploaded as a model of
its own): every method, measured on random inputs, or on digits for distillation."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from maas.cli.models import compare_table
from maas.common.v1 import common_pb2
from maas.inference.v1 import inference_pb2, inference_pb2_grpc
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from rich.console import Console
from sklearn.datasets import load_digits

from services.common.channels import internal_metadata
from services.common.server import running
from services.inference.config import InferenceSettings
from services.inference.server import create_app as create_inference
from services.stack.ephemeral import free_port
from services.trainer.server import create_app as create_trainer
from tests.integration.test_trainer_training import finish, spec, submit
from tests.unit.trainer.conftest import TOKEN, TenantStub, registry_server, trainer_settings  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*")]
MLP = trainer_pb2.Architecture(mlp=trainer_pb2.MlpArchitecture(hidden_sizes=[128, 64]))
# The teacher's weight matrices (64-128-64-10): what 50% pruning halves.
WEIGHTS = 64 * 128 + 128 * 64 + 64 * 10


@pytest.fixture
async def stubs(tmp_path: Path, registry_server) -> AsyncIterator[tuple[TenantStub, TenantStub]]:  # noqa: F811
    settings = trainer_settings(tmp_path, registry_server.port, trainer_max_running_jobs=2,
                                trainer_max_running_jobs_per_tenant=2)
    async with running(await create_trainer(settings)) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as trainer, \
            grpc.aio.insecure_channel(f"127.0.0.1:{registry_server.port}") as registry:
        yield (TenantStub(trainer_pb2_grpc.TrainerServiceStub(trainer), "tenant-a"),
               TenantStub(registry_pb2_grpc.RegistryServiceStub(registry), "tenant-a"))


async def optimize(stub: TenantStub, model: str = "digits", **method) -> str:
    request = trainer_pb2.CreateOptimizationJobRequest(spec=trainer_pb2.OptimizationSpec(
        model=model, version=1, device=trainer_pb2.DEVICE_CPU, **method))
    return (await stub.CreateOptimizationJob(request)).job.id


async def test_quality_bars_lineage_and_precision_tiers_on_triton(stubs, tmp_path, registry_server) -> None:  # noqa: F811
    trainer, registry = stubs
    teacher = await finish(trainer, await submit(trainer, spec("mlp", "digits", MLP.mlp, epochs=20), "digits"))
    assert teacher.result.metrics["test_accuracy"] >= 0.96
    ids = [
        await optimize(trainer, quantize=trainer_pb2.QuantizeMethod(precision=trainer_pb2.PRECISION_INT8)),
        await optimize(trainer, prune=trainer_pb2.PruneMethod(target_sparsity=0.5, finetune_epochs=3)),
        await optimize(trainer, distill=trainer_pb2.DistillMethod(
            student=trainer_pb2.Architecture(mlp=trainer_pb2.MlpArchitecture(hidden_sizes=[48])), epochs=40)),
        await optimize(trainer, export=trainer_pb2.ExportMethod()),
    ]
    # Two run at once, so the version numbers follow the order they finish in.
    int8, pruned, student, onnx = [(await finish(trainer, job_id)).result for job_id in ids]
    assert sorted(r.version for r in (int8, pruned, student, onnx)) == [2, 3, 4, 5]

    parent = dict(int8.parent_metrics)
    # The parent is measured on the split it was trained with: its test accuracy is the registered one.
    assert parent["test_accuracy"] == pytest.approx(teacher.result.metrics["test_accuracy"])
    assert int8.metrics["test_accuracy"] >= parent["test_accuracy"] - 0.01, dict(int8.metrics)
    assert int8.metrics["artifact_bytes"] * 2 <= parent["artifact_bytes"], dict(int8.metrics)
    assert pruned.metrics["test_accuracy"] >= parent["test_accuracy"] - 0.01, dict(pruned.metrics)
    assert parent["nonzero_parameters"] - pruned.metrics["nonzero_parameters"] == pytest.approx(WEIGHTS / 2, abs=2)
    assert student.metrics["parameters"] * 4 <= parent["parameters"], dict(student.metrics)
    assert student.metrics["test_accuracy"] >= 0.95, dict(student.metrics)
    assert onnx.metrics["test_accuracy"] == pytest.approx(parent["test_accuracy"])
    for result in (int8, pruned, student, onnx):
        assert result.metrics["latency_ms_per_sample"] > 0 and result.parent_metrics["latency_ms_per_sample"] > 0

    versions = (await registry.ListVersions(registry_pb2.ListVersionsRequest(model="digits"))).versions
    described = {v.version: v for v in versions}
    assert described[1].precision == "fp32" and described[int8.version].precision == "int8"
    assert described[onnx.version].format == registry_pb2.ARTIFACT_FORMAT_ONNX
    assert all(described[v].lineage.parent_version == 1 for v in (2, 3, 4, 5))
    student_spec = json.loads(described[student.version].metadata["training_spec"])
    assert student_spec["architecture"] == "mlp" and student_spec["hyperparameters"]["hidden_sizes"] == [48]
    console = Console(file=io.StringIO(), width=200)
    console.print(compare_table(list(versions)))
    table = console.file.getvalue()
    assert "int8" in table and "onnx" in table and f"{parent['test_accuracy']:.2%}" in table
    # The parent's size and latency came from its children's jobs.
    first = next(line for line in table.splitlines() if line.startswith("1 "))
    assert f"{int(parent['parameters']):,}" in first and f"{parent['latency_ms_per_sample']:.4f}" in first

    tiers = {"digits-fp32": 1, "digits-int8": int8.version, "digits-onnx": onnx.version}
    await serve_tiers(tmp_path, registry_server.port, tiers)


def tour_model(path: Path) -> None:
    """The README tour's digits MLP, as a user trains and uploads it: pixels / 16, 64-64-10, scripted."""
    torch.manual_seed(0)
    digits = load_digits()
    x, y = torch.tensor(digits.data / 16, dtype=torch.float32), torch.tensor(digits.target)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    torch.jit.save(torch.jit.script(model.eval()), str(path))


async def upload(registry: TenantStub, model: str, path: Path, format: int) -> None:
    """A version with its signature and nothing else: no training_spec metadata, no lineage."""
    data = path.read_bytes()
    signature = common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=[64])],
        outputs=[common_pb2.TensorSpec(name="logits", datatype=common_pb2.DATA_TYPE_FP32, shape=[10])])
    header = registry_pb2.VersionHeader(model=model, format=format, signature=signature,
                                        sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    await registry.CreateModel(registry_pb2.CreateModelRequest(name=model))
    await registry.UploadVersion(iter([registry_pb2.UploadVersionRequest(header=header),
                                       registry_pb2.UploadVersionRequest(chunk=data)]))


async def test_uploaded_versions_without_a_training_spec(stubs, tmp_path, registry_server) -> None:  # noqa: F811
    trainer, registry = stubs
    tour_model(tmp_path / "digits.pt")
    await upload(registry, "digits", tmp_path / "digits.pt", registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT)
    torch.onnx.export(torch.jit.load(str(tmp_path / "digits.pt")), (torch.zeros(2, 64),), str(tmp_path / "digits.onnx"),
                      input_names=["x"], output_names=["logits"], dynamo=False,
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    await upload(registry, "digits-onnx", tmp_path / "digits.onnx", registry_pb2.ARTIFACT_FORMAT_ONNX)
    student = trainer_pb2.Architecture(mlp=trainer_pb2.MlpArchitecture(hidden_sizes=[48]))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await optimize(trainer, distill=trainer_pb2.DistillMethod(student=student))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "distillation needs a dataset: pass --dataset NAME" in refused.value.details()

    ids = [
        await optimize(trainer, quantize=trainer_pb2.QuantizeMethod(precision=trainer_pb2.PRECISION_INT8)),
        await optimize(trainer, quantize=trainer_pb2.QuantizeMethod(precision=trainer_pb2.PRECISION_FP16)),
        await optimize(trainer, prune=trainer_pb2.PruneMethod(target_sparsity=0.5)),
        await optimize(trainer, export=trainer_pb2.ExportMethod()),
        await optimize(trainer, distill=trainer_pb2.DistillMethod(student=student, epochs=40),
                       dataset=trainer_pb2.DatasetSource(builtin="digits")),
        await optimize(trainer, "digits-onnx", quantize=trainer_pb2.QuantizeMethod(precision=trainer_pb2.PRECISION_INT8)),
    ]
    int8, fp16, pruned, onnx, distilled, onnx_int8 = [(await finish(trainer, job_id)).result for job_id in ids]
    parent = dict(int8.parent_metrics)
    assert parent["parameters"] == 64 * 64 + 64 + 64 * 10 + 10 and "test_accuracy" not in parent  # no dataset
    assert int8.metrics["artifact_bytes"] * 2 <= parent["artifact_bytes"], dict(int8.metrics)
    assert int8.metrics["parameters"] == parent["parameters"] and fp16.metrics["parameters"] == parent["parameters"]
    assert fp16.metrics["artifact_bytes"] < parent["artifact_bytes"]
    assert parent["nonzero_parameters"] - pruned.metrics["nonzero_parameters"] == (64 * 64 + 64 * 10) / 2
    assert onnx_int8.metrics["artifact_bytes"] * 2 <= onnx_int8.parent_metrics["artifact_bytes"]
    # With a dataset, accuracy on its test split: raw pixels, which the /16 model still mostly gets right.
    assert distilled.parent_metrics["test_accuracy"] >= 0.95, dict(distilled.parent_metrics)
    assert distilled.metrics["test_accuracy"] >= 0.9 and distilled.metrics["parameters"] == 64 * 48 + 48 + 48 * 10 + 10

    versions = {v.version: v for v in (await registry.ListVersions(
        registry_pb2.ListVersionsRequest(model="digits"))).versions}
    assert [versions[r.version].precision for r in (int8, fp16, pruned)] == ["int8", "fp16", "fp32"]
    assert versions[onnx.version].format == registry_pb2.ARTIFACT_FORMAT_ONNX
    for result in (int8, fp16, pruned, onnx, distilled):
        version = versions[result.version]
        assert version.lineage.parent_version == 1 and version.metadata["parent"] == "digits:1"
        assert json.loads(version.metadata["parent_metrics"])["parameters"] == parent["parameters"]
        assert "training_spec" not in version.metadata
    onnx_int8_version = (await registry.GetVersion(registry_pb2.GetVersionRequest(model="digits-onnx", version=2))
                         ).version
    assert (onnx_int8_version.format, onnx_int8_version.precision) == (registry_pb2.ARTIFACT_FORMAT_ONNX, "int8")
    await serve_tiers(tmp_path, registry_server.port,
                      {"digits-fp32": 1, "digits-int8": int8.version, "digits-onnx": onnx.version}, sample_shape=(64,))


def fp32(name: str, array: np.ndarray) -> common_pb2.Tensor:
    return common_pb2.Tensor(name=name, datatype=common_pb2.DATA_TYPE_FP32, shape=array.shape,
                             raw=array.astype(np.float32).tobytes())


async def serve_tiers(tmp_path: Path, registry_port: int, tiers: dict[str, int],
                      sample_shape: tuple[int, ...] = (8, 8)) -> None:
    """fp32, int8 and ONNX deployments of one model side by side; each answers like its artifact."""
    settings = InferenceSettings(
        home=tmp_path / "inference", inference_addr="127.0.0.1:0", registry_addr=f"127.0.0.1:{registry_port}",
        internal_token=TOKEN, triton_grpc_port=free_port(), triton_http_port=free_port(),
        triton_metrics_port=free_port(), gpu_available=False,
    )
    # Raw pixels: trained models standardise them; the tour's model (pixels / 16) mostly gets them right.
    images = load_digits().images[:16].reshape(16, *sample_shape).astype(np.float32)
    metadata = internal_metadata(TOKEN, "tenant-a")
    async with running(await create_inference(settings)) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for name, version in tiers.items():
            deployment = inference_pb2.Deployment(name=name, model="digits", version=version, max_batch_size=16)
            await stub.CreateDeployment(inference_pb2.CreateDeploymentRequest(deployment=deployment),
                                        metadata=metadata)
        answers = {}
        for name in tiers:
            deadline = asyncio.get_running_loop().time() + 180
            while True:
                got = (await stub.GetDeployment(inference_pb2.GetDeploymentRequest(name=name),
                                                metadata=metadata)).deployment
                assert got.state != inference_pb2.DEPLOYMENT_STATE_FAILED, got.message
                if got.state == inference_pb2.DEPLOYMENT_STATE_READY:
                    break
                assert asyncio.get_running_loop().time() < deadline, f"{name} never became READY"
                await asyncio.sleep(0.2)
            response = await stub.Predict(inference_pb2.PredictRequest(deployment=name, inputs=[fp32("x", images)]),
                                          metadata=metadata)
            assert response.version == tiers[name]
            answers[name] = np.frombuffer(response.outputs[0].raw, np.float32).reshape(16, 10)
    labels = load_digits().target[:16]
    for name, logits in answers.items():
        assert (logits.argmax(1) == labels).mean() >= 0.9, name
    # The ONNX export answers as the fp32 TorchScript does; int8 close to it, not equal.
    np.testing.assert_allclose(answers["digits-onnx"], answers["digits-fp32"], rtol=1e-4, atol=1e-4)
    assert not np.array_equal(answers["digits-int8"], answers["digits-fp32"])
    assert (answers["digits-int8"].argmax(1) == answers["digits-fp32"].argmax(1)).mean() >= 0.9
