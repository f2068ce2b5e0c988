"""The gateway on several processes (MAAS_GATEWAY_WORKERS=2, set for the session's stack):
both workers serve the one port, limits and quotas stay exact across them, a revocation
reaches every worker within a second, their metrics are merged, a dead worker is replaced and
`maas status` lists them."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import grpc
import pytest
from maas import Client
from maas.errors import ApiError
from maas.gateway.v1 import admin_pb2
from maas.registry.v1 import registry_pb2, registry_pb2_grpc

from services.stack.ephemeral import EphemeralStack

pytestmark = pytest.mark.slow

# Connections, not calls, are spread over the workers (SO_REUSEPORT): open many.
CHANNELS = 16


def workers(stack: EphemeralStack) -> list[dict]:
    return json.loads((stack.home / "run" / "gateway-workers.json").read_text())["workers"]


def channels(stack: EphemeralStack) -> list[grpc.Channel]:
    # A channel of its own each, not one shared connection.
    return [
        grpc.insecure_channel(stack.gateway, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CHANNELS)
    ]


def list_models(channel: grpc.Channel, key: str) -> grpc.StatusCode:
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    try:
        stub.ListModels(registry_pb2.ListModelsRequest(), metadata=(("authorization", f"Bearer {key}"),), timeout=10)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def tenant_key(stack: EphemeralStack, tenant: str) -> tuple[str, str]:
    admin = Client(stack.gateway, stack.admin_key)
    admin.create_tenant(tenant)
    record, key = admin.create_api_key(tenant, "developer")
    return record.id, key


def test_two_workers_serve_the_port(stack) -> None:
    listed = workers(stack)
    assert [w["index"] for w in listed] == [0, 1]
    for worker in listed:
        os.kill(worker["pid"], 0)  # alive
    status = stack.maas("status")
    assert status.stdout.count("gateway worker") == 2


def test_a_daily_quota_is_exact_across_workers(stack) -> None:
    _, key = tenant_key(stack, "workers-quota")
    with Client(stack.gateway, stack.admin_key) as admin:
        admin.set_quota(admin_pb2.Quota(tenant="workers-quota", requests_per_day=20))
    opened = channels(stack)
    try:
        codes = [list_models(opened[i % CHANNELS], key) for i in range(48)]
    finally:
        for channel in opened:
            channel.close()
    assert codes.count(grpc.StatusCode.OK) == 20
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_a_revoked_key_is_refused_by_every_worker_within_a_second(stack) -> None:
    key_id, key = tenant_key(stack, "workers-revoke")
    opened = channels(stack)
    try:
        assert {list_models(channel, key) for channel in opened} == {grpc.StatusCode.OK}
        with Client(stack.gateway, stack.admin_key) as admin:
            admin.revoke_api_key(key_id)
        time.sleep(1.2)  # MAAS_AUTH_CACHE_SECONDS (1 s) and a margin
        assert {list_models(channel, key) for channel in opened} == {grpc.StatusCode.UNAUTHENTICATED}
    finally:
        for channel in opened:
            channel.close()


def test_metrics_are_merged_across_workers(stack) -> None:
    _, key = tenant_key(stack, "workers-metrics")
    opened = channels(stack)
    try:
        for channel in opened:
            assert list_models(channel, key) is grpc.StatusCode.OK
    finally:
        for channel in opened:
            channel.close()
    address = stack.env["MAAS_GATEWAY_METRICS_ADDR"]
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    served = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("maas_grpc_requests_total{")
        and "RegistryService/ListModels" in line
        and 'code="OK"' in line
    ]
    # One merged series, not one per worker, holding at least this test's calls.
    assert len(served) == 1 and served[0] >= CHANNELS


def test_a_killed_worker_is_replaced(stack) -> None:
    before = workers(stack)
    os.kill(before[0]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = workers(stack)
        if after[0]["pid"] != before[0]["pid"]:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the killed worker was not replaced")
    assert after[1]["pid"] == before[1]["pid"]
    admin = Client(stack.gateway, stack.admin_key)
    deadline = time.monotonic() + 30
    while True:  # the port keeps serving throughout: the other worker answers
        try:
            admin.whoami()
            break
        except ApiError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
