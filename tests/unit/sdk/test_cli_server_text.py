"""Server text reaches the terminal whole: error details, deployment messages and job log lines
are printed as they are, never read as rich markup ("[batch, 64]" used to vanish).

A fake InferenceService stands where the gateway would be and answers with bracketed text."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from maas.cli import _shared, app
from maas.gateway.v1 import admin_pb2_grpc
from maas.inference.v1 import inference_pb2, inference_pb2_grpc
from typer.testing import CliRunner, Result

SHAPE_ERROR = "input 'x' has shape [1, 3]; the model expects [batch, 64]"
# What an attacker-chosen name or message could hold: tags rich would apply or swallow.
HOSTILE = "[red]red[/] [bold]bold[/bold] [link=http://x]link[/link] [/] [batch, 64]"


class FakeInference(inference_pb2_grpc.InferenceServiceServicer):
    def GetDeployment(self, request, context):
        if request.name == "missing":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, SHAPE_ERROR)
        signature = inference_pb2.Deployment().signature
        signature.inputs.add(name="x", datatype=1, shape=[64])
        return inference_pb2.GetDeploymentResponse(
            deployment=inference_pb2.Deployment(
                name=request.name, model="digits", version=1, resolved_version=1, message=HOSTILE,
                state=inference_pb2.DEPLOYMENT_STATE_FAILED, signature=signature,
            )
        )

    def ListDeployments(self, request, context):
        return inference_pb2.ListDeploymentsResponse(
            deployments=[inference_pb2.Deployment(name="web", model="digits", version=1, message=HOSTILE)]
        )

    def Predict(self, request, context):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, SHAPE_ERROR)


class FakeAdmin(admin_pb2_grpc.AdminServiceServicer):
    def CreateTenant(self, request, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "this call needs the admin role or above")


@pytest.fixture
def address(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(FakeInference(), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(FakeAdmin(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setattr(_shared.console, "_width", 400)
    monkeypatch.setattr(_shared.errors, "_width", 400)
    monkeypatch.setattr(_shared, "tls_ca", None)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def maas(address: str, *args: str) -> Result:
    env = {"MAAS_API_KEY": "maas_test", "MAAS_GATEWAY_ADDR": address}
    return CliRunner().invoke(app, list(args), env=env)


def test_a_refused_environment_key_says_how_to_act_as_admin(address, tmp_path, monkeypatch):
    monkeypatch.setenv("MAAS_HOME", str(tmp_path))
    result = maas(address, "admin", "tenant", "create", "acme")
    assert result.exit_code == 1
    assert "PERMISSION_DENIED" in result.output
    assert f'--api-key "$(cat {tmp_path / "admin.key"})"' in result.output
    assert "unset MAAS_API_KEY" in result.output

    given = CliRunner().invoke(app, ["admin", "tenant", "create", "acme", "--api-key", "maas_other"],
                               env={"MAAS_GATEWAY_ADDR": address})
    assert given.exit_code == 1 and "unset MAAS_API_KEY" not in given.output


def test_an_error_is_printed_whole(address):
    result = maas(address, "predict", "digits", "--inputs", '{"x": [0.1, 0.2, 0.3]}')
    assert result.exit_code == 1
    assert f"INVALID_ARGUMENT: {SHAPE_ERROR}" in result.output


def test_a_deployment_message_is_printed_as_sent(address):
    for command in (["deploy", "get", "web"], ["deploy", "list"]):
        result = maas(address, *command)
        assert result.exit_code == 0, result.output
        assert HOSTILE in result.output, command
