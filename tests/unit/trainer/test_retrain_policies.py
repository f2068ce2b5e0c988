"""Retraining policies in the domain, with stand-ins for the registry, the inference service and
the jobs: validation with what to do, defaults, replacing and deleting, and every trigger with
its cooldown and one run at a time."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.trainer.optimization_spec import TRAINING_SPEC_KEY
from services.trainer.retrain import (
    DEFAULT_CANARY_MAX_ERROR_RATE,
    DEFAULT_CANARY_WEIGHT_PERCENT,
    DEFAULT_CANARY_WINDOW_SECONDS,
    DEFAULT_COOLDOWN_SECONDS,
)
from services.trainer.retrain_store import Action, Policy, RunState, Trigger
from tests.unit.trainer.retrain_fakes import SPEC, TENANT, World, events_of, make_world, only


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


def policy(**fields) -> Policy:
    return Policy(**{"model": "iris", "trigger": Trigger.NEW_DATASET_VERSION, "dataset": "iris-data", **fields})


async def test_a_policy_gets_its_defaults_and_the_spec_of_the_newest_trained_version(world: World) -> None:
    world.registry.add_version("iris", {"task": "classification"})  # version 2: uploaded, not trained
    retrainer = world.retrainer()
    stored = await retrainer.set_policy(TENANT, policy())
    assert stored.from_version == 1  # the newest version the trainer made, not the uploaded 2
    assert stored.spec == SPEC.to_dict() and stored.task == "classification"
    assert (stored.metric, stored.min_gain, stored.cooldown_seconds) == ("accuracy", 0.0, DEFAULT_COOLDOWN_SECONDS)
    # It watches for dataset versions after the newest one now.
    assert stored.last_dataset_version == 1 and stored.create_time == world.clock()
    got, runs, events = await retrainer.get_policy(TENANT, "iris")
    assert got == stored and runs == [] and events == []


async def test_canary_defaults(world: World) -> None:
    world.inference.deploy("iris-prod", "iris", 1)
    stored = await world.retrainer().set_policy(TENANT, policy(action=Action.CANARY, deployment="iris-prod"))
    assert (stored.canary_weight_percent, stored.canary_window_seconds, stored.canary_max_error_rate) == (
        DEFAULT_CANARY_WEIGHT_PERCENT, DEFAULT_CANARY_WINDOW_SECONDS, DEFAULT_CANARY_MAX_ERROR_RATE)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"trigger": None}, "choose a trigger"),
        ({"model": "Iris"}, "invalid model name"),
        ({"dataset": ""}, "dataset name is required"),
        ({"from_version": -1}, "from_version"),
        ({"trigger": Trigger.SCHEDULE}, "interval_seconds between 60"),
        ({"trigger": Trigger.SCHEDULE, "interval_seconds": 59}, "interval_seconds between 60"),
        ({"interval_seconds": 3600}, "schedule trigger only"),
        ({"trigger": Trigger.DRIFT}, "watches a deployment"),
        ({"trigger": Trigger.DRIFT, "deployment": "iris-prod", "drift_threshold": -0.1}, "drift_threshold"),
        ({"trigger": Trigger.DRIFT, "deployment": "iris-prod", "drift_threshold": math.nan}, "drift_threshold"),
        ({"drift_threshold": 0.3}, "drift trigger only"),
        ({"metric": "f1"}, "unknown metric"),
        ({"metric": "r2"}, "its metric is accuracy, not r2"),
        ({"min_gain": -0.01}, "min_gain"),
        ({"min_gain": math.nan}, "min_gain"),
        ({"action": Action.ALIAS}, "name it (--alias)"),
        ({"action": Action.ALIAS, "alias": "Prod"}, "invalid alias name"),
        ({"alias": "production"}, "alias action only"),
        ({"action": Action.CANARY}, "name it (--deployment)"),
        ({"action": Action.CANARY, "deployment": "iris-prod", "canary_weight_percent": 100}, "between 1 and 99"),
        ({"action": Action.CANARY, "deployment": "iris-prod", "canary_weight_percent": -5}, "between 1 and 99"),
        ({"action": Action.CANARY, "deployment": "iris-prod", "canary_window_seconds": -1}, "canary_window_seconds"),
        ({"action": Action.CANARY, "deployment": "iris-prod", "canary_max_error_rate": 1.5}, "canary_max_error_rate"),
        ({"canary_weight_percent": 20}, "canary action only"),
        ({"cooldown_seconds": -1}, "cooldown_seconds"),
        ({"deployment": "Iris Prod"}, "invalid deployment name"),
    ],
)
async def test_bad_settings_are_invalid_arguments_with_what_to_change(world: World, fields, match: str) -> None:
    world.inference.deploy("iris-prod", "iris", 1)
    with pytest.raises(InvalidArgument, match=match.replace("(", r"\(").replace(")", r"\)")):
        await world.retrainer().set_policy(TENANT, policy(**fields))
    with pytest.raises(NotFound):
        await world.retrainer().get_policy(TENANT, "iris")


async def test_unknown_names_are_not_found(world: World) -> None:
    retrainer = world.retrainer()
    with pytest.raises(NotFound, match="model 'nope' not found"):
        await retrainer.set_policy(TENANT, policy(model="nope"))
    with pytest.raises(NotFound, match="no version 9"):
        await retrainer.set_policy(TENANT, policy(from_version=9))
    with pytest.raises(NotFound, match="dataset 'nope' not found"):
        await retrainer.set_policy(TENANT, policy(dataset="nope"))
    with pytest.raises(NotFound, match="deployment 'iris-prod' not found"):
        await retrainer.set_policy(TENANT, policy(action=Action.CANARY, deployment="iris-prod"))
    # Another tenant's model, dataset and deployment are not there for this one.
    world.inference.deploy("iris-prod", "iris", 1)
    with pytest.raises(NotFound):
        await retrainer.set_policy("tenant-b", policy())


async def test_versions_the_trainer_did_not_make_are_failed_preconditions(world: World) -> None:
    retrainer = world.retrainer()
    world.registry.add_version("uploaded", {"task": "classification"})
    with pytest.raises(FailedPrecondition, match="no version the trainer made.*maas train"):
        await retrainer.set_policy(TENANT, policy(model="uploaded"))
    uploaded = world.registry.add_version("iris", {"task": "classification"})
    with pytest.raises(FailedPrecondition, match=f"version {uploaded} has no {TRAINING_SPEC_KEY}.*--from-version"):
        await retrainer.set_policy(TENANT, policy(from_version=uploaded))
    gpt = world.registry.add_version("iris", {TRAINING_SPEC_KEY: '{"architecture": "gpt", "dataset": "shakespeare"}',
                                              "task": "language"})
    with pytest.raises(FailedPrecondition, match="gpt text model"):
        await retrainer.set_policy(TENANT, policy(from_version=gpt))


async def test_the_deployment_must_serve_the_model_and_a_canary_needs_a_pinned_version(world: World) -> None:
    retrainer = world.retrainer()
    world.registry.add_version("other")
    world.inference.deploy("other-prod", "other", 1)
    with pytest.raises(FailedPrecondition, match="serves model 'other', not 'iris'"):
        await retrainer.set_policy(TENANT, policy(deployment="other-prod"))
    world.inference.deploy("iris-prod", "iris", 1, alias="production")
    with pytest.raises(FailedPrecondition, match="follows alias 'production'.*--action alias --alias production"):
        await retrainer.set_policy(TENANT, policy(action=Action.CANARY, deployment="iris-prod"))
    # Following an alias is fine for the other actions.
    await retrainer.set_policy(TENANT, policy(action=Action.ALIAS, alias="production", deployment="iris-prod"))


async def test_replacing_a_policy_keeps_what_its_runs_saw_on_the_same_dataset(world: World) -> None:
    retrainer = world.retrainer()
    await retrainer.set_policy(TENANT, policy())
    world.registry.datasets[(TENANT, "iris-data")] = 2
    await retrainer.tick()
    first = only(world.store.runs(TENANT, "iris", 10))
    replaced = await retrainer.set_policy(TENANT, policy(min_gain=0.01))
    assert (replaced.min_gain, replaced.last_dataset_version, replaced.active_run) == (0.01, 2, first.id)
    world.registry.datasets[(TENANT, "iris-v2")] = 5
    moved = await retrainer.set_policy(TENANT, policy(dataset="iris-v2"))
    assert moved.last_dataset_version == 5


async def test_new_dataset_versions_start_runs_one_at_a_time(world: World) -> None:
    retrainer = world.retrainer()
    await retrainer.set_policy(TENANT, policy())
    await retrainer.tick()
    assert world.jobs.created == []  # version 1 is the one version 1 was trained on
    world.registry.datasets[(TENANT, "iris-data")] = 2
    await retrainer.tick()
    run = only(world.store.runs(TENANT, "iris", 10))
    assert (run.state, run.reason, run.dataset_version) == (RunState.TRAINING, "new dataset version 2", 2)
    tenant, spec, model, parent, job_id = only(world.jobs.created)
    assert (tenant, model, parent, job_id) == (TENANT, "iris", 1, run.job_id)
    # The spec that made version 1, on the policy's dataset at the run's version.
    assert spec == replace(SPEC, dataset="iris-data", builtin=False, dataset_version=2)
    assert events_of(world) == ["triggered", "training"]
    assert world.store.get_policy(TENANT, "iris").last_dataset_version == 2
    # Another version while the run goes on starts nothing, and neither does a manual trigger.
    world.registry.datasets[(TENANT, "iris-data")] = 3
    await retrainer.tick()
    assert len(world.jobs.created) == 1
    with pytest.raises(FailedPrecondition, match=f"run {run.id} .* is in progress"):
        await retrainer.trigger(TENANT, "iris")


async def test_cooldown_holds_automatic_runs_but_not_a_manual_one(world: World) -> None:
    retrainer = world.retrainer()
    await retrainer.set_policy(TENANT, policy(cooldown_seconds=300))
    world.registry.datasets[(TENANT, "iris-data")] = 2
    await retrainer.tick()
    first = only(world.store.runs(TENANT, "iris", 10))
    world.jobs.fail(first.job_id, "out of memory")
    await retrainer.tick()
    assert world.store.get_run(first.id).state is RunState.FAILED
    world.registry.datasets[(TENANT, "iris-data")] = 3
    world.clock.advance(299)
    await retrainer.tick()
    assert len(world.jobs.created) == 1  # cooling down
    world.clock.advance(1)
    await retrainer.tick()
    second = world.store.runs(TENANT, "iris", 10)[0]
    assert (len(world.jobs.created), second.dataset_version) == (2, 3)
    world.jobs.fail(second.job_id, "again")
    await retrainer.tick()
    manual = await retrainer.trigger(TENANT, "iris")  # at once, though it cools down
    assert (manual.reason, manual.state, manual.dataset_version) == ("manual", RunState.TRAINING, 3)


async def test_a_schedule_runs_every_interval_on_the_newest_dataset_version(world: World) -> None:
    retrainer = world.retrainer()
    await retrainer.set_policy(TENANT, policy(trigger=Trigger.SCHEDULE, interval_seconds=3600, cooldown_seconds=60))
    world.clock.advance(3599)
    await retrainer.tick()
    assert world.jobs.created == []
    world.clock.advance(1)
    await retrainer.tick()
    run = only(world.store.runs(TENANT, "iris", 10))
    assert (run.reason, run.dataset_version) == ("schedule", 1)
    world.jobs.fail(run.job_id, "no")
    world.clock.advance(1800)
    await retrainer.tick()
    assert len(world.jobs.created) == 1  # the next is an interval after this run started
    world.clock.advance(1800)
    await retrainer.tick()
    assert len(world.jobs.created) == 2


async def test_drift_reports_start_runs_past_the_threshold_of_the_deployments_policies(world: World) -> None:
    world.inference.deploy("iris-prod", "iris", 1)
    retrainer = world.retrainer()
    await retrainer.set_policy(TENANT, policy(trigger=Trigger.DRIFT, deployment="iris-prod", drift_threshold=0.25))
    assert await retrainer.report_drift(TENANT, "iris-prod", 0.24, "x[2]") == []
    assert await retrainer.report_drift(TENANT, "other", 0.9, "x[2]") == []
    assert await retrainer.report_drift("tenant-b", "iris-prod", 0.9, "x[2]") == []
    run = only(await retrainer.report_drift(TENANT, "iris-prod", 0.31, "x[4]"))
    assert (run.reason, run.state, run.dataset_version) == ("drift 0.31 on x[4]", RunState.TRAINING, 1)
    # Running, then cooling down: later reports start nothing.
    assert await retrainer.report_drift(TENANT, "iris-prod", 0.5, "outputs") == []
    world.jobs.fail(run.job_id, "no")
    await retrainer.tick()
    assert await retrainer.report_drift(TENANT, "iris-prod", 0.5, "outputs") == []
    world.clock.advance(DEFAULT_COOLDOWN_SECONDS)
    assert len(await retrainer.report_drift(TENANT, "iris-prod", 0.5, "outputs")) == 1
    # Other triggers ignore drift reports.
    await retrainer.set_policy(TENANT, policy())
    with pytest.raises(InvalidArgument, match="psi"):
        await retrainer.report_drift(TENANT, "iris-prod", -1.0, "")
    with pytest.raises(InvalidArgument, match="deployment name"):
        await retrainer.report_drift(TENANT, "", 1.0, "")


async def test_a_manual_trigger_needs_a_dataset_version(world: World) -> None:
    world.registry.datasets[(TENANT, "empty")] = 0
    retrainer = world.retrainer()
    await retrainer.set_policy(TENANT, policy(dataset="empty"))
    with pytest.raises(FailedPrecondition, match="has no versions yet: upload one first"):
        await retrainer.trigger(TENANT, "iris")
    with pytest.raises(NotFound, match="no retraining policy"):
        await retrainer.trigger(TENANT, "other")


async def test_a_run_whose_job_cannot_be_created_fails_and_frees_the_policy(world: World) -> None:
    retrainer = world.retrainer()
    await retrainer.set_policy(TENANT, policy())
    world.jobs.fail_next = InvalidArgument("the CSV header has no column 'species'")
    run = await retrainer.trigger(TENANT, "iris")
    assert run.state is RunState.FAILED and "no column 'species'" in run.message
    assert world.store.get_policy(TENANT, "iris").active_run == ""
    assert events_of(world) == ["triggered", "failed"]
    assert (await retrainer.trigger(TENANT, "iris")).state is RunState.TRAINING


async def test_deleting_a_policy_stops_its_run_and_forgets_its_history(world: World) -> None:
    retrainer = world.retrainer()
    await retrainer.set_policy(TENANT, policy())
    run = await retrainer.trigger(TENANT, "iris")
    await retrainer.delete_policy(TENANT, "iris")
    assert world.jobs.cancelled == [run.job_id]
    assert world.store.runs(TENANT, "iris", 10) == [] and events_of(world) == []
    with pytest.raises(NotFound, match="maas models retrain set iris"):
        await retrainer.get_policy(TENANT, "iris")
    with pytest.raises(NotFound):
        await retrainer.delete_policy(TENANT, "iris")


async def test_policies_are_the_tenants_own(world: World) -> None:
    retrainer = world.retrainer()
    await retrainer.set_policy(TENANT, policy())
    world.registry.add_version("iris", tenant="tenant-b")
    world.registry.datasets[("tenant-b", "iris-data")] = 4
    theirs = await retrainer.set_policy("tenant-b", policy(min_gain=0.5))
    assert theirs.last_dataset_version == 4
    ours, _, _ = await retrainer.get_policy(TENANT, "iris")
    assert ours.min_gain == 0.0
    await retrainer.delete_policy("tenant-b", "iris")
    assert (await retrainer.get_policy(TENANT, "iris"))[0] == ours
