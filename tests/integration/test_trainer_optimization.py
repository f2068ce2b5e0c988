"""Real optimization jobs on a digits MLP the trainer trained: the quality bars (int8 loses at most
a point and is at least 2x smaller; 50% pruning loses at most a point after fine-tuning; a student
with at most a quarter of the teacher's parameters reaches 95%), lineage and measurements in the
registry, `maas models compare`'s table, and the precision tiers served side by side by Triton:
fp32, int8 and the ONNX export, each deployment answering like its own artifact."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
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


async def optimize(stub: TenantStub, **method) -> str:
    request = trainer_pb2.CreateOptimizationJobRequest(spec=trainer_pb2.OptimizationSpec(
        model="digits", version=1, device=trainer_pb2.DEVICE_CPU, **method))
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
    first = next(line for line in table.splitlines() if line.startswith("│ 1 "))
    assert f"{int(parent['parameters']):,}" in first and f"{parent['latency_ms_per_sample']:.4f}" in first

    tiers = {"digits-fp32": 1, "digits-int8": int8.version, "digits-onnx": onnx.version}
    await serve_tiers(tmp_path, registry_server.port, tiers)


def fp32(name: str, array: np.ndarray) -> common_pb2.Tensor:
    return common_pb2.Tensor(name=name, datatype=common_pb2.DATA_TYPE_FP32, shape=array.shape,
                             raw=array.astype(np.float32).tobytes())


async def serve_tiers(tmp_path: Path, registry_port: int, tiers: dict[str, int]) -> None:
    """fp32, int8 and ONNX deployments of one model side by side; each answers like its artifact."""
    settings = InferenceSettings(
        home=tmp_path / "inference", inference_addr="127.0.0.1:0", registry_addr=f"127.0.0.1:{registry_port}",
        internal_token=TOKEN, triton_grpc_port=free_port(), triton_http_port=free_port(),
        triton_metrics_port=free_port(), gpu_available=False,
    )
    images = load_digits().images[:16].astype(np.float32)  # raw pixels: the models standardise
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
