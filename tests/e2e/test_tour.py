"""End to end through the real stack (`maas up --detach`): admin key -> tenant + developer key ->
upload a TorchScript MLP trained on digits -> deploy on Triton -> Predict through the gateway via
the SDK and via stock tritonclient -> outputs match in-process torch -> delete. Plus the bad inputs."""

from __future__ import annotations

import hashlib
import io
import pickle

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
from maas import Client
from maas.errors import ApiError
from maas.registry.v1 import registry_pb2
from tritonclient.utils import InferenceServerException

from tests.support.digits import SIGNATURE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tenants(stack):
    admin = Client(stack.gateway, stack.admin_key)
    keys = {}
    for tenant in ("acme", "rival"):
        admin.create_tenant(tenant)
        keys[tenant] = admin.create_api_key(tenant, "developer")[1]
    keys["acme-reader"] = admin.create_api_key("acme", "reader")[1]
    yield admin, keys
    admin.close()


@pytest.fixture(scope="module")
def deployed(stack, tenants, digits):
    _, keys = tenants
    acme = Client(stack.gateway, keys["acme"])
    acme.create_model("digits", "MLP on scikit-learn digits")
    version = acme.upload_version("digits", digits.path, format="torchscript", signature=SIGNATURE,
                                  metrics={"test_accuracy": digits.accuracy})
    assert version.version == 1 and version.state == registry_pb2.VERSION_STATE_READY
    acme.create_deployment("digits", "digits", version=1, max_batch_size=32)
    acme.wait_ready("digits", timeout=180)
    yield acme
    acme.close()


def expect_error(code: grpc.StatusCode, call, *args, **kwargs) -> str:
    with pytest.raises(ApiError) as caught:
        call(*args, **kwargs)
    assert caught.value.code is code, caught.value
    return caught.value.details


def test_model_is_good(digits) -> None:
    assert digits.accuracy > 0.9


def test_predict_through_the_gateway_with_the_sdk(deployed, digits) -> None:
    batch = digits.test_x[:16]
    outputs = deployed.predict("digits", {"x": batch})
    np.testing.assert_allclose(outputs["logits"], digits.reference(batch), rtol=1e-5, atol=1e-5)
    assert (outputs["logits"].argmax(1) == digits.test_y[:16]).mean() > 0.8


def test_predict_through_the_gateway_with_stock_tritonclient(stack, tenants, deployed, digits) -> None:
    _, keys = tenants
    headers = {"authorization": f"Bearer {keys['acme']}"}
    triton = triton_grpc.InferenceServerClient(stack.gateway)
    assert triton.is_server_live(headers=headers)
    assert triton.is_model_ready("digits", headers=headers)
    metadata = triton.get_model_metadata("digits", headers=headers)
    assert [i.name for i in metadata.inputs] == ["x"]
    batch = digits.test_x[16:24]
    infer_input = triton_grpc.InferInput("x", list(batch.shape), "FP32")
    infer_input.set_data_from_numpy(batch)
    result = triton.infer("digits", [infer_input], headers=headers)
    np.testing.assert_allclose(result.as_numpy("logits"), digits.reference(batch), rtol=1e-5, atol=1e-5)
    with pytest.raises(InferenceServerException, match="not found"):
        triton.infer("nope", [infer_input], headers=headers)
    triton.close()


def test_concurrent_predicts_are_all_correct(deployed, digits) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> bool:
        row = digits.test_x[i : i + 1]
        got = deployed.predict("digits", {"x": row})["logits"]
        return np.allclose(got, digits.reference(row), rtol=1e-5, atol=1e-5)

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(one, range(64)))


def test_reader_can_predict_but_not_deploy(stack, tenants, deployed, digits) -> None:
    _, keys = tenants
    reader = Client(stack.gateway, keys["acme-reader"])
    assert reader.predict("digits", {"x": digits.test_x[:1]})["logits"].shape == (1, 10)
    expect_error(grpc.StatusCode.PERMISSION_DENIED, reader.create_deployment, "again", "digits", version=1)
    expect_error(grpc.StatusCode.PERMISSION_DENIED, reader.create_tenant, "sneaky")


def test_bad_predict_inputs(deployed, digits) -> None:
    x = digits.test_x[:2]
    expect_error(grpc.StatusCode.NOT_FOUND, deployed.predict, "no-such-deployment", {"x": x})
    details = expect_error(grpc.StatusCode.INVALID_ARGUMENT, deployed.predict, "digits", {"x": x.astype(np.float64)})
    assert "FP64" in details and "FP32" in details
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, deployed.predict, "digits", {"x": x[:, :60]})
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, deployed.predict, "digits", {"wrong": x})
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, deployed.predict, "digits", {"x": np.zeros((64, 64), np.float32)})

    from maas.common.v1 import common_pb2
    from maas.inference.v1 import inference_pb2

    short = inference_pb2.PredictRequest(deployment="digits", inputs=[common_pb2.Tensor(
        name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=[2, 64], raw=b"\0" * 100)])
    details = expect_error(grpc.StatusCode.INVALID_ARGUMENT, deployed._unary, deployed.inference.Predict, short)
    assert "100 bytes" in details


