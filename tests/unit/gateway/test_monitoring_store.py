"""The monitoring tables on SQLite and PostgreSQL: settings, the payload budget, summaries added up
per writer, feedback matching, label sums, retention and tenant scoping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.common.database import make_engine, upgrade
from services.common.summaries import Summary
from services.gateway.monitoring_store import LoggingRecord, MonitoringStore, SampleRecord, SummaryRecord
from services.gateway.server import MIGRATIONS

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'gateway.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    upgrade(engine, MIGRATIONS)
    yield MonitoringStore(engine)
    engine.dispose()


def settings(tenant="acme", deployment="mlp", rate=0.5, budget=1000, keep=True, retention=7) -> LoggingRecord:
    return LoggingRecord(tenant, deployment, rate, budget, keep, retention, NOW)


def sample(request_id: str, *, tenant="acme", deployment="mlp", version=1, time=NOW, rows=1, predicted=3.0,
           inputs=None, outputs=None) -> SampleRecord:
    return SampleRecord(tenant, deployment, version, request_id, time, rows, predicted, inputs, outputs)


def test_settings_are_set_changed_and_listed(store):
    store.set_logging(settings())
    store.set_logging(settings(rate=0.25, keep=False))
    store.set_logging(settings(tenant="other"))
    assert store.get_logging("acme", "mlp") == settings(rate=0.25, keep=False)
    assert store.get_logging("acme", "nope") is None
    assert {(r.tenant, r.sample_rate) for r in store.list_logging()} == {("acme", 0.25), ("other", 0.5)}


def test_payloads_are_kept_while_the_days_budget_lasts(store):
    payload = '{"x":[[1.0]]}'  # 13 characters, twice per sample
    day_two = NOW + timedelta(days=1)
    written = [sample(f"r{i}", inputs=payload, outputs=payload) for i in range(5)]
    dropped = store.write(written, {("acme", "mlp"): 80}, [], "w1")
    assert dropped == 2  # 3 x 26 bytes fit in 80
    assert store.write([sample("big", inputs="x" * 100, outputs="")], {("acme", "mlp"): 80}, [], "w1") == 1
    # A new UTC day has a new budget; another deployment has its own.
    assert store.write([sample("d2", time=day_two, inputs=payload, outputs=payload)], {("acme", "mlp"): 80}, [], "w1") == 0
    assert store.write([sample("o", deployment="cnn", inputs=payload, outputs=payload)], {}, [], "w1") == 1
    kept = store.newest_samples("acme", "mlp", 100)
    assert [s.request_id for s in kept] == ["d2", "r2", "r1", "r0"]
    assert kept[0].time == day_two and kept[0].inputs_json == payload
    # Samples without payloads are written all the same (feedback still finds them).
    assert store.window_rows("acme", "mlp", 1, NOW) == 7


def test_summaries_add_up_per_writer_and_are_read_back_per_window(store):
    def counted(samples: int, classes: list[int]) -> str:
        return Summary({}, classes=classes, samples=samples).to_json()

    bucket = NOW.replace(minute=0)
    store.write([], {}, [SummaryRecord("acme", "mlp", 1, bucket, 5, counted(5, [5, 0]))], "w1")
    store.write([], {}, [SummaryRecord("acme", "mlp", 1, bucket, 4, counted(4, [1, 3]))], "w1")
    store.write([], {}, [SummaryRecord("acme", "mlp", 1, bucket, 2, counted(2, [0, 2]))], "w2")
    for stray in (
        SummaryRecord("acme", "mlp", 1, bucket - timedelta(hours=2), 2, counted(2, [2, 0])),  # too old
        SummaryRecord("acme", "mlp", 2, bucket, 2, counted(2, [2, 0])),  # another version
        SummaryRecord("other", "mlp", 1, bucket, 2, counted(2, [2, 0])),  # another tenant
    ):
        store.write([], {}, [stray], "w2")
    stored = sorted(Summary.from_json(text).classes for text in
                    store.window_summaries("acme", "mlp", 1, bucket - timedelta(hours=1)))
    assert stored == [[0, 2], [6, 3]]


def test_labels_attach_by_request_id_to_calls_of_one_prediction(store):
    store.write(
        [
            sample("a", predicted=3.0),
            sample("b", predicted=1.0),
            sample("batch", rows=4, predicted=None),
            sample("a", tenant="other", predicted=3.0),
        ],
        {},
        [],
        "w1",
    )
    matched = store.attach_labels("acme", "mlp", {"a": 3.0, "b": 2.0, "batch": 1.0, "never": 0.0})
    assert matched == {"a", "b"}
    stats = store.label_stats("acme", "mlp", 1, NOW - timedelta(hours=1))
    assert (stats.labelled, stats.correct) == (2, 1)
    assert (stats.label_sum, stats.label_square_sum, stats.error_square_sum) == (5.0, 13.0, 1.0)
    # The other tenant's call with the same id is untouched.
    assert store.label_stats("other", "mlp", 1, NOW - timedelta(hours=1)).labelled == 0
    assert store.label_stats("acme", "mlp", 2, NOW - timedelta(hours=1)).labelled == 0
    many = {f"id-{i}": 1.0 for i in range(1200)}  # more than one IN list
    store.write([sample(f"id-{i}", predicted=1.0) for i in range(0, 1200, 2)], {}, [], "w1")
    assert len(store.attach_labels("acme", "mlp", many)) == 600


def test_samples_of_another_tenant_or_deployment_stay_apart(store):
    payload = "[]"
    store.write(
        [sample("mine", inputs=payload, outputs=payload), sample("theirs", tenant="other", inputs=payload, outputs=payload)],
        {("acme", "mlp"): 100, ("other", "mlp"): 100},
        [],
        "w1",
    )
    assert [s.request_id for s in store.newest_samples("acme", "mlp", 10)] == ["mine"]
    assert [s.request_id for s in store.newest_samples("other", "mlp", 10)] == ["theirs"]
    assert store.newest_samples("acme", "cnn", 10) == []


def test_retention_deletes_what_is_older_than_each_deployments_days(store):
    store.set_logging(settings(deployment="short", retention=1))
    store.set_logging(settings(deployment="long", retention=30))
    old = NOW - timedelta(days=3)
    store.write(
        [
            sample("s-old", deployment="short", time=old),
            sample("s-new", deployment="short", time=NOW),
            sample("l-old", deployment="long", time=old),
            sample("u-old", deployment="unset", time=NOW - timedelta(days=8)),
            sample("u-new", deployment="unset", time=old),
        ],
        {},
        [
            SummaryRecord("acme", "short", 1, old, 1, "{}"),
            SummaryRecord("acme", "long", 1, old, 1, "{}"),
        ],
        "w1",
    )
    assert store.delete_expired(NOW, default_retention_days=7) == 2  # s-old, and u-old by the default
    since = NOW - timedelta(days=60)
    assert store.window_rows("acme", "short", 1, since) == 1
    assert store.window_rows("acme", "long", 1, since) == 1
    assert store.window_rows("acme", "unset", 1, since) == 1
    assert store.window_summaries("acme", "short", 1, since) == []
    assert store.window_summaries("acme", "long", 1, since) == ["{}"]
