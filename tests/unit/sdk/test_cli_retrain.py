"""`maas models retrain set|status|now|delete` and the Client methods behind them, against a fake
TrainerService where the gateway would be: what each command sends, whole ids at 80 columns,
--json, and refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from maas.cli import _shared, app
from maas.client import Client
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from typer.testing import CliRunner, Result

# Runs and jobs a moment apart: their first characters are the same, so a cut id names neither.
RUNS = ("run-0197a2b4c5d6e7f8a9b0", "run-0197a2b4c5d6e7f80c1d")
JOBS = ("job-0197a2b4c5d6e7f8aa11", "job-0197a2b4c5d6e7f8bb22")
LONG_TEXT = "accuracy 0.9565 vs 0.9130 of version 1 on dataset iris-data v2 test split (n=23), long enough to wrap"


class FakeTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self) -> None:
        self.requests: list[object] = []

    def SetRetrainPolicy(self, request, context):
        self.requests.append(request)
        policy = trainer_pb2.RetrainPolicy()
        policy.CopyFrom(request.policy)
        policy.from_version = policy.from_version or 1
        policy.metric = policy.metric or "accuracy"
        policy.cooldown_seconds = policy.cooldown_seconds or 600
        return trainer_pb2.SetRetrainPolicyResponse(policy=policy)

    def GetRetrainPolicy(self, request, context):
        self.requests.append(request)
        if request.model != "iris":
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} has no retraining policy")
        policy = trainer_pb2.RetrainPolicy(
            model="iris", trigger=trainer_pb2.RETRAIN_TRIGGER_NEW_DATASET_VERSION, dataset="iris-data",
            from_version=1, metric="accuracy", action=trainer_pb2.RETRAIN_ACTION_CANARY, deployment="iris-prod",
            canary_weight_percent=10, canary_window_seconds=5, canary_max_error_rate=0.05, cooldown_seconds=600,
            last_dataset_version=3,
        )
        runs = [
            trainer_pb2.RetrainRun(id=RUNS[1], state=trainer_pb2.RETRAIN_RUN_STATE_REJECTED, reason="new dataset version 3",
                                   dataset_version=3, job_id=JOBS[1], candidate_version=3, serving_version=2,
                                   candidate_metric=0.31, serving_metric=0.9565, message=LONG_TEXT),
            trainer_pb2.RetrainRun(id=RUNS[0], state=trainer_pb2.RETRAIN_RUN_STATE_PROMOTED, reason="new dataset version 2",
                                   dataset_version=2, job_id=JOBS[0], candidate_version=2, serving_version=1,
                                   candidate_metric=0.9565, serving_metric=0.913, message=LONG_TEXT),
        ]
        events = [trainer_pb2.RetrainEvent(run_id=RUNS[0], time=Timestamp(seconds=1_760_000_000), step="canary_started",
                                           message=LONG_TEXT)]
        return trainer_pb2.GetRetrainPolicyResponse(policy=policy, runs=runs, events=events)

    def TriggerRetrain(self, request, context):
        self.requests.append(request)
        if request.model == "busy":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"run {RUNS[0]} of busy's policy is in progress")
        return trainer_pb2.TriggerRetrainResponse(run=trainer_pb2.RetrainRun(
            id=RUNS[0], state=trainer_pb2.RETRAIN_RUN_STATE_TRAINING, reason="manual", dataset_version=2,
            job_id=JOBS[0]))

    def DeleteRetrainPolicy(self, request, context):
        self.requests.append(request)
        return trainer_pb2.DeleteRetrainPolicyResponse()


@pytest.fixture
def trainer() -> FakeTrainer:
    return FakeTrainer()


@pytest.fixture
def address(monkeypatch: pytest.MonkeyPatch, trainer: FakeTrainer) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(trainer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setattr(_shared.console, "_width", 80)
    monkeypatch.setattr(_shared.errors, "_width", 80)
    monkeypatch.setattr(_shared, "tls_ca", None)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def maas(address: str, *args: str, code: int = 0) -> Result:
    env = {"MAAS_API_KEY": "maas_test", "MAAS_GATEWAY_ADDR": address}
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == code, result.output
    return result


def test_set_sends_the_policy_and_describes_what_was_stored(address: str, trainer: FakeTrainer) -> None:
    result = maas(address, "models", "retrain", "set", "iris", "--on", "new-dataset-version", "--dataset",
                  "iris-data", "--action", "canary", "--deployment", "iris-prod", "--canary-weight", "20",
                  "--canary-window", "5", "--min-gain", "0.01", "--cooldown", "1")
    sent = trainer.requests[-1].policy
    assert (sent.model, sent.trigger, sent.dataset, sent.action, sent.deployment) == (
        "iris", trainer_pb2.RETRAIN_TRIGGER_NEW_DATASET_VERSION, "iris-data", trainer_pb2.RETRAIN_ACTION_CANARY,
        "iris-prod")
    assert (sent.canary_weight_percent, sent.canary_window_seconds, sent.min_gain, sent.cooldown_seconds) == (
        20, 5, 0.01, 1)
    assert "retraining policy of iris set" in result.output
    assert "20% canary on iris-prod" in result.output and "spec of version 1" in result.output
    as_json = json.loads(maas(address, "models", "retrain", "set", "iris", "--on", "schedule", "--interval", "3600",
                              "--dataset", "iris-data", "--json").output)
    assert (as_json["trigger"], as_json["intervalSeconds"]) == ("RETRAIN_TRIGGER_SCHEDULE", "3600")


def test_retrain_model_sets_a_policy_as_the_issue_spells_it(address: str, trainer: FakeTrainer) -> None:
    maas(address, "models", "retrain", "iris", "--on", "drift", "--dataset", "iris-data", "--from-version", "1",
         "--deployment", "iris-prod", "--drift-threshold", "0.3")
    sent = trainer.requests[-1].policy
    assert (sent.model, sent.trigger, sent.from_version, sent.drift_threshold) == (
        "iris", trainer_pb2.RETRAIN_TRIGGER_DRIFT, 1, 0.3)


def test_set_refuses_unknown_triggers_and_actions_before_calling(address: str, trainer: FakeTrainer) -> None:
    bad_trigger = maas(address, "models", "retrain", "set", "iris", "--on", "weekly", "--dataset", "d", code=2)
    assert "--on must be one of new-dataset-version, schedule, drift" in bad_trigger.output
    maas(address, "models", "retrain", "set", "iris", "--on", "drift", "--dataset", "d", "--action", "x", code=2)
    assert trainer.requests == []


def test_status_shows_whole_run_and_job_ids_at_80_columns(address: str) -> None:
    output = maas(address, "models", "retrain", "status", "iris").output
    for identifier in (*RUNS, *JOBS):
        assert identifier in output
    assert "v3 0.3100 vs" in output and "v2 0.9565 vs" in output and "v1 0.9130" in output
    assert "PROMOTED" in output and "REJECTED" in output and "canary_started" in output
    status = json.loads(maas(address, "models", "retrain", "status", "iris", "--json").output)
    assert [run["id"] for run in status["runs"]] == [RUNS[1], RUNS[0]]
    missing = maas(address, "models", "retrain", "status", "other", code=1)
    assert "NOT_FOUND" in missing.output and "no retraining policy" in missing.output


def test_now_and_delete(address: str, trainer: FakeTrainer) -> None:
    started = maas(address, "models", "retrain", "now", "iris").output
    assert RUNS[0] in started and JOBS[0] in started
    busy = maas(address, "models", "retrain", "now", "busy", code=1)
    assert "FAILED_PRECONDITION" in busy.output
    assert "deleted the retraining policy of iris" in maas(address, "models", "retrain", "delete", "iris").output
    assert trainer.requests[-1] == trainer_pb2.DeleteRetrainPolicyRequest(model="iris")


def test_the_client_names_triggers_and_actions(address: str, trainer: FakeTrainer) -> None:
    with Client(address, "maas_test") as client:
        policy = client.set_retrain_policy("iris", on="drift", dataset="iris-data", deployment="iris-prod",
                                           drift_threshold=0.3, action="alias", alias="production")
        assert (policy.trigger, policy.action, policy.alias) == (
            trainer_pb2.RETRAIN_TRIGGER_DRIFT, trainer_pb2.RETRAIN_ACTION_ALIAS, "production")
        with pytest.raises(ValueError, match="on must be one of"):
            client.set_retrain_policy("iris", on="hourly", dataset="iris-data")
        with pytest.raises(ValueError, match="action must be one of"):
            client.set_retrain_policy("iris", on="drift", dataset="iris-data", action="promote")
        assert client.trigger_retrain("iris").job_id == JOBS[0]
        assert len(client.get_retrain_policy("iris").runs) == 2
        client.delete_retrain_policy("iris")
