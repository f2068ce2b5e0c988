"""The trainer's job store and migrations on a real PostgreSQL server."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.database import make_engine, upgrade
from services.trainer.store import JobRecord, JobState, JobStore, now

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "trainer" / "migrations"
pytestmark = pytest.mark.postgres


def job(job_id: str, tenant: str = "acme") -> JobRecord:
    return JobRecord(id=job_id, tenant=tenant, kind="training", state=JobState.QUEUED, spec={"architecture": "mlp"},
                     model="m", parent_version=0, dataset_version=0, create_time=now())


def test_jobs_and_events_on_postgres(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        upgrade(engine, MIGRATIONS)
        upgrade(engine, MIGRATIONS)  # idempotent
        store = JobStore(engine)
        store.create(job("job-0001"), ("queued", {"position": 0}))
        store.create(job("job-0002"), ("queued", {"position": 1}))
        store.create(job("job-0003", "other"), ("queued", {"position": 2}))
        assert [j.id for j in store.list("acme", None, "", 10)] == ["job-0002", "job-0001"]
        assert [j.id for j in store.list("acme", None, "job-0002", 10)] == ["job-0001"]
        changed = store.transition("job-0001", [JobState.QUEUED], JobState.RUNNING, None, attempts=1)
        assert changed is not None and changed[0].state is JobState.RUNNING
        # A second transition from QUEUED loses: compare-and-set.
        assert store.transition("job-0001", [JobState.QUEUED], JobState.CANCELLED, ("finished", {})) is None
        added = store.add_events("job-0001", [("log", {"message": "a"}), ("progress", {"step": 3})],
                                 progress={"step": 3})
        assert [e.sequence for e in added] == [2, 3]
        finished = store.transition("job-0001", [JobState.RUNNING], JobState.SUCCEEDED, ("finished", {"state": "SUCCEEDED"}),
                                    end_time=now(), result={"version": 1})
        assert finished is not None and finished[1] is not None and finished[1].sequence == 4
        record = store.get("acme", "job-0001")
        assert record.progress == {"step": 3} and record.result == {"version": 1} and record.end_time is not None
        assert [e.kind for e in store.events("job-0001", 1)] == ["log", "progress", "finished"]
        assert [j.id for j in store.in_states([JobState.QUEUED])] == ["job-0002", "job-0003"]
        with pytest.raises(Exception, match="not found"):
            store.get("other", "job-0001")
    finally:
        engine.dispose()
