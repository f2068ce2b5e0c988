"""The trainer's retraining events reach the gateway's audit log exactly once: RetrainAudit asks a
stand-in trainer (a real gRPC server on a free port) for the events after its cursor and writes
them in the transaction that moves the cursor, in order, however many gateway processes share the
database, after a restart, and after a round the trainer did not answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc

from services.common.database import make_engine, upgrade
from services.common.interceptors import INTERNAL_TOKEN_KEY, TENANT_KEY
from services.common.leader import LeaderLock
from services.gateway.audit import MAX_RESOURCE
from services.gateway.retrain_audit import CURSOR, METHOD, PAGE, RETRAINER, RetrainAudit
from services.gateway.server import MIGRATIONS
from services.gateway.store import AuditFilter, AuditRecord, GatewayStore
from tests.unit.gateway.gateway_fakes import serve

TOKEN = "internal-token"
START = datetime(2026, 3, 1, 12, tzinfo=UTC)


class FakeTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    """ListRetrainEvents over events held in memory; `down` answers UNAVAILABLE; `together` holds
    each answer until that many calls are waiting (copiers that read the same cursor)."""

    def __init__(self) -> None:
        self.events: list[trainer_pb2.TenantRetrainEvent] = []
        self.requests: list[tuple[int, int]] = []
        self.metadata: list[dict[str, str]] = []
        self.down = False
        self.together = 1
        self._waiting: list[asyncio.Event] = []

    def add(self, tenant: str, model: str, step: str, message: str = "", run_id: str = "run-1") -> None:
        number = len(self.events) + 1
        time = Timestamp()
        time.FromDatetime(START + timedelta(seconds=number))
        event = trainer_pb2.RetrainEvent(run_id=run_id, time=time, step=step, message=message or f"{step} {number}")
        self.events.append(trainer_pb2.TenantRetrainEvent(id=number * 10, tenant=tenant, model=model, event=event))

    async def ListRetrainEvents(self, request, context):  # noqa: N802
        self.requests.append((request.after_id, request.limit))
        self.metadata.append(dict(context.invocation_metadata()))
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the trainer is restarting")
        await self._gather()
        after = [event for event in self.events if event.id > request.after_id]
        return trainer_pb2.ListRetrainEventsResponse(events=after[: request.limit or 500])

    async def _gather(self) -> None:
        arrived = asyncio.Event()
        self._waiting.append(arrived)
        if len(self._waiting) >= self.together:
            for waiting in self._waiting:
                waiting.set()
            self._waiting.clear()
        await arrived.wait()


@dataclass
class Setup:
    trainer: FakeTrainer
    address: str
    database_url: str
    store: GatewayStore

    def copier(self, store: GatewayStore | None = None, interval_seconds: float = 0) -> RetrainAudit:
        """One gateway process's copier, with its own channel and lock."""
        channel = grpc.aio.insecure_channel(self.address)
        lock = LeaderLock(self.database_url, "gateway-retrain-audit")
        return RetrainAudit(store or self.store, channel, TOKEN, lock, interval_seconds)

    def rows(self, tenant: str = "") -> list[AuditRecord]:
        """The audit log, oldest first."""
        return self.store.list_audit_events(AuditFilter(tenant=tenant), "", 10_000)[::-1]


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    trainer = FakeTrainer()
    server, address = await serve((trainer_pb2_grpc.add_TrainerServiceServicer_to_server, trainer))
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    engine = make_engine(url)
    upgrade(engine, MIGRATIONS)
    yield Setup(trainer, address, url, GatewayStore(engine))
    await server.stop(None)
    engine.dispose()


