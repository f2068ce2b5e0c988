"""Issue 12's serving fleet, end to end: three embedded Triton nodes (MAAS_TRITON_NODES=3) behind
the real gateway. Replicas land on distinct nodes; a node killed with kill -9 under a 16-client
Predict loop costs no request and its replica is back elsewhere within 30 s; a drained node
costs no request; the autoscaler adds and removes replicas with the load and scales an idle
deployment to zero, which the next request wakes; a tenant at its replica cap is refused."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from maas import Client
from maas.errors import ApiError
from maas.gateway.v1 import admin_pb2
from maas.inference.v1 import inference_pb2, inference_pb2_grpc
from maas.tensors import to_tensor
from tritonclient.grpc import InferenceServerClient

from services.common.channels import TRITON_TOKEN_HEADER
from services.stack.ephemeral import EphemeralStack
from tests.support.digits import SIGNATURE, DigitsModel
from tests.support.heavy import HEAVY_SIGNATURE, heavy_input, save_heavy
from tests.support.tenants import developer_clients

pytestmark = pytest.mark.slow

CLIENTS = 16
REPLICA_BACK_SECONDS = 30


@pytest.fixture(scope="module")
def fleet(digits: DigitsModel, tmp_path_factory):
    stack = EphemeralStack()
    stack.env.update(
        MAAS_TRITON_NODES="3",
        # Short windows, so that scaling shows within a test.
        MAAS_INFERENCE_SCALE_UP_WINDOW_SECONDS="2",
        MAAS_INFERENCE_SCALE_DOWN_WINDOW_SECONDS="4",
        MAAS_INFERENCE_SCALE_TO_ZERO_SECONDS="4",
    )
    with stack, developer_clients(stack, "acme", "capped") as clients:
        acme = clients["acme"]
        acme.create_model("digits")
        acme.upload_version("digits", digits.path, format="torchscript", signature=SIGNATURE)
        heavy = save_heavy(tmp_path_factory.mktemp("heavy"))
        acme.create_model("heavy")
        acme.upload_version("heavy", heavy, format="torchscript", signature=HEAVY_SIGNATURE)
        yield stack, acme, clients["capped"], digits


def two_replicas(acme: Client) -> list[str]:
    """The `digits` deployment with 2 ready replicas (created here when a test runs alone)."""
    if "digits" not in {d.name for d in acme.list_deployments()}:
        acme.create_deployment("digits", "digits", version=1, replicas=2)
    return wait_until(lambda: len(ready_nodes(acme, "digits")) == 2 and ready_nodes(acme, "digits"), 240, "2 replicas")


def acme_key(stack: EphemeralStack, client: Client) -> str:
    return dict(client._metadata)["authorization"].split(" ", 1)[1]


def deployment_json(stack: EphemeralStack, name: str, key: str) -> dict:
    shown = stack.maas("deploy", "get", name, "--json", env={**stack.env, "MAAS_API_KEY": key})
    return json.loads(shown.stdout)


def nodes_json(stack: EphemeralStack) -> list[dict]:
    shown = stack.maas("nodes", "list", "--json", env={**stack.env, "MAAS_API_KEY": stack.admin_key})
    return json.loads(shown.stdout)


def ready_nodes(client: Client, name: str) -> list[str]:
    deployment = client.get_deployment(name)
    return sorted(r.node for r in deployment.replicas if r.state == inference_pb2.DEPLOYMENT_STATE_READY and not r.canary)


def wait_until(condition, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(poll)


def triton_pid(stack: EphemeralStack, node: str) -> int:
    return int((stack.home / "inference" / "nodes" / node / "triton.pid").read_text())


@contextlib.contextmanager
def predict_loop(stack: EphemeralStack, key: str, name: str, x: np.ndarray) -> Iterator[dict]:
    """CLIENTS threads predicting in a loop until the block ends; yields the tallies. Each call
    is made once, on a channel with gRPC's own retries off (the SDK's would retry UNAVAILABLE):
    every request that did not succeed at the gateway counts as failed."""
    tally: dict = {"ok": 0, "failed": [], "latencies": []}
    stop = threading.Event()
    lock = threading.Lock()
    channel = grpc.insecure_channel(stack.gateway, options=[("grpc.enable_retries", 0)])
    predict = inference_pb2_grpc.InferenceServiceStub(channel).Predict
    request = inference_pb2.PredictRequest(deployment=name, inputs=[to_tensor("x", x)])
    metadata = (("authorization", f"Bearer {key}"),)

    def run() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                predict(request, metadata=metadata, timeout=30)
            except grpc.RpcError as error:
                with lock:
                    tally["failed"].append(f"{error.code().name}: {error.details()}"[:300])
                continue
            with lock:
                tally["ok"] += 1
                tally["latencies"].append(time.perf_counter() - started)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        yield tally
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        channel.close()


def test_replicas_land_on_distinct_nodes_and_survive_a_node_kill(fleet):
    stack, acme, _, digits = fleet
    placed = two_replicas(acme)
    assert len(set(placed)) == 2
    shown = deployment_json(stack, "digits", acme_key(stack, acme))
    assert sorted(r["node"] for r in shown["replicas"]) == placed
    assert {r["state"] for r in shown["replicas"]} == {"DEPLOYMENT_STATE_READY"}
    nodes = {node["name"]: node for node in nodes_json(stack)}
    assert set(nodes) == {"triton-0", "triton-1", "triton-2"}
    assert all(nodes[name]["replicas"] >= 1 for name in placed)

    x = digits.test_x[:1]
    victim = placed[0]
    with predict_loop(stack, acme_key(stack, acme), "digits", x) as tally:
        time.sleep(3)
        before = tally["ok"]
        os.kill(triton_pid(stack, victim), signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: victim not in ready_nodes(acme, "digits"), 5, "the dead node's replica leaves")
        back = wait_until(
            lambda: len(ready_nodes(acme, "digits")) == 2 and ready_nodes(acme, "digits"),
            REPLICA_BACK_SECONDS,
            "back to 2 ready replicas",
        )
        recovered = time.monotonic() - killed
        time.sleep(2)
    assert tally["failed"] == [], f"{len(tally['failed'])} requests failed: {tally['failed'][:3]}"
    assert tally["ok"] > before > 0
    assert len(set(back)) == 2
    print(f"node kill: {tally['ok']} requests, 0 failed; back to 2 replicas in {recovered:.1f} s")


def test_a_drained_node_costs_no_request(fleet):
    stack, acme, _, digits = fleet
    drained = two_replicas(acme)[0]
    admin = Client(stack.gateway, stack.admin_key)
    try:
        with predict_loop(stack, acme_key(stack, acme), "digits", digits.test_x[:1]) as tally:
            time.sleep(1)
            admin.drain_node(drained)
            wait_until(
                lambda: drained not in ready_nodes(acme, "digits") and len(ready_nodes(acme, "digits")) == 2,
                60,
                "the replicas moved off the drained node",
            )
            time.sleep(3)  # past the drain delay: the old replica is unloaded under load
        assert tally["failed"] == [], f"{len(tally['failed'])} requests failed: {tally['failed'][:3]}"
        states = {node.name: node.state for node in admin.list_nodes()}
        assert states[drained] == inference_pb2.NODE_STATE_DRAINING
    finally:
        admin.resume_node(drained)
        admin.close()


def test_the_autoscaler_scales_out_under_load_and_back_in_when_idle(fleet):
    stack, acme, _, digits = fleet
    acme.create_deployment("elastic", "heavy", version=1, min_replicas=1, max_replicas=2, target_in_flight=2)
    acme.wait_ready("elastic", timeout=240)
    assert len(ready_nodes(acme, "elastic")) == 1
    x = heavy_input()
    with predict_loop(stack, acme_key(stack, acme), "elastic", x) as tally:
        wait_until(lambda: len(ready_nodes(acme, "elastic")) == 2, 60, "a second replica under load")
    assert tally["failed"] == []
    wait_until(lambda: len(ready_nodes(acme, "elastic")) == 1, 60, "back to one replica when idle")
    events = acme.get_deployment("elastic").scaling_events
    assert [(e.from_replicas, e.to_replicas) for e in events][:2] == [(2, 1), (1, 2)]
    assert "in flight" in events[1].reason
    # Each decision is in the audit log too, once, written by the gateway from the route stream.
    with Client(stack.gateway, stack.admin_key) as admin:

        def audited() -> list[str]:
            method = "/maas.inference.v1.InferenceService/Autoscale"
            return [e.resource for e in admin.list_audit_events(tenant="acme", method=method) if e.resource.startswith("elastic:")]

        rows = wait_until(lambda: len(audited()) >= 2 and audited(), 10, "the scaling decisions in the audit log")
    assert rows[0].startswith("elastic: 2 -> 1 replicas (") and rows[1].startswith("elastic: 1 -> 2 replicas (")
    assert len(rows) == 2
    acme.delete_deployment("elastic")


def test_an_idle_deployment_scales_to_zero_and_a_request_wakes_it(fleet):
    stack, acme, _, digits = fleet
    acme.create_deployment("sleepy", "digits", version=1, min_replicas=0, max_replicas=1)
    acme.wait_ready("sleepy", timeout=240)
    wait_until(
        lambda: acme.get_deployment("sleepy").state == inference_pb2.DEPLOYMENT_STATE_SCALED_TO_ZERO,
        60,
        "scaled to zero",
    )
    assert ready_nodes(acme, "sleepy") == []
    # Its model leaves the node once the drain delay passed: the request below is a cold start.
    wait_until(lambda: loaded_models(stack) == shown_replicas(acme), 30, "the idle replica unloaded")
    started = time.perf_counter()
    outputs = acme.predict("sleepy", {"x": digits.test_x[:4]}, timeout=120)
    cold_start = time.perf_counter() - started
    np.testing.assert_allclose(outputs["logits"], digits.reference(digits.test_x[:4]), rtol=1e-5, atol=1e-5)
    assert len(ready_nodes(acme, "sleepy")) == 1
    reasons = [event.reason for event in acme.get_deployment("sleepy").scaling_events]
    assert "a request arrived while scaled to zero" in reasons[0] and "no request" in reasons[1]
    print(f"cold start from zero: {cold_start:.1f} s")
    acme.delete_deployment("sleepy")


def test_a_tenant_at_its_replica_cap_is_refused_with_the_cap_named(fleet):
    stack, _, capped, digits = fleet
    admin = Client(stack.gateway, stack.admin_key)
    try:
        admin.set_quota(admin_pb2.Quota(tenant="capped", max_replicas=3))
    finally:
        admin.close()
    capped.create_model("digits")
    capped.upload_version("digits", digits.path, format="torchscript", signature=SIGNATURE)
    capped.create_deployment("first", "digits", version=1, replicas=2)
    with pytest.raises(ApiError) as refused:
        capped.create_deployment("second", "digits", version=1, replicas=2)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at most 3 replicas" in str(refused.value)
    capped.delete_deployment("first")


def test_a_restarted_inference_service_loses_nothing_and_loads_nothing_twice(fleet):
    stack, acme, _, digits = fleet
    two_replicas(acme)
    state = json.loads((stack.home / "run" / "stack.json").read_text())
    os.kill(state["children"]["inference"]["pid"], signal.SIGKILL)
    time.sleep(1)
    placed = wait_until(
        lambda: _quietly(lambda: len(ready_nodes(acme, "digits")) == 2 and ready_nodes(acme, "digits")),
        180,
        "2 ready replicas after the restart",
    )
    np.testing.assert_allclose(
        acme.predict("digits", {"x": digits.test_x[:4]}, timeout=60)["logits"],
        digits.reference(digits.test_x[:4]),
        rtol=1e-5,
        atol=1e-5,
    )
    # Exactly the replicas the deployments show are loaded: no copy left over anywhere.
    wait_until(lambda: loaded_models(stack) == shown_replicas(acme), 30, "only the shown replicas loaded")
    assert len(placed) == 2


def _quietly(probe):
    try:
        return probe()
    except ApiError:
        return False  # the inference service is still starting


def shown_replicas(acme: Client) -> int:
    return sum(len(ready_nodes(acme, d.name)) for d in acme.list_deployments())


def loaded_models(stack: EphemeralStack) -> int:
    """Models loaded READY over every node."""
    return sum(_models_on(stack, node) for node in ("triton-0", "triton-1", "triton-2"))


def _models_on(stack: EphemeralStack, node: str) -> int:
    """How many models the node's Triton holds READY."""
    index = int(node.rsplit("-", 1)[1])
    port = int(stack.env["MAAS_TRITON_GRPC_PORT"]) + 3 * index
    token = (stack.home / "triton.token").read_text().strip()
    client = InferenceServerClient(f"127.0.0.1:{port}")
    try:
        models = client.get_model_repository_index(headers={TRITON_TOKEN_HEADER: token}).models
    finally:
        client.close()
    return sum(model.state == "READY" for model in models)
