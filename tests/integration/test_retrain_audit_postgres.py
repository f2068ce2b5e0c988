"""Retraining events into the audit log on a real PostgreSQL server: the trainer lists every
tenant's events by id (ids never given twice), and the gateway's cursor moves by compare-and-set,
so that of several processes copying the same events at once only one writes them."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest

from services.common.database import make_engine, upgrade
from services.gateway.store import AuditFilter, AuditRecord, GatewayStore
from services.trainer.retrain_store import Policy, RetrainEvent, RetrainStore, Run, RunState, Trigger
from services.trainer.store import now

SERVICES = Path(__file__).resolve().parents[2] / "services"
pytestmark = pytest.mark.postgres


def test_trainer_event_ids_only_grow_on_postgres(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        upgrade(engine, SERVICES / "trainer" / "migrations")
        store = RetrainStore(engine)
        written = now() - timedelta(seconds=5)
        for model in ("iris", "wine"):
            store.put_policy(Policy(model=model, trigger=Trigger.NEW_DATASET_VERSION, dataset="d", tenant="acme",
                                    create_time=written))
        for model in ("iris", "wine", "wine"):
            run = Run("run-1", "acme", model, RunState.TRAINING, "manual", 1, "job-1", {}, written)
            store.add_event(run, RetrainEvent(run.id, written, "triggered", model))
        listed = store.events_after(0, 10)
        assert [(e.model, e.event.message) for e in listed] == [("iris", "iris"), ("wine", "wine"), ("wine", "wine")]
        store.delete_policy("acme", "wine")
        again = Run("run-2", "acme", "iris", RunState.TRAINING, "manual", 1, "job-2", {}, written)
        store.add_event(again, RetrainEvent(again.id, written, "training", "iris again"))
        (after,) = store.events_after(listed[-1].id, 10)
        assert after.event.message == "iris again" and after.id > listed[-1].id
        assert store.events_after(0, 1) == listed[:1]
    finally:
        engine.dispose()


def row(number: int) -> AuditRecord:
    return AuditRecord(f"{number:032x}", now(), "acme", "retrainer", "/maas.trainer.v1.TrainerService/Retrain",
                       f"iris: triggered (run-{number})", "OK")


def copy_together(store: GatewayStore, start: threading.Barrier, after: int, to: int) -> bool:
    start.wait()
    return store.copy_audit_events("events", after, to, [row(to)])


def test_the_audit_cursor_moves_once_on_postgres(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        upgrade(engine, SERVICES / "gateway" / "migrations")
        store = GatewayStore(engine)
        assert store.cursor("events") == 0
        # Several processes copy the same events at once, first from no cursor, then from one.
        for after, to in ((0, 10), (10, 20), (20, 30)):
            start = threading.Barrier(4)
            with ThreadPoolExecutor(4) as pool:
                copies = [pool.submit(copy_together, store, start, after, to) for _ in range(4)]
            assert sorted(copy.result() for copy in copies) == [False, False, False, True]
            assert store.cursor("events") == to
        rows = store.list_audit_events(AuditFilter(tenant="acme"), "", 100)
        assert [r.resource for r in rows] == ["iris: triggered (run-30)", "iris: triggered (run-20)",
                                              "iris: triggered (run-10)"]
        # A copier behind the cursor writes nothing.
        assert not store.copy_audit_events("events", 10, 40, [row(40)])
        assert store.cursor("events") == 30
    finally:
        engine.dispose()