async def eventually(condition: Callable[[], bool], seconds: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "never happened"
        await asyncio.sleep(0.01)


async def closed(*copiers: RetrainAudit) -> None:
    for copier in copiers:
        await copier.close()


async def test_events_become_audit_rows_of_their_tenants_in_order(setup: Setup) -> None:
    setup.trainer.add("acme", "iris", "triggered", "new version 2 of dataset iris-data")
    setup.trainer.add("other", "wine", "triggered")
    setup.trainer.add("acme", "iris", "training", "job job-7 on iris-data v2", run_id="run-7")
    copier = setup.copier()
    assert await copier.copy() == 3
    acme = setup.rows("acme")
    assert [(r.api_key_id, r.method, r.code) for r in acme] == [(RETRAINER, METHOD, "OK")] * 2
    assert [r.resource for r in acme] == [
        "iris: triggered (run-1) new version 2 of dataset iris-data",
        "iris: training (run-7) job job-7 on iris-data v2",
    ]
    # Each row bears the time of its step, and sorts by it.
    assert [r.time for r in acme] == [START + timedelta(seconds=1), START + timedelta(seconds=3)]
    assert [r.resource for r in setup.rows("other")] == ["wine: triggered (run-1) triggered 2"]
    # Every tenant's events in one call: the internal token, no tenant asserted.
    assert setup.trainer.metadata[0][INTERNAL_TOKEN_KEY] == TOKEN and TENANT_KEY not in setup.trainer.metadata[0]
    setup.trainer.add("other", "wine", "training")
    assert await copier.copy() == 1
    assert await copier.copy() == 0
    assert setup.trainer.requests == [(0, PAGE), (30, PAGE), (40, PAGE)]
    assert [r.resource for r in setup.rows()][-1] == "wine: training (run-1) training 4"
    assert setup.store.cursor(CURSOR) == 40
    await closed(copier)


async def test_a_round_copies_page_after_page(setup: Setup) -> None:
    for _ in range(2 * PAGE + 1):
        setup.trainer.add("acme", "iris", "triggered")
    copier = setup.copier()
    assert await copier.copy() == 2 * PAGE + 1
    assert len(setup.rows()) == 2 * PAGE + 1
    assert [after for after, _ in setup.trainer.requests] == [0, PAGE * 10, 2 * PAGE * 10]
    await closed(copier)


async def test_copiers_sharing_one_database_write_each_event_once(setup: Setup) -> None:
    for step in ("triggered", "training"):
        setup.trainer.add("acme", "iris", step)
    first, second = setup.copier(), setup.copier()
    # Only the lock's holder copies...
    await first.round()
    await second.round()
    assert len(setup.rows()) == 2 and len(setup.trainer.requests) == 1
    # ...and two that asked for the same events (the lock handed over mid-round) write them once.
    setup.trainer.add("acme", "iris", "trained")
    setup.trainer.together = 2
    copied = await asyncio.gather(first.copy(), second.copy())
    assert sorted(copied) == [0, 1]
    assert [r.resource.split(" (")[0] for r in setup.rows()] == ["iris: triggered", "iris: training", "iris: trained"]
    await closed(first, second)


async def test_two_first_copies_write_each_event_once(setup: Setup) -> None:
    setup.trainer.add("acme", "iris", "triggered")
    setup.trainer.together = 2
    first, second = setup.copier(), setup.copier()
    assert sorted(await asyncio.gather(first.copy(), second.copy())) == [0, 1]
    assert len(setup.rows()) == 1 and setup.store.cursor(CURSOR) == 10
    await closed(first, second)


class DiesBeforeCommit(GatewayStore):
    """A gateway process killed after it read the events and before its transaction committed."""

    def copy_audit_events(self, name: str, after: int, to: int, events: list[AuditRecord]) -> bool:
        raise ConnectionError("killed")


async def test_a_restarted_gateway_goes_on_from_its_cursor(setup: Setup) -> None:
    setup.trainer.add("acme", "iris", "triggered")
    copier = setup.copier()
    assert await copier.copy() == 1
    await closed(copier)
    setup.trainer.add("acme", "iris", "training")
    dying = setup.copier(DiesBeforeCommit(setup.store.engine))
    with pytest.raises(ConnectionError):
        await dying.copy()
    await closed(dying)
    setup.trainer.add("acme", "iris", "trained")
    restarted = setup.copier(GatewayStore(make_engine(setup.database_url)))
    assert await restarted.copy() == 2
    assert setup.trainer.requests[-1] == (10, PAGE)
    assert [r.resource.split(" (")[0] for r in setup.rows()] == ["iris: triggered", "iris: training", "iris: trained"]
    await closed(restarted)


async def test_a_trainer_that_is_down_is_asked_again_next_round(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    setup.trainer.add("acme", "iris", "triggered")
    setup.trainer.down = True
    copier = setup.copier(interval_seconds=0.05)
    with caplog.at_level(logging.WARNING, logger="services.gateway.retrain_audit"):
        copier.start()
        await eventually(lambda: len(setup.trainer.requests) >= 3)
    assert setup.rows() == [] and setup.store.cursor(CURSOR) == 0
    warnings = [r for r in caplog.records if r.name == "services.gateway.retrain_audit"]
    assert "UNAVAILABLE: the trainer is restarting" in warnings[0].error  # type: ignore[attr-defined]
    setup.trainer.down = False
    await eventually(lambda: bool(setup.rows()))
    await asyncio.sleep(0.15)  # rounds after that copy nothing again
    assert len(setup.rows()) == 1
    await closed(copier)


async def test_the_resource_is_cut_to_the_audit_column(setup: Setup) -> None:
    setup.trainer.add("acme", "iris", "failed", "training failed: " + "x" * 1000)
    copier = setup.copier()
    await copier.copy()
    (row,) = setup.rows()
    assert len(row.resource) == MAX_RESOURCE
    assert row.resource.startswith("iris: failed (run-1) training failed: xxx")
    await closed(copier)
