"""The serving fleet from the command line and the SDK: replica options of `maas deploy`,
`maas deploy get` with replicas and scaling events, `maas nodes` and the replica quota.

A fake AdminService and InferenceService stand where the gateway would be: they record what
the real Client sends over gRPC and answer with fixed records."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from maas.cli import _shared, app
from maas.client import Client
from maas.gateway.v1 import admin_pb2, admin_pb2_grpc
from maas.inference.v1 import inference_pb2, inference_pb2_grpc
from typer.testing import CliRunner, Result

READY = inference_pb2.DEPLOYMENT_STATE_READY
LOADING = inference_pb2.DEPLOYMENT_STATE_LOADING


def _nodes() -> list[inference_pb2.Node]:
    contact = Timestamp()
    contact.GetCurrentTime()
    return [
        inference_pb2.Node(
            name="triton-0", address="127.0.0.1:8001", state=inference_pb2.NODE_STATE_READY, model_slots=8,
            memory_mb=4096, gpus=0, replicas=2, free_slots=6, free_memory_mb=3000, last_contact=contact,
        ),
        inference_pb2.Node(
            name="triton-1", address="127.0.0.1:8011", state=inference_pb2.NODE_STATE_DOWN, model_slots=8,
            memory_mb=4096, replicas=0, free_slots=8, free_memory_mb=4096, message="not answering",
        ),
    ]


def _deployment(name: str) -> inference_pb2.Deployment:
    """A deployment that scales to zero (min_replicas 0 must show in JSON), two replicas now."""
    event = inference_pb2.ScalingEvent(from_replicas=1, to_replicas=2, reason="8.0 in flight per replica > 4")
    event.time.FromSeconds(1_700_000_000)
    return inference_pb2.Deployment(
        name=name, model="digits", version=3, resolved_version=3, state=READY, instances=1, max_batch_size=8,
        min_replicas=0, max_replicas=4, target_in_flight=4, desired_replicas=2, tier="int8",
        replicas=[
            inference_pb2.Replica(node="triton-0", version=3, state=READY),
            inference_pb2.Replica(node="triton-2", version=3, state=LOADING, message="loading into Triton"),
        ],
        scaling_events=[event],
    )


class FakeInference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self) -> None:
        self.created: list[inference_pb2.Deployment] = []
        self.updates: list[inference_pb2.UpdateDeploymentRequest] = []

    def CreateDeployment(self, request, context):
        self.created.append(request.deployment)
        return inference_pb2.CreateDeploymentResponse(deployment=request.deployment)

    def GetDeployment(self, request, context):
        return inference_pb2.GetDeploymentResponse(deployment=_deployment(request.name))

    def UpdateDeployment(self, request, context):
        self.updates.append(request)
        return inference_pb2.UpdateDeploymentResponse(deployment=_deployment(request.deployment.name))


class FakeAdmin(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self) -> None:
        self.drained: list[str] = []
        self.resumed: list[str] = []
        self.quotas: dict[str, admin_pb2.Quota] = {}

    def ListNodes(self, request, context):
        return admin_pb2.ListNodesResponse(nodes=_nodes())

    def DrainNode(self, request, context):
        if request.name not in {n.name for n in _nodes()}:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no node {request.name!r}")
        self.drained.append(request.name)
        node = next(n for n in _nodes() if n.name == request.name)
        node.state = inference_pb2.NODE_STATE_DRAINING
        return admin_pb2.DrainNodeResponse(node=node)

    def ResumeNode(self, request, context):
        self.resumed.append(request.name)
        node = next(n for n in _nodes() if n.name == request.name)
        return admin_pb2.ResumeNodeResponse(node=node)

    def SetQuota(self, request, context):
        self.quotas[request.quota.tenant] = request.quota
        return admin_pb2.SetQuotaResponse(quota=request.quota)

    def GetQuota(self, request, context):
        quota = self.quotas.get(request.tenant, admin_pb2.Quota(tenant=request.tenant))
        return admin_pb2.GetQuotaResponse(quota=quota)


class Fakes:
    def __init__(self) -> None:
        self.inference = FakeInference()
        self.admin = FakeAdmin()
        self.address = ""


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fakes]:
    found = Fakes()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(found.inference, server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(found.admin, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    found.address = f"127.0.0.1:{port}"
    monkeypatch.setattr(_shared.console, "_width", 200)  # rich tables unwrapped
    monkeypatch.setattr(_shared, "tls_ca", None)
    try:
        yield found
    finally:
        server.stop(None)


def maas(fakes: Fakes, *args: str) -> Result:
    env = {"MAAS_API_KEY": "maas_test", "MAAS_GATEWAY_ADDR": fakes.address}
    return CliRunner().invoke(app, list(args), env=env)


def test_replicas_sets_min_and_max(fakes):
    result = maas(fakes, "deploy", "create", "web", "--model", "digits", "--version", "3", "--replicas", "3",
                  "--no-wait")
    assert result.exit_code == 0, result.output
    [created] = fakes.inference.created
    assert created.HasField("min_replicas")
    assert (created.min_replicas, created.max_replicas, created.target_in_flight) == (3, 3, 0)


def test_a_range_with_scale_to_zero_and_a_target(fakes):
    result = maas(fakes, "deploy", "create", "web", "--model", "digits", "--version", "3",
                  "--min-replicas", "0", "--max-replicas", "4", "--target-in-flight", "8", "--no-wait")
    assert result.exit_code == 0, result.output
    [created] = fakes.inference.created
    assert created.HasField("min_replicas") and created.min_replicas == 0  # 0 sent, not left unset
    assert (created.max_replicas, created.target_in_flight) == (4, 8)


def test_no_replica_option_leaves_the_service_default(fakes):
    result = maas(fakes, "deploy", "create", "web", "--model", "digits", "--version", "3", "--no-wait")
    assert result.exit_code == 0, result.output
    [created] = fakes.inference.created
    assert not created.HasField("min_replicas") and created.max_replicas == 0


@pytest.mark.parametrize("other", [["--min-replicas", "1"], ["--max-replicas", "4"]])
def test_replicas_with_a_range_is_refused(fakes, other):
    result = maas(fakes, "deploy", "create", "web", "--model", "digits", "--version", "3", "--replicas", "2",
                  *other, "--no-wait")
    assert result.exit_code == 2
    assert "--replicas" in result.output and "not both" in result.output
    assert not fakes.inference.created


def test_max_below_min_is_refused(fakes):
    result = maas(fakes, "deploy", "create", "web", "--model", "digits", "--version", "3",
                  "--min-replicas", "3", "--max-replicas", "2", "--no-wait")
    assert result.exit_code == 2 and "below" in result.output
    assert not fakes.inference.created


def test_update_replicas_names_both_fields_in_the_mask(fakes):
    result = maas(fakes, "deploy", "update", "web", "--replicas", "3")
    assert result.exit_code == 0, result.output
    [request] = fakes.inference.updates
    assert sorted(request.update_mask.paths) == ["max_replicas", "min_replicas"]
    assert (request.deployment.name, request.deployment.min_replicas, request.deployment.max_replicas) == (
        "web", 3, 3)

    result = maas(fakes, "deploy", "update", "web", "--target-in-flight", "6", "--version", "4")
    assert result.exit_code == 0, result.output
    request = fakes.inference.updates[-1]
    assert sorted(request.update_mask.paths) == ["target_in_flight", "version"]
    assert (request.deployment.target_in_flight, request.deployment.version) == (6, 4)

    assert maas(fakes, "deploy", "update", "web").exit_code == 2  # nothing to change
    assert maas(fakes, "deploy", "update", "web", "--replicas", "2", "--max-replicas", "3").exit_code == 2
    assert len(fakes.inference.updates) == 2


def test_deploy_get_json_has_replicas_with_node_and_state(fakes):
    result = maas(fakes, "deploy", "get", "web", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert [(r["node"], r["state"]) for r in shown["replicas"]] == [
        ("triton-0", "DEPLOYMENT_STATE_READY"), ("triton-2", "DEPLOYMENT_STATE_LOADING")]
    assert shown["replicas"][0]["message"] == "" and shown["replicas"][0]["canary"] is False
    assert (shown["minReplicas"], shown["maxReplicas"], shown["desiredReplicas"]) == (0, 4, 2)
    assert shown["targetInFlight"] == 4
    [event] = shown["scalingEvents"]
    assert (event["fromReplicas"], event["toReplicas"]) == (1, 2) and "in flight" in event["reason"]


def test_deploy_get_shows_replicas_and_scaling_events(fakes):
    result = maas(fakes, "deploy", "get", "web")
    assert result.exit_code == 0, result.output
    assert "1/2" in result.output  # one READY of the two wanted
    assert "min 0 (scales to zero when idle), max 4, target 4" in result.output
    assert "triton-2" in result.output and "loading into Triton" in result.output
    assert "1 → 2" in result.output and "8.0 in flight per replica > 4" in result.output


def test_deploy_get_shows_the_price_tier_and_the_canarys(fakes, monkeypatch):
    result = maas(fakes, "deploy", "get", "web")
    assert result.exit_code == 0, result.output
    assert "price tier: int8\n" in result.output

    def with_canary(name: str, plain=_deployment) -> inference_pb2.Deployment:
        deployment = plain(name)
        deployment.canary.CopyFrom(inference_pb2.Canary(version=4, weight_percent=10, state=READY, tier="distilled"))
        return deployment

    monkeypatch.setitem(globals(), "_deployment", with_canary)  # what FakeInference answers with
    result = maas(fakes, "deploy", "get", "web")
    assert "price tier: int8; canary v4 distilled" in result.output
    assert json.loads(maas(fakes, "deploy", "get", "web", "--json").output)["canary"]["tier"] == "distilled"


def test_nodes_list(fakes):
    result = maas(fakes, "nodes", "list", "--json")
    assert result.exit_code == 0, result.output
    nodes = json.loads(result.output)  # an array, as every list --json prints
    assert [(n["name"], n["state"]) for n in nodes] == [
        ("triton-0", "NODE_STATE_READY"), ("triton-1", "NODE_STATE_DOWN")]
    assert nodes[0]["freeSlots"] == 6 and nodes[0]["modelSlots"] == 8 and nodes[0]["gpus"] == 0
    assert nodes[1]["message"] == "not answering"

    table = maas(fakes, "nodes", "list")
    assert table.exit_code == 0, table.output
    assert "triton-1" in table.output and "DOWN" in table.output and "6 / 8" in table.output
    assert "3,000 / 4,096" in table.output and "never" in table.output  # triton-1's last contact


def test_nodes_drain_and_resume(fakes):
    result = maas(fakes, "nodes", "drain", "triton-0")
    assert result.exit_code == 0, result.output
    assert fakes.admin.drained == ["triton-0"] and "DRAINING" in result.output

    result = maas(fakes, "nodes", "resume", "triton-0")
    assert result.exit_code == 0, result.output
    assert fakes.admin.resumed == ["triton-0"] and "READY" in result.output

    missing = maas(fakes, "nodes", "drain", "triton-9")
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.output


def test_quota_max_replicas(fakes):
    result = maas(fakes, "admin", "quota", "set", "acme", "--max-replicas", "6")
    assert result.exit_code == 0, result.output
    assert fakes.admin.quotas["acme"].max_replicas == 6
    shown = maas(fakes, "admin", "quota", "get", "acme")
    assert shown.exit_code == 0, shown.output
    assert "max replicas" in shown.output and "6" in shown.output
    default = maas(fakes, "admin", "quota", "get", "other")
    assert "service default" in default.output


def test_sdk_replica_keywords(fakes):
    with Client(fakes.address, "maas_test") as client:
        with pytest.raises(ValueError, match="not both"):
            client.create_deployment("web", "digits", version=3, replicas=2, min_replicas=1)
        client.create_deployment("web", "digits", version=3, min_replicas=0, max_replicas=2)
        client.update_deployment("web", replicas=2)
        base = inference_pb2.Deployment(name="web", instances=2)
        client.update_deployment(base, ["instances"], target_in_flight=5)
        nodes = client.list_nodes()
        drained = client.drain_node("triton-0")
        resumed = client.resume_node("triton-0")
    [created] = fakes.inference.created
    assert created.HasField("min_replicas") and (created.min_replicas, created.max_replicas) == (0, 2)
    first, second = fakes.inference.updates
    assert list(first.update_mask.paths) == ["min_replicas", "max_replicas"]
    assert list(second.update_mask.paths) == ["instances", "target_in_flight"]
    assert second.deployment.instances == 2 and second.deployment.target_in_flight == 5
    assert base.target_in_flight == 0  # the caller's message is left as it was
    assert [n.name for n in nodes] == ["triton-0", "triton-1"]
    assert drained.state == inference_pb2.NODE_STATE_DRAINING and resumed.name == "triton-0"
