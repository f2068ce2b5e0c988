"""The autoscaler's decisions reach the audit log once: RouteTable reports each new decision on
the route stream, and ScalingAudit writes it unless another gateway process claimed it first."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from maas.inference.v1 import inference_pb2

from services.gateway.audit import AuditLog
from services.gateway.routes import RouteTable
from services.gateway.scaling_audit import AUTOSCALER, METHOD, ScalingAudit
from tests.unit.gateway.gateway_fakes import route


def decided(seconds: int, to: int) -> inference_pb2.ScalingEvent:
    return inference_pb2.ScalingEvent(time=Timestamp(seconds=seconds), from_replicas=1, to_replicas=to, reason="busy")


async def test_the_route_table_reports_each_new_decision_once():
    channel = grpc.aio.insecure_channel("127.0.0.1:9")  # never used: apply() is fed directly
    table = RouteTable(channel, "token")
    heard: list[tuple[str, int]] = []
    table.on_scaling = lambda r: heard.append((r.deployment, r.last_scaling_event.to_replicas))
    web = route("acme", "web", "127.0.0.1:1")


    def send() -> None:  # each stream message is a new message
        table.apply([inference_pb2.Route.FromString(web.SerializeToString())])

    send()
    web.last_scaling_event.CopyFrom(decided(10, 2))
    send()
    send()  # the same decision again (another change to the table)
    web.ready = False
    send()
    web.last_scaling_event.CopyFrom(decided(20, 1))
    send()
    assert heard == [("web", 2), ("web", 1)]
    await table.close()
    await channel.close()


class FakeRedis:
    def __init__(self) -> None:
        self.keys: set[str] = set()

    async def set(self, key: str, value, nx: bool, ex: int) -> bool:
        if key in self.keys:
            return False
        self.keys.add(key)
        return True


class FakeLink:
    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.client = FakeRedis()


async def recorded(audit: AuditLog) -> list:
    await asyncio.sleep(0.05)
    return [audit._queue.get_nowait() for _ in range(audit._queue.qsize())]


async def test_a_decision_is_written_once_however_many_processes_hear_it():
    link = FakeLink()
    first, second = AuditLog(None), AuditLog(None)  # type: ignore[arg-type]
    web = route("acme", "web", "127.0.0.1:1")
    web.last_scaling_event.CopyFrom(decided(10, 2))
    ScalingAudit(first, link).heard(web)  # type: ignore[arg-type]
    ScalingAudit(second, link).heard(web)  # type: ignore[arg-type]
    rows = await recorded(first) + await recorded(second)
    assert len(rows) == 1
    (row,) = rows
    assert (row.tenant, row.api_key_id, row.method, row.code) == (web.tenant, AUTOSCALER, METHOD, "OK")
    assert row.resource == "web: 1 -> 2 replicas (busy)"


async def test_without_redis_the_decision_is_still_written():
    audit = AuditLog(None)  # type: ignore[arg-type]
    web = route("acme", "web", "127.0.0.1:1")
    web.last_scaling_event.CopyFrom(decided(10, 0))
    ScalingAudit(audit, FakeLink(up=False)).heard(web)  # type: ignore[arg-type]
    assert len(await recorded(audit)) == 1
