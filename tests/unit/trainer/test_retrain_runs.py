"""Retraining runs in the domain, with stand-ins for the registry, the inference service, the jobs
and the evaluation: the gate (winner, loser, min_gain), each action, the canary's window and its
rollback, failures, and a trainer stopped at every step (a new Retrainer on the same database)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from services.common.errors import FailedPrecondition, Unavailable
from services.trainer.retrain import (
    ACCEPTED,
    COMPARISON_KEY,
    REJECTED,
    ROLLBACK_KEY,
    ROLLED_BACK,
    RUN_KEY,
    VERDICT_KEY,
    new_run_id,
)
from services.trainer.retrain_store import Action, Policy, RetrainEvent, Run, RunState, Trigger
from tests.unit.trainer.retrain_fakes import SPEC, TENANT, World, events_of, make_world, only


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


def policy(**fields) -> Policy:
    return Policy(**{"model": "iris", "trigger": Trigger.NEW_DATASET_VERSION, "dataset": "iris-data", **fields})


async def trained_run(world: World, **fields) -> tuple[Run, int]:
    """A policy, dataset version 2 uploaded, its run's job done: the candidate's number."""
    retrainer = world.retrainer()
    await retrainer.set_policy(TENANT, policy(**fields))
    world.registry.datasets[(TENANT, "iris-data")] = 2
    await retrainer.tick()
    run = only(world.store.runs(TENANT, "iris", 10))
    return run, world.jobs.finish(run.job_id)


def run_of(world: World, run: Run) -> Run:
    stored = world.store.get_run(run.id)
    assert stored is not None
    return stored


async def test_a_winner_is_labelled_and_registered(world: World) -> None:
    run, candidate = await trained_run(world)
    world.evaluator.metrics = {1: 0.913, candidate: 0.9565}
    await world.retrainer().tick()
    done = run_of(world, run)
    assert (done.state, done.candidate_version, done.serving_version) == (RunState.PROMOTED, 2, 1)
    assert (done.candidate_metric, done.serving_metric, done.samples, done.verdict) == (0.9565, 0.913, 23, ACCEPTED)
    assert done.comparison == "accuracy 0.9565 vs 0.9130 of version 1 on dataset iris-data v2 test split (n=23)"
    assert done.end_time == world.clock()
    metadata = world.registry.metadata("iris", candidate)
    assert (metadata[VERDICT_KEY], metadata[COMPARISON_KEY], metadata[RUN_KEY]) == (ACCEPTED, done.comparison, run.id)
    # Both were measured on the same split: the run's dataset version, with the spec that made version 1.
    request = only(world.evaluator.requests)
    assert (request.candidate_version, request.serving_version, request.dataset, request.dataset_version) == (
        2, 1, "iris-data", 2)
    assert (request.spec, request.metric) == (SPEC.to_dict(), "accuracy")
    assert events_of(world) == ["triggered", "training", "trained", "evaluated", "registered", "promoted"]
    assert world.store.get_policy(TENANT, "iris").active_run == ""


async def test_a_loser_is_labelled_rejected_and_changes_nothing_else(world: World) -> None:
    world.inference.deploy("iris-prod", "iris", 1)
    run, candidate = await trained_run(world, action=Action.CANARY, deployment="iris-prod")
    world.evaluator.metrics = {1: 0.93, candidate: 0.31}
    await world.retrainer().tick()
    done = run_of(world, run)
    assert (done.state, done.verdict, done.candidate_metric, done.serving_metric) == (
        RunState.REJECTED, REJECTED, 0.31, 0.93)
    assert world.registry.metadata("iris", candidate)[VERDICT_KEY] == REJECTED
    assert "accuracy 0.3100 vs 0.9300" in world.registry.metadata("iris", candidate)[COMPARISON_KEY]
    assert world.inference.calls == []  # no canary: the deployment serves version 1 as before
    assert world.inference.get("iris-prod").resolved_version == 1
    assert events_of(world)[-2:] == ["evaluated", "rejected"]
    assert "keeps serving" in done.message


async def test_min_gain_is_what_a_candidate_must_gain(world: World) -> None:
    run, candidate = await trained_run(world, min_gain=0.05)
    world.evaluator.metrics = {1: 0.90, candidate: 0.94}
    await world.retrainer().tick()
    assert run_of(world, run).state is RunState.REJECTED
    world.clock.advance(3600)
    world.registry.datasets[(TENANT, "iris-data")] = 3
    retrainer = world.retrainer()
    await retrainer.tick()
    second = world.store.runs(TENANT, "iris", 10)[0]
    third_version = world.jobs.finish(second.job_id)
    world.evaluator.metrics[third_version] = 0.95
    await retrainer.tick()
    done = run_of(world, second)
    # The rejected version 2 is not the one to beat: version 1 still is.
    assert (done.state, done.serving_version, done.serving_metric) == (RunState.PROMOTED, 1, 0.90)


async def test_the_alias_action_moves_the_alias_and_beats_what_it_names(world: World) -> None:
    world.registry.add_version("iris")  # version 2
    world.registry.aliases[(TENANT, "iris", "production")] = 1
    run, candidate = await trained_run(world, action=Action.ALIAS, alias="production")
    world.evaluator.metrics = {1: 0.9, 2: 0.99, candidate: 0.95}
    await world.retrainer().tick()
    done = run_of(world, run)
    assert (done.state, done.serving_version) == (RunState.PROMOTED, 1)
    assert world.registry.aliases[(TENANT, "iris", "production")] == candidate
    assert events_of(world)[-3:] == ["evaluated", "registered", "alias_moved"]


async def test_a_canary_is_promoted_once_it_held_its_window_from_ready(world: World) -> None:
    world.inference.deploy("iris-prod", "iris", 1)
    run, candidate = await trained_run(world, action=Action.CANARY, deployment="iris-prod",
                                       canary_weight_percent=25, canary_window_seconds=30, canary_max_error_rate=0.1)
    world.evaluator.metrics = {1: 0.9, candidate: 0.95}
    retrainer = world.retrainer()
    await retrainer.tick()
    assert run_of(world, run).state is RunState.ROLLING_OUT
    assert world.inference.calls == [("start_canary", "iris-prod", str(candidate), "25", "0.1")]
    world.clock.advance(120)
    await retrainer.tick()  # still loading: the window has not started
    assert run_of(world, run).canary_ready_time is None
    world.inference.set_canary_state("iris-prod", "READY")
    await retrainer.tick()
    assert run_of(world, run).canary_ready_time == world.clock()
    world.clock.advance(29)
    await retrainer.tick()
    assert run_of(world, run).state is RunState.ROLLING_OUT
    world.clock.advance(1)
    await retrainer.tick()
    done = run_of(world, run)
    assert done.state is RunState.PROMOTED
    assert world.inference.get("iris-prod").resolved_version == candidate
    assert events_of(world)[-4:] == ["evaluated", "registered", "canary_started", "promoted"]


async def test_a_canary_rolled_back_meanwhile_rejects_the_run_with_the_reason(world: World) -> None:
    world.inference.deploy("iris-prod", "iris", 1)
    run, candidate = await trained_run(world, action=Action.CANARY, deployment="iris-prod")
    world.evaluator.metrics = {1: 0.9, candidate: 0.95}
    retrainer = world.retrainer()
    await retrainer.tick()
    world.inference.set_canary_state("iris-prod", "READY")
    await retrainer.tick()
    world.inference.roll_back("iris-prod", "its live accuracy 0.61 fell below 0.90")
    world.clock.advance(3600)
    await retrainer.tick()
    done = run_of(world, run)
    assert done.state is RunState.REJECTED and "live accuracy 0.61" in done.message
    assert ("promote_canary", "iris-prod") not in world.inference.calls
    metadata = world.registry.metadata("iris", candidate)
    assert metadata[VERDICT_KEY] == ROLLED_BACK and "live accuracy" in metadata[ROLLBACK_KEY]
    assert world.inference.get("iris-prod").resolved_version == 1
    assert events_of(world)[-1] == "rolled_back"


async def test_a_canary_that_cannot_load_is_rolled_back_and_fails_the_run(world: World) -> None:
    world.inference.deploy("iris-prod", "iris", 1)
    run, candidate = await trained_run(world, action=Action.CANARY, deployment="iris-prod")
    world.evaluator.metrics = {1: 0.9, candidate: 0.95}
    retrainer = world.retrainer()
    await retrainer.tick()
    world.inference.set_canary_state("iris-prod", "FAILED", "no node has room")
    await retrainer.tick()
    done = run_of(world, run)
    assert done.state is RunState.FAILED and "could not load: no node has room" in done.message
    assert world.inference.calls[-1] == ("rollback_canary", "iris-prod")


async def test_a_failed_job_fails_the_run_with_its_reason(world: World) -> None:
    retrainer = world.retrainer()
    await retrainer.set_policy(TENANT, policy())
    run = await retrainer.trigger(TENANT, "iris")
    await retrainer.tick()
    assert run_of(world, run).state is RunState.TRAINING  # queued: nothing to do yet
    world.jobs.fail(run.job_id, "the worker exited with code 1: CUDA out of memory")
    await retrainer.tick()
    done = run_of(world, run)
    assert done.state is RunState.FAILED and "CUDA out of memory" in done.message
    assert world.evaluator.requests == []


async def test_an_evaluation_that_fails_fails_the_run_and_a_passing_outage_is_waited_out(world: World) -> None:
    world.inference.deploy("iris-prod", "iris", 1)
    run, candidate = await trained_run(world, action=Action.CANARY, deployment="iris-prod")
    world.evaluator.metrics = {1: 0.9, candidate: 0.95}
    world.evaluator.fail_next = Unavailable("registry is restarting")
    retrainer = world.retrainer()
    await retrainer.tick()
    assert run_of(world, run).state is RunState.EVALUATING
    world.evaluator.fail_next = FailedPrecondition("iris version 1 is ONNX: the evaluation gate measures TorchScript")
    await retrainer.tick()
    done = run_of(world, run)
    assert done.state is RunState.FAILED and "is ONNX" in done.message
    assert world.inference.calls == [] and VERDICT_KEY not in world.registry.metadata("iris", candidate)


async def test_without_another_version_the_candidate_is_accepted_alone(world: World) -> None:
    # Version 1 was rejected by an earlier run: nothing is left to beat.
    await world.registry.update_version_metadata(TENANT, "iris", 1, {VERDICT_KEY: REJECTED})
    run, candidate = await trained_run(world)
    world.evaluator.metrics = {candidate: 0.8}
    await world.retrainer().tick()
    done = run_of(world, run)
    assert (done.state, done.serving_version, done.serving_metric) == (RunState.PROMOTED, 0, None)
    assert done.comparison.endswith("no other version to compare with")


async def test_the_deployment_gone_fails_the_run(world: World) -> None:
    world.inference.deploy("iris-prod", "iris", 1)
    run, candidate = await trained_run(world, action=Action.CANARY, deployment="iris-prod")
    del world.inference.deployments[(TENANT, "iris-prod")]
    await world.retrainer().tick()
    done = run_of(world, run)
    assert done.state is RunState.FAILED and "deployment 'iris-prod' not found" in done.message


# A trainer stopped at each step: a new Retrainer on the same database carries the run on.


async def test_a_run_claimed_before_its_job_was_created_gets_its_job_after_a_restart(world: World) -> None:
    stored = await world.retrainer().set_policy(TENANT, policy())
    run = Run(id=new_run_id(), tenant=TENANT, model="iris", state=RunState.TRAINING, reason="manual",
              dataset_version=1, job_id="job-0000000000aa12345678", policy=stored.to_dict(),
              create_time=world.clock())
    assert world.store.start_run(run, RetrainEvent(run.id, world.clock(), "triggered", "manual"))
    await world.retrainer().tick()
    assert only(world.jobs.created)[4] == "job-0000000000aa12345678"
    await world.retrainer().tick()
    assert len(world.jobs.created) == 1  # found the second time, not created again


async def test_a_trainer_killed_mid_evaluation_evaluates_again_from_scratch(world: World) -> None:
    world.inference.deploy("iris-prod", "iris", 1)
    run, candidate = await trained_run(world, action=Action.CANARY, deployment="iris-prod")
    world.evaluator.metrics = {1: 0.9, candidate: 0.95}
    world.evaluator.hold = asyncio.Event()
    killed = asyncio.create_task(world.retrainer().tick())
    while not world.evaluator.requests:
        await asyncio.sleep(0.01)
    killed.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await killed
    stopped = run_of(world, run)
    assert (stopped.state, stopped.verdict, stopped.candidate_metric) == (RunState.EVALUATING, "", None)
    assert world.inference.calls == []  # never rolled out half-evaluated
    world.evaluator.hold = None
    await world.retrainer().tick()
    assert len(world.evaluator.requests) == 2
    assert run_of(world, run).state is RunState.ROLLING_OUT


async def test_a_trainer_killed_after_the_evaluation_was_stored_carries_out_its_verdict(world: World) -> None:
    world.inference.deploy("iris-prod", "iris", 1)
    run, candidate = await trained_run(world, action=Action.CANARY, deployment="iris-prod")
    world.evaluator.metrics = {1: 0.9, candidate: 0.95}
    # Killed as it labelled the candidate: the evaluation is stored, nothing acted on yet.
    world.registry.fail_next["update_version_metadata"] = Unavailable("killed")
    await world.retrainer().tick()
    stopped = run_of(world, run)
    assert (stopped.state, stopped.verdict, stopped.candidate_metric) == (RunState.EVALUATING, ACCEPTED, 0.95)
    await world.retrainer().tick()
    assert len(world.evaluator.requests) == 1  # not measured again
    assert run_of(world, run).state is RunState.ROLLING_OUT
    assert world.registry.metadata("iris", candidate)[VERDICT_KEY] == ACCEPTED


async def test_a_canary_started_twice_after_a_restart_holds(world: World) -> None:
    world.inference.deploy("iris-prod", "iris", 1)
    run, candidate = await trained_run(world, action=Action.CANARY, deployment="iris-prod")
    world.evaluator.metrics = {1: 0.9, candidate: 0.95}
    # The canary started, then the trainer died before it stored ROLLING_OUT.
    await world.inference.start_canary(TENANT, "iris-prod", candidate, 10, 0.05)
    world.inference.set_canary_state("iris-prod", "READY")
    world.registry.fail_next["update_version_metadata"] = Unavailable("killed")
    await world.retrainer().tick()
    await world.retrainer().tick()
    assert run_of(world, run).state is RunState.ROLLING_OUT
    assert world.inference.get("iris-prod").canary_version == candidate


async def test_a_rolling_out_run_keeps_its_window_across_a_restart(world: World) -> None:
    world.inference.deploy("iris-prod", "iris", 1)
    run, candidate = await trained_run(world, action=Action.CANARY, deployment="iris-prod", canary_window_seconds=60)
    world.evaluator.metrics = {1: 0.9, candidate: 0.95}
    await world.retrainer().tick()
    world.inference.set_canary_state("iris-prod", "READY")
    await world.retrainer().tick()
    ready = run_of(world, run).canary_ready_time
    world.clock.advance(45)
    await world.retrainer().tick()  # a restarted trainer: the window still counts from `ready`
    assert run_of(world, run).canary_ready_time == ready
    assert run_of(world, run).state is RunState.ROLLING_OUT
    world.clock.advance(15)
    await world.retrainer().tick()
    assert run_of(world, run).state is RunState.PROMOTED


async def test_deleting_a_policy_mid_canary_rolls_the_canary_back(world: World) -> None:
    world.inference.deploy("iris-prod", "iris", 1)
    run, candidate = await trained_run(world, action=Action.CANARY, deployment="iris-prod")
    world.evaluator.metrics = {1: 0.9, candidate: 0.95}
    retrainer = world.retrainer()
    await retrainer.tick()
    assert world.inference.get("iris-prod").canary_version == candidate
    await retrainer.delete_policy(TENANT, "iris")
    assert world.inference.get("iris-prod").canary_version == 0
    assert world.inference.get("iris-prod").resolved_version == 1
    assert world.store.get_run(run.id) is None