def test_oversize_message_is_refused(deployed) -> None:
    huge = np.zeros((1, 70 * 1024 * 1024 // 4), np.float32)  # past the 64 MiB default limit
    expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, deployed.predict, "digits", {"x": huge})


def test_keys_missing_invalid_and_revoked(stack, tenants, deployed, digits) -> None:
    admin, _ = tenants
    x = digits.test_x[:1]
    for key in ("", "not-a-key", "maas_aaaaaaaaaaaa_" + "b" * 43):
        anonymous = Client(stack.gateway, key)
        expect_error(grpc.StatusCode.UNAUTHENTICATED, anonymous.predict, "digits", {"x": x})
        anonymous.close()
    record, plaintext = admin.create_api_key("acme", "reader")
    doomed = Client(stack.gateway, plaintext)
    assert doomed.predict("digits", {"x": x})["logits"].shape == (1, 10)
    admin.revoke_api_key(record.id)
    import time

    time.sleep(1.1)  # revocation takes effect within a second
    expect_error(grpc.StatusCode.UNAUTHENTICATED, doomed.predict, "digits", {"x": x})


def test_tenants_are_isolated(stack, tenants, deployed, digits) -> None:
    _, keys = tenants
    rival = Client(stack.gateway, keys["rival"])
    expect_error(grpc.StatusCode.NOT_FOUND, rival.predict, "digits", {"x": digits.test_x[:1]})
    expect_error(grpc.StatusCode.NOT_FOUND, rival.get_model, "digits")
    expect_error(grpc.StatusCode.NOT_FOUND, rival.get_deployment, "digits")
    assert rival.list_models() == [] and rival.list_deployments() == []
    triton = triton_grpc.InferenceServerClient(stack.gateway)
    assert not triton.is_model_ready("digits", headers={"authorization": f"Bearer {keys['rival']}"})


def upload_raw(client: Client, model: str, payload: bytes, *, declared: bytes | None = None, fmt=None):
    declared = payload if declared is None else declared
    header = registry_pb2.VersionHeader(
        model=model, format=fmt or registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, signature=SIGNATURE,
        sha256=hashlib.sha256(declared).hexdigest(), size_bytes=len(declared))
    messages = [registry_pb2.UploadVersionRequest(header=header)]
    messages += [registry_pb2.UploadVersionRequest(chunk=payload[i : i + 65536]) for i in range(0, len(payload), 65536)]
    return client._unary(client.registry.UploadVersion, iter(messages))


def test_bad_uploads_leave_no_version(stack, deployed, digits) -> None:
    artifact = digits.path.read_bytes()
    deployed.create_model("scratch")
    cut = expect_error(grpc.StatusCode.DATA_LOSS, upload_raw, deployed, "scratch", artifact[: len(artifact) // 2],
                       declared=artifact)
    assert "size" in cut or "bytes" in cut
    corrupted = bytearray(artifact)
    corrupted[100] ^= 0xFF
    expect_error(grpc.StatusCode.DATA_LOSS, upload_raw, deployed, "scratch", bytes(corrupted), declared=artifact)
    details = expect_error(grpc.StatusCode.INVALID_ARGUMENT, upload_raw, deployed, "scratch",
                           pickle.dumps({"weights": [1, 2, 3]}))
    assert "pickle" in details.lower()
    checkpoint = io.BytesIO()
    torch.save(torch.nn.Linear(2, 2).state_dict(), checkpoint)
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, upload_raw, deployed, "scratch", checkpoint.getvalue())
    expect_error(grpc.StatusCode.NOT_FOUND, upload_raw, deployed, "no-such-model", artifact)
    assert deployed.list_versions("scratch") == []
    blobs = stack.home / "registry" / "blobs"
    stray = [p for p in blobs.rglob("*") if p.is_file() and "sha256" not in p.parts]
    assert stray == []


def test_cli_tour(stack, tenants, deployed, digits, tmp_path) -> None:
    _, keys = tenants
    env = {**stack.env, "MAAS_API_KEY": keys["acme"]}
    assert stack.maas("status").returncode == 0
    assert "acme" in stack.maas("whoami", env=env).stdout
    upload = stack.maas("models", "upload", "cli-digits", str(digits.path), "--input", "x:FP32:64",
                        "--output", "logits:FP32:10", "--alias", "production", env=env)
    assert "version 1" in upload.stdout
    stack.maas("deploy", "create", "cli-digits", "--model", "cli-digits", "--alias", "production", env=env)
    row = digits.test_x[0].tolist()
    import json

    answer = json.loads(stack.maas("predict", "cli-digits", "--inputs", json.dumps({"x": row}), env=env).stdout)
    np.testing.assert_allclose(answer["logits"], digits.reference(digits.test_x[:1]), rtol=1e-5, atol=1e-5)
    assert "cli-digits" in stack.maas("deploy", "list", env=env).stdout
    stack.maas("deploy", "delete", "cli-digits", env=env)
    bad = stack.maas("predict", "cli-digits", "--inputs", json.dumps({"x": row}), env=env, check=False)
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr


def test_delete_deployment(deployed, digits) -> None:
    deployed.create_deployment("short-lived", "digits", version=1)
    deployed.wait_ready("short-lived", timeout=120)
    assert deployed.predict("short-lived", {"x": digits.test_x[:1]})["logits"].shape == (1, 10)
    deployed.delete_deployment("short-lived")
    expect_error(grpc.StatusCode.NOT_FOUND, deployed.predict, "short-lived", {"x": digits.test_x[:1]})
    expect_error(grpc.StatusCode.NOT_FOUND, deployed.get_deployment, "short-lived")


def test_gateway_lists_every_public_service_in_reflection_and_health(stack) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(stack.gateway) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {service.name for service in answer.list_services_response.service}
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("maas.registry.v1.RegistryService", "maas.inference.v1.InferenceService",
                        "maas.trainer.v1.TrainerService", "maas.gateway.v1.AdminService",
                        "inference.GRPCInferenceService"):
            assert service in names
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        assert "maas.inference.v1.RoutingService" not in names
