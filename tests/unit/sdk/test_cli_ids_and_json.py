"""Identifiers in CLI tables are never cut, even at 80 columns, and every list and get command
prints its records as JSON with --json (a list as a JSON array).

Fake TrainerService, AdminService, RegistryService and InferenceService stand where the gateway
would be and answer with fixed records whose ids are long and share their first characters."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from maas.cli import _shared, app
from maas.gateway.v1 import admin_pb2, admin_pb2_grpc
from maas.inference.v1 import inference_pb2, inference_pb2_grpc
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from typer.testing import CliRunner, Result

# Two jobs a moment apart: the first 16 characters are the same, so a cut id names neither.
JOBS = ("job-0197a2b4c5d6e7f8a9b0", "job-0197a2b4c5d6e7f80c1d")
KEYS = ("k2mzq7rtbw4a", "k2mzq7rtxx5c")
MODEL = "digits-classifier"
TENANT = "research-platform"
DEPLOYMENT = "digits-classifier-prod"
LONG_TEXT = "a message long enough that the table must wrap something to fit eighty columns"


def _job(job_id: str) -> trainer_pb2.Job:
    return trainer_pb2.Job(
        id=job_id, state=trainer_pb2.JOB_STATE_RUNNING, model=MODEL, message=LONG_TEXT,
        spec=trainer_pb2.TrainingSpec(
            architecture=trainer_pb2.Architecture(mlp={}), dataset=trainer_pb2.DatasetSource(builtin="digits")
        ),
        progress=trainer_pb2.Progress(epoch=3, epochs=20),
    )


def _key(key_id: str) -> admin_pb2.ApiKey:
    return admin_pb2.ApiKey(id=key_id, tenant=TENANT, role=admin_pb2.ROLE_DEVELOPER, description=LONG_TEXT)


class FakeTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    def ListJobs(self, request, context):
        return trainer_pb2.ListJobsResponse(jobs=[_job(job_id) for job_id in JOBS])

    def GetJob(self, request, context):
        return trainer_pb2.GetJobResponse(job=_job(JOBS[0]))


class FakeAdmin(admin_pb2_grpc.AdminServiceServicer):
    def ListTenants(self, request, context):
        return admin_pb2.ListTenantsResponse(tenants=[admin_pb2.Tenant(name=TENANT, display_name=LONG_TEXT)])

    def ListApiKeys(self, request, context):
        return admin_pb2.ListApiKeysResponse(api_keys=[_key(key_id) for key_id in KEYS])

    def RevokeApiKey(self, request, context):
        # The server resolved the prefix: the response names the whole id.
        return admin_pb2.RevokeApiKeyResponse(api_key=_key(KEYS[0]))

    def GetQuota(self, request, context):
        return admin_pb2.GetQuotaResponse(quota=admin_pb2.Quota(tenant=request.tenant, requests_per_day=0))

    def ListAuditEvents(self, request, context):
        event = admin_pb2.AuditEvent(
            id="e1", tenant=TENANT, api_key_id=KEYS[1], method="/maas.gateway.v1.AdminService/RevokeApiKey",
            resource=KEYS[0], code="OK",
        )
        return admin_pb2.ListAuditEventsResponse(audit_events=[event])

    def GetUsage(self, request, context):
        return admin_pb2.GetUsageResponse(rows=[admin_pb2.UsageRow(day="2026-01-02", tenant=TENANT, requests=7)])


class FakeRegistry(registry_pb2_grpc.RegistryServiceServicer):
    def ListModels(self, request, context):
        model = registry_pb2.Model(name=MODEL, latest_version=3, description=LONG_TEXT, aliases={"production": 3})
        return registry_pb2.ListModelsResponse(models=[model])

    def ListVersions(self, request, context):
        version = registry_pb2.Version(model=request.model, version=3, sha256="ab" * 32, size_bytes=10)
        return registry_pb2.ListVersionsResponse(versions=[version])


class FakeInference(inference_pb2_grpc.InferenceServiceServicer):
    def ListDeployments(self, request, context):
        deployment = inference_pb2.Deployment(
            name=DEPLOYMENT, model=MODEL, version=3, resolved_version=3, message=LONG_TEXT
        )
        return inference_pb2.ListDeploymentsResponse(deployments=[deployment])


@pytest.fixture
def address(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(FakeTrainer(), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(FakeAdmin(), server)
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(FakeRegistry(), server)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(FakeInference(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setattr(_shared.console, "_width", 80)  # the width of the terminal that cut job ids
    monkeypatch.setattr(_shared.errors, "_width", 80)
    monkeypatch.setattr(_shared, "tls_ca", None)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def maas(address: str, *args: str) -> Result:
    env = {"MAAS_API_KEY": "maas_test", "MAAS_GATEWAY_ADDR": address}
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize(
    ("command", "identifiers"),
    [
        (["jobs", "list"], [*JOBS, MODEL]),
        (["jobs", "get", "job-0197a2b4c5d6e7f8a"], [JOBS[0], MODEL]),
        (["admin", "key", "list"], [*KEYS, TENANT]),
        (["admin", "tenant", "list"], [TENANT]),
        (["admin", "audit"], [TENANT, KEYS[1]]),
        (["models", "list"], [MODEL]),
        (["deploy", "list"], [DEPLOYMENT, MODEL]),
    ],
)
def test_identifiers_are_whole_at_80_columns(address, command, identifiers):
    output = maas(address, *command).output
    assert max(len(line) for line in output.splitlines()) <= 80
    for identifier in identifiers:
        assert identifier in output, f"{identifier} is cut in:\n{output}"


@pytest.mark.parametrize(
    ("command", "key", "expected"),
    [
        (["jobs", "list"], "id", list(JOBS)),
        (["admin", "key", "list"], "id", list(KEYS)),
        (["admin", "tenant", "list"], "name", [TENANT]),
        (["admin", "audit"], "resource", [KEYS[0]]),
        (["models", "list"], "name", [MODEL]),
        (["models", "versions", MODEL], "sha256", ["ab" * 32]),
        (["deploy", "list"], "name", [DEPLOYMENT]),
        (["usage"], "day", ["2026-01-02"]),
    ],
)
def test_every_list_prints_a_json_array(address, command, key, expected):
    records = json.loads(maas(address, *command, "--json").output)
    assert isinstance(records, list) and [record[key] for record in records] == expected


def test_get_commands_print_one_json_record(address):
    job = json.loads(maas(address, "jobs", "get", "job-0197a2b4c5d6e7f8a", "--json").output)
    assert job["id"] == JOBS[0] and job["state"] == "JOB_STATE_RUNNING" and job["progress"]["epochs"] == 20
    quota = json.loads(maas(address, "admin", "quota", "get", TENANT, "--json").output)
    assert quota["tenant"] == TENANT and quota["requestsPerDay"] == "0"  # zero values included


def test_revoking_by_prefix_names_the_whole_key(address):
    assert f"revoked {KEYS[0]}" in maas(address, "admin", "key", "revoke", "k2mzq7rtb").output
