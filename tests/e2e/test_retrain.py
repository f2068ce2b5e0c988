"""The retraining loop end to end through the gateway, on real data (digits as CSV) and a real
Triton: dataset version 1 trains version 1, which serves; a policy watches the dataset; version 2
(more samples) trains version 2, which is measured against version 1 on the same held-out split,
wins, canaries and is promoted; a deliberately worse version 3 (its training rows' labels
scrambled) trains a version that loses, is labelled rejected, and version 2 keeps serving."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from maas import Client
from maas.trainer.v1 import trainer_pb2
from sklearn.datasets import load_digits

from services.common.summaries import BASELINE_KEY, Summary
from services.gateway.retrain_audit import METHOD as RETRAIN_METHOD
from services.gateway.retrain_audit import RETRAINER
from services.trainer import data as datasets
from services.trainer.retrain import COMPARISON_KEY, VERDICT_KEY

pytestmark = pytest.mark.slow
DEPLOYMENT = "digits-retrained"
TERMINAL = (trainer_pb2.RETRAIN_RUN_STATE_PROMOTED, trainer_pb2.RETRAIN_RUN_STATE_REJECTED,
            trainer_pb2.RETRAIN_RUN_STATE_FAILED)


def write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    header = ",".join([f"p{i}" for i in range(64)] + ["digit"])
    rows = [",".join([*(str(int(v)) for v in row), str(int(t))]) for row, t in zip(x, y, strict=True)]
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[int, Path]:
    """Dataset versions 1 (200 rows), 2 (all 1797) and 3 (version 2 with the labels of the rows
    training learns from scrambled: their features permuted among them, which keeps every row's
    label and so the split; the test rows stay intact)."""
    folder = tmp_path_factory.mktemp("retrain-data")
    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target
    train, val, _ = datasets.split(datasets.Arrays(x, y.astype(np.int64), "classification", 10), 0.15, 0.15, 0, 0)
    kept = np.concatenate([train, val])
    scrambled = x.copy()
    scrambled[kept] = x[np.random.default_rng(1).permutation(kept)]
    return {1: write_csv(folder / "v1.csv", x[:200], y[:200]), 2: write_csv(folder / "v2.csv", x, y),
            3: write_csv(folder / "v3.csv", scrambled, y)}


@pytest.fixture(scope="module")
def tenant(stack):
    """Tenant `retrain` and a developer key of it."""
    with Client(stack.gateway, stack.admin_key) as admin:
        admin.create_tenant("retrain")
        key = admin.create_api_key("retrain", "developer")[1]
    with Client(stack.gateway, key) as client:
        yield client, key


def finished_run(client: Client, dataset_version: int, timeout: float = 300) -> trainer_pb2.RetrainRun:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get_retrain_policy("digits")
        runs = [run for run in status.runs if run.dataset_version == dataset_version]
        if runs and runs[0].state in TERMINAL:
            return runs[0]
        assert time.monotonic() < deadline, f"the run on dataset version {dataset_version} did not end: {status}"
        time.sleep(0.5)


def test_new_data_retrains_evaluates_and_rolls_out_only_a_winner(stack, tenant, data, tmp_path) -> None:
    client, key = tenant
    env = {**stack.env, "MAAS_API_KEY": key}
    client.upload_dataset_version("digits-data", data[1], format="csv", target_column="digit")
    job = client.train("digits", "mlp", "digits-data", epochs=3, hidden_sizes=[64], device="cpu")
    job = client.wait_job(job.id, timeout=300)
    assert job.state == trainer_pb2.JOB_STATE_SUCCEEDED, job.message
    first = client.get_version("digits", 1)
    # Trained here, so it carries the baseline of its training split for the drift monitor.
    baseline = Summary.from_json(first.metadata[BASELINE_KEY])
    assert baseline.samples == 140 and len(baseline.features) == 64 and sum(baseline.classes or []) == 140
    client.create_deployment(DEPLOYMENT, "digits", version=1)
    client.wait_ready(DEPLOYMENT, timeout=180)

    stack.maas("models", "retrain", "set", "digits", "--on", "new-dataset-version", "--dataset", "digits-data",
               "--action", "canary", "--deployment", DEPLOYMENT, "--canary-window", "5", "--cooldown", "1", env=env)
    policy = client.get_retrain_policy("digits").policy
    assert (policy.from_version, policy.metric, policy.last_dataset_version) == (1, "accuracy", 1)

    # More samples: version 2 beats version 1 on the same split, canaries and is promoted.
    client.upload_dataset_version("digits-data", data[2])
    won = finished_run(client, 2)
    assert won.state == trainer_pb2.RETRAIN_RUN_STATE_PROMOTED, won
    assert (won.candidate_version, won.serving_version) == (2, 1)
    assert won.candidate_metric > won.serving_metric
    second = client.get_version("digits", 2)
    # The gate measured version 2 on the test split its own job measured: the same figure.
    assert won.candidate_metric == pytest.approx(second.metrics["test_accuracy"], abs=1e-6)
    assert second.metadata[VERDICT_KEY] == "accepted"
    assert f"accuracy {won.candidate_metric:.4f} vs {won.serving_metric:.4f} of version 1 on dataset digits-data " \
           f"v2 test split (n=269)" == second.metadata[COMPARISON_KEY]
    deployment = client.get_deployment(DEPLOYMENT)
    assert deployment.resolved_version == 2 and not deployment.HasField("canary")
    # It is version 2's model that answers now.
    x = np.asarray(load_digits().data[:8], dtype=np.float32)
    client.download_version("digits", 2, tmp_path / "v2.pt")
    with torch.inference_mode():
        expected = torch.jit.load(str(tmp_path / "v2.pt"))(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(client.predict(DEPLOYMENT, {"x": x})["logits"], expected, rtol=1e-4, atol=1e-4)

    # A worse dataset: its candidate loses; labelled rejected, version 2 keeps serving.
    time.sleep(1.0)  # the cooldown
    client.upload_dataset_version("digits-data", data[3])
    lost = finished_run(client, 3)
    assert lost.state == trainer_pb2.RETRAIN_RUN_STATE_REJECTED, lost
    assert (lost.candidate_version, lost.serving_version) == (3, 2)
    assert lost.candidate_metric < lost.serving_metric
    assert client.get_version("digits", 3).metadata[VERDICT_KEY] == "rejected"
    deployment = client.get_deployment(DEPLOYMENT)
    assert deployment.resolved_version == 2 and not deployment.HasField("canary")

    status = client.get_retrain_policy("digits")
    steps = {run.id: [e.step for e in status.events if e.run_id == run.id] for run in status.runs}
    assert steps[won.id] == ["triggered", "training", "trained", "evaluated", "registered", "canary_started",
                             "promoted"]
    assert steps[lost.id] == ["triggered", "training", "trained", "evaluated", "rejected"]
    shown = stack.maas("models", "retrain", "status", "digits", env=env).stdout
    assert won.id in shown and lost.id in shown and won.job_id in shown and "REJECTED" in shown
    as_json = json.loads(stack.maas("models", "retrain", "status", "digits", "--json", env=env).stdout)
    assert [run["state"] for run in as_json["runs"]] == ["RETRAIN_RUN_STATE_REJECTED", "RETRAIN_RUN_STATE_PROMOTED"]
    # Each run's job is an ordinary job of the tenant's.
    assert {won.job_id, lost.job_id} <= {job.id for job in client.list_jobs()}
    # Every step is in the tenant's audit log too, within a few seconds.
    with Client(stack.gateway, stack.admin_key) as admin:
        audited = audited_steps(admin, steps)
    assert audited == {run_id: [(step, RETRAINER, "OK") for step in run_steps] for run_id, run_steps in steps.items()}
    stack.maas("models", "retrain", "delete", "digits", env=env)


def audited_steps(admin: Client, steps: dict[str, list[str]], timeout: float = 30) -> dict[str, list[tuple[str, ...]]]:
    """Each run's steps in the tenant's audit log, oldest first, once every step is there (or the
    timeout passed): (step, key id, code) per row, its resource being "digits: STEP (RUN) ..."."""
    deadline = time.monotonic() + timeout
    while True:
        events = admin.list_audit_events(tenant="retrain", method=RETRAIN_METHOD, limit=1000)[::-1]
        audited = {run_id: [(e.resource.split(" ")[1], e.api_key_id, e.code) for e in events
                            if e.resource.startswith("digits: ") and f" ({run_id}) " in e.resource]
                   for run_id in steps}
        if time.monotonic() > deadline or all(len(audited[r]) >= len(s) for r, s in steps.items()):
            return audited
        time.sleep(0.5)
