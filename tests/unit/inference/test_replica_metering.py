"""Replica-seconds for billing, with a fake clock over real deployments on fake nodes: replicas x
seconds per deployment and tier, a canary under its own tier, restarts and leader changes that
neither double count nor invent time, midnight, a non-leader, a stalled loop, a failed write, and
the internal GetReplicaUsage call (its validation, and one tenant never seeing another's)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from maas.inference.v1 import inference_pb2, inference_pb2_grpc
from sqlalchemy.exc import OperationalError

from services.common.channels import internal_metadata
from services.common.database import make_engine, upgrade
from services.common.errors import InvalidArgument
from services.common.interceptors import internal_token_authenticator
from services.common.server import App, ServerSpec, Servicer, running
from services.inference.deployments import Deployments, DeploymentSpec
from services.inference.load import LoadReporter
from services.inference.metering import ReplicaMeter, split_by_day
from services.inference.nodes import NodeSet
from services.inference.server import MIGRATIONS
from services.inference.servicer import InferenceServicer
from services.inference.store import READY, ReplicaUsage, ReplicaUsageStore
from tests.unit.inference.conftest import build_deployments
from tests.unit.inference.inference_fakes import TENANT, FakeTriton, fake_fleet
from tests.unit.inference.test_fleet import ready_on, until

NOON = datetime(2026, 3, 10, 12, 0, tzinfo=UTC).timestamp()
INTERVAL = 60.0  # the meter's setting: one interval counts at most 120 s


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FlakyStore(ReplicaUsageStore):
    """Fails the next `failures` writes, as a database that went away would."""

    failures = 0

    def add(self, rows: list[ReplicaUsage]) -> None:
        if self.failures:
            self.failures -= 1
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        super().add(rows)


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[NodeSet, list[FakeTriton]]:
    return fake_fleet(tmp_path / "fleet", 3)


@pytest.fixture
async def service(store, registry, fleet, tmp_path: Path) -> AsyncIterator[Deployments]:
    registry.versions[(TENANT, "digits", 2)][0].precision = "int8"
    deployments = build_deployments(store, registry, fleet[0], tmp_path, drain_seconds=0)
    await deployments.converger.restore()
    await deployments.converger.reconcile()
    yield deployments
    await deployments.close()


@pytest.fixture
def usage_store(engine) -> FlakyStore:
    return FlakyStore(engine)


def meter(service: Deployments, usage_store, clock: Clock, leading=lambda: True) -> ReplicaMeter:
    return ReplicaMeter(service.routes, usage_store, INTERVAL, clock=clock, leading=leading)


def recorded(usage_store, tenant: str = TENANT) -> dict[tuple[str, str, str], int]:
    rows = usage_store.of_tenant(tenant, "2026-01-01", "2026-12-31")
    return {(row.day, row.deployment, row.tier): row.replica_seconds for row in rows}


async def two_replicas(service: Deployments, name: str = "web") -> None:
    await service.create(TENANT, DeploymentSpec(name=name, model="digits", version=1, min_replicas=2, max_replicas=2))
    await until(lambda: len(ready_on(service, name)) == 2)


async def test_two_replicas_for_90_seconds_are_180_replica_seconds(service, usage_store):
    await two_replicas(service)
    clock = Clock(NOON)
    replicas = meter(service, usage_store, clock)
    await replicas.tick()  # starts the clock: nothing before it is known
    assert recorded(usage_store) == {}
    clock.now += 90
    await replicas.tick()
    assert recorded(usage_store) == {("2026-03-10", "web", "fp32"): 180}


async def test_a_canarys_replica_counts_under_its_versions_tier(service, usage_store):
    await service.create(TENANT, DeploymentSpec(name="web", model="digits", version=1))
    await until(lambda: len(ready_on(service)) == 1)
    await service.rollouts.start_canary(TENANT, "web", 2, 10, 0.0)
    await until(lambda: service.routes.get(TENANT, "web").canary is not None)
    clock = Clock(NOON)
    replicas = meter(service, usage_store, clock)
    await replicas.tick()
    clock.now += 60
    await replicas.tick()
    assert recorded(usage_store) == {("2026-03-10", "web", "fp32"): 60, ("2026-03-10", "web", "int8"): 60}


async def test_the_count_follows_scaling_from_tick_to_tick(service, usage_store):
    await service.create(TENANT, DeploymentSpec(name="web", model="digits", version=1, max_replicas=3))
    await until(lambda: len(ready_on(service)) == 1)
    clock = Clock(NOON)
    replicas = meter(service, usage_store, clock)
    await replicas.tick()
    clock.now += 60
    await replicas.tick()  # one replica
    await service.update(TENANT, DeploymentSpec(name="web", min_replicas=3), ["min_replicas"])
    await service.converger.fill()
    await until(lambda: len(ready_on(service)) == 3)
    clock.now += 60
    await replicas.tick()  # three
    assert recorded(usage_store) == {("2026-03-10", "web", "fp32"): 60 + 180}


async def test_a_restart_between_ticks_neither_double_counts_nor_invents_the_gap(service, usage_store):
    await two_replicas(service)
    clock = Clock(NOON)
    first = meter(service, usage_store, clock)
    await first.tick()
    clock.now += 60
    await first.tick()
    clock.now += 10
    await first.close()  # a stopping process counts up to its stop: 70 s held
    clock.now += 30  # down for 30 s: nobody watched
    restarted = meter(service, usage_store, clock)
    await restarted.tick()
    assert recorded(usage_store) == {("2026-03-10", "web", "fp32"): 2 * 70}
    clock.now += 60
    await restarted.tick()
    assert recorded(usage_store) == {("2026-03-10", "web", "fp32"): 2 * (70 + 60)}


async def test_a_leader_change_hands_over_without_overlap(service, usage_store):
    await two_replicas(service)
    clock = Clock(NOON)
    leads = {"old": True, "new": False}
    old = meter(service, usage_store, clock, leading=lambda: leads["old"])
    new = meter(service, usage_store, clock, leading=lambda: leads["new"])
    for _ in range(2):
        await old.tick()
        await new.tick()  # a standby counts nothing
        clock.now += 60
    leads.update(old=False, new=True)  # the old leader's lock is gone before it could tick again
    await old.tick()
    await new.tick()  # starts its own clock
    clock.now += 60
    await old.tick()
    await new.tick()
    # 60 s by the old leader, 60 s after the hand-over by the new; the 60 s in between by no one.
    assert recorded(usage_store) == {("2026-03-10", "web", "fp32"): 2 * 120}


async def test_a_process_that_does_not_lead_never_meters(service, usage_store):
    await two_replicas(service)
    clock = Clock(NOON)
    standby = meter(service, usage_store, clock, leading=lambda: False)
    for _ in range(3):
        await standby.tick()
        clock.now += 60
    await standby.close()
    assert recorded(usage_store) == {}


async def test_a_tick_across_midnight_is_split_between_the_two_days(service, usage_store):
    await two_replicas(service)
    clock = Clock(datetime(2026, 3, 10, 23, 59, 30, tzinfo=UTC).timestamp())
    replicas = meter(service, usage_store, clock)
    await replicas.tick()
    clock.now += 60
    await replicas.tick()
    assert recorded(usage_store) == {("2026-03-10", "web", "fp32"): 60, ("2026-03-11", "web", "fp32"): 60}


def test_seconds_are_split_at_each_utc_midnight():
    midnight = int(datetime(2026, 3, 11, tzinfo=UTC).timestamp())
    assert split_by_day(midnight - 5, midnight + 86_400 + 7) == [
        ("2026-03-10", 5),
        ("2026-03-11", 86_400),
        ("2026-03-12", 7),
    ]
    assert split_by_day(midnight, midnight) == []


async def test_a_stalled_loop_counts_at_most_two_intervals(service, usage_store):
    await two_replicas(service)
    clock = Clock(NOON)
    replicas = meter(service, usage_store, clock)
    await replicas.tick()
    clock.now += 3600  # the host was suspended for an hour
    await replicas.tick()
    assert recorded(usage_store) == {("2026-03-10", "web", "fp32"): 2 * 120}


async def test_a_clock_stepped_back_counts_no_second_twice(service, usage_store):
    await two_replicas(service)
    clock = Clock(NOON)
    replicas = meter(service, usage_store, clock)
    await replicas.tick()
    clock.now += 60
    await replicas.tick()
    clock.now -= 30
    await replicas.tick()
    clock.now += 60  # 30 s past the latest second counted
    await replicas.tick()
    assert recorded(usage_store) == {("2026-03-10", "web", "fp32"): 2 * 90}


async def test_what_a_failed_write_counted_is_written_with_the_next_tick(service, usage_store):
    await two_replicas(service)
    clock = Clock(NOON)
    replicas = meter(service, usage_store, clock)
    await replicas.tick()
    usage_store.failures = 1
    clock.now += 60
    await replicas.tick()
    assert recorded(usage_store) == {}
    clock.now += 60
    await replicas.tick()
    assert recorded(usage_store) == {("2026-03-10", "web", "fp32"): 240}


async def test_loading_replicas_and_deleted_deployments_are_not_counted(service, usage_store, fleet):
    _, tritons = fleet
    await two_replicas(service)
    clock = Clock(NOON)
    replicas = meter(service, usage_store, clock)
    await replicas.tick()
    for triton in tritons:
        triton.load_delay = 30  # the next deployment stays LOADING while the clock runs
    await service.create(TENANT, DeploymentSpec(name="slow", model="digits", version=1))
    await service.delete(TENANT, "web")
    clock.now += 60
    await replicas.tick()
    assert recorded(usage_store) == {}
    assert service.routes.get(TENANT, "slow").deployment.state != READY


# -- the internal RPC ---------------------------------------------------------------------------

TOKEN = "unit-token"


@pytest.fixture
async def stub(service, fleet) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    loads = LoadReporter(service, fleet[0], ["http://127.0.0.1:9/metrics"], 0)
    spec = ServerSpec(
        service="inference",
        address="127.0.0.1:0",
        servicers=[
            Servicer(
                inference_pb2_grpc.add_InferenceServiceServicer_to_server,
                InferenceServicer(service, loads),
                "maas.inference.v1.InferenceService",
            )
        ],
        authenticate=internal_token_authenticator(TOKEN),
    )
    async with running(App(spec)) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


async def test_get_replica_usage_answers_the_asserted_tenants_rows_only(stub, engine):
    ReplicaUsageStore(engine).add(
        [
            ReplicaUsage("2026-02-28", TENANT, "web", "fp32", 50),
            ReplicaUsage("2026-03-01", TENANT, "web", "int8", 3600),
            ReplicaUsage("2026-03-01", TENANT, "web", "fp32", 7200),
            ReplicaUsage("2026-03-31", TENANT, "batch", "fp16", 60),
            ReplicaUsage("2026-03-02", "other", "web", "fp32", 999),
        ]
    )
    request = inference_pb2.GetReplicaUsageRequest(start_day="2026-03-01", end_day="2026-03-31")
    response = await stub.GetReplicaUsage(request, metadata=internal_metadata(TOKEN, TENANT))
    assert [(r.day, r.deployment, r.tier, r.replica_seconds) for r in response.rows] == [
        ("2026-03-01", "web", "fp32", 7200),
        ("2026-03-01", "web", "int8", 3600),
        ("2026-03-31", "batch", "fp16", 60),
    ]
    stranger = await stub.GetReplicaUsage(request, metadata=internal_metadata(TOKEN, "mallory"))
    assert list(stranger.rows) == []


@pytest.mark.parametrize(
    ("start_day", "end_day", "message"),
    [
        ("", "2026-03-31", "start_day is required"),
        ("2026-03-01", "31/03/2026", "end_day '31/03/2026' is not a day: write YYYY-MM-DD"),
        ("2026-04-01", "2026-03-01", "start_day 2026-04-01 is after end_day 2026-03-01"),
        ("2024-01-01", "2026-03-01", "ask for at most 400 days at a time"),
    ],
)
async def test_get_replica_usage_refuses_a_bad_range_saying_why(stub, start_day, end_day, message):
    request = inference_pb2.GetReplicaUsageRequest(start_day=start_day, end_day=end_day)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.GetReplicaUsage(request, metadata=internal_metadata(TOKEN, TENANT))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


async def test_get_replica_usage_needs_the_internal_token(stub):
    request = inference_pb2.GetReplicaUsageRequest(start_day="2026-03-01", end_day="2026-03-31")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.GetReplicaUsage(request, metadata=internal_metadata("forged", TENANT))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_usage_validation_is_the_domains_too(service):
    with pytest.raises(InvalidArgument, match="2026-02-30"):
        await service.replica_meter.usage(TENANT, "2026-02-30", "2026-03-01")


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_usage_rows_add_up_per_day_deployment_and_tier(database, request, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'usage.db'}" if database == "sqlite" else request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    try:
        upgrade(engine, MIGRATIONS)
        usage = ReplicaUsageStore(engine)
        usage.add(
            [ReplicaUsage("2026-03-01", TENANT, "web", "fp32", 60), ReplicaUsage("2026-03-01", TENANT, "web", "int8", 5)]
        )
        usage.add([ReplicaUsage("2026-03-01", TENANT, "web", "fp32", 3 * 10**9)])  # past 32 bits
        assert usage.of_tenant(TENANT, "2026-03-01", "2026-03-01") == [
            ReplicaUsage("2026-03-01", TENANT, "web", "fp32", 60 + 3 * 10**9),
            ReplicaUsage("2026-03-01", TENANT, "web", "int8", 5),
        ]
    finally:
        engine.dispose()
