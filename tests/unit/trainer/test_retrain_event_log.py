"""Every tenant's retraining events in the order they were written, for the gateway's audit log
(Retrainer.list_events, TrainerService.ListRetrainEvents): after a cursor, within a limit, only
events old enough that no event with a smaller id can still appear, and ids never given twice."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument
from services.trainer.retrain import EVENT_SETTLE_SECONDS
from services.trainer.retrain_store import Policy, RetrainEvent, Run, RunState, Trigger
from tests.unit.trainer.retrain_fakes import TENANT, World, make_world

OTHER = "tenant-b"


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


def policy(model: str = "iris", **fields) -> Policy:
    return Policy(**{"model": model, "trigger": Trigger.NEW_DATASET_VERSION, "dataset": "iris-data", **fields})


async def test_every_tenants_events_come_oldest_first_after_the_cursor(world: World) -> None:
    retrainer = world.retrainer()
    world.registry.add_version("iris", tenant=OTHER)
    world.registry.datasets[(OTHER, "iris-data")] = 1
    await retrainer.set_policy(TENANT, policy())
    await retrainer.set_policy(OTHER, policy())
    await retrainer.trigger(TENANT, "iris")
    await retrainer.trigger(OTHER, "iris")
    assert await retrainer.list_events(0, 0) == []  # none has settled yet
    world.clock.advance(EVENT_SETTLE_SECONDS)
    listed = await retrainer.list_events(0, 0)
    assert [(e.tenant, e.model, e.event.step) for e in listed] == [
        (TENANT, "iris", "triggered"), (TENANT, "iris", "training"), (OTHER, "iris", "triggered"),
        (OTHER, "iris", "training"),
    ]
    ids = [e.id for e in listed]
    assert ids == sorted(set(ids))
    runs = {tenant: world.store.runs(tenant, "iris", 1)[0].id for tenant in (TENANT, OTHER)}
    assert [e.event.run_id for e in listed] == [runs[TENANT], runs[TENANT], runs[OTHER], runs[OTHER]]
    assert listed[0].event.message == world.store.events(TENANT, "iris", 10)[0].message
    assert await retrainer.list_events(ids[0], 2) == listed[1:3]
    assert await retrainer.list_events(ids[-1], 0) == []


async def test_a_young_event_holds_back_the_ones_after_it(world: World) -> None:
    run = Run("run-1", TENANT, "iris", RunState.TRAINING, "manual", 1, "job-1", {}, world.clock())
    # Written first but stamped last: an event whose transaction took its time.
    world.store.add_event(run, RetrainEvent(run.id, world.clock(), "trained", "first"))
    world.store.add_event(run, RetrainEvent(run.id, world.clock() - timedelta(seconds=10), "evaluated", "second"))
    retrainer = world.retrainer()
    assert await retrainer.list_events(0, 0) == []
    world.clock.advance(EVENT_SETTLE_SECONDS)
    assert [e.event.message for e in await retrainer.list_events(0, 0)] == ["first", "second"]


async def test_the_ids_of_a_deleted_policys_events_are_not_given_again(world: World) -> None:
    retrainer = world.retrainer()
    world.registry.add_version("wine")
    await retrainer.set_policy(TENANT, policy())
    await retrainer.set_policy(TENANT, policy("wine"))
    await retrainer.trigger(TENANT, "wine")  # the newest events are wine's
    world.clock.advance(EVENT_SETTLE_SECONDS)
    cursor = (await retrainer.list_events(0, 0))[-1].id
    await retrainer.delete_policy(TENANT, "wine")
    await retrainer.trigger(TENANT, "iris")
    world.clock.advance(EVENT_SETTLE_SECONDS)
    after = await retrainer.list_events(cursor, 0)
    assert [(e.model, e.event.step) for e in after] == [("iris", "triggered"), ("iris", "training")]
    assert min(e.id for e in after) > cursor


async def test_a_negative_cursor_or_limit_is_refused(world: World) -> None:
    with pytest.raises(InvalidArgument, match="after_id"):
        await world.retrainer().list_events(-1, 0)
    with pytest.raises(InvalidArgument, match="limit"):
        await world.retrainer().list_events(0, -5)
