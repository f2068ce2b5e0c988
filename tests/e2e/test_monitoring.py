"""Prediction monitoring on the whole stack (two gateway workers): the digits MLP uploaded with a
baseline over its training split, served to in-distribution traffic (its test split) and to
shifted traffic (the same inputs times 3), every call logged. Drift is low for the first and
crosses the threshold for the second; the true labels sent as feedback give a live accuracy
within 2 points of the version's test accuracy; `maas deploy drift` and `maas deploy logs` show
them; the leader's gauges reach the gateway's /metrics."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pytest
from maas import Client
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_digits

from services.common import summaries
from tests.support.digits import SIGNATURE, DigitsModel

pytestmark = pytest.mark.slow

T = TypeVar("T")
TENANT = "monitoring"
# How long calls logged by either gateway worker may take to be written (MAAS_MONITOR_FLUSH_SECONDS
# is 1), and the drift monitor's rounds to reach /metrics (MAAS_MONITOR_INTERVAL_SECONDS).
SETTLE_SECONDS = 30.0


def training_split() -> tuple[np.ndarray, np.ndarray]:
    """The split tests.support.digits trains the MLP on."""
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    train = np.random.default_rng(0).permutation(len(x))[:1400]
    return x[train], data.target[train]


def eventually(read: Callable[[], T], done: Callable[[T], bool], timeout: float = SETTLE_SECONDS) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


@pytest.fixture(scope="module")
def client(stack, digits: DigitsModel):
    """Tenant "monitoring": the digits MLP with its baseline, deployed twice ("watched" and
    "shifted"), every call of both logged, payloads kept for "watched"."""
    admin = Client(stack.gateway, stack.admin_key)
    admin.create_tenant(TENANT)
    _, key = admin.create_api_key(TENANT, "developer")
    admin.close()
    client = Client(stack.gateway, key)
    train_x, train_y = training_split()
    baseline = summaries.baseline({"x": train_x}, train_y, classes=10)
    client.create_model("digits")
    client.upload_version(
        "digits", digits.path, format="torchscript", signature=SIGNATURE,
        metrics={"test_accuracy": digits.accuracy},
        metadata={summaries.BASELINE_KEY: baseline.to_json(), "task": "classification"},
    )
    for name in ("watched", "shifted"):
        client.create_deployment(name, "digits", version=1, max_batch_size=8)
    for name in ("watched", "shifted"):
        client.wait_ready(name, timeout=180)
    client.set_prediction_logging("watched", 1.0, keep_payloads=True)
    client.set_prediction_logging("shifted", 1.0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def served(client: Client, digits: DigitsModel) -> dict[str, int]:
    """Every test row served one call at a time to both deployments (scaled by 3 to "shifted"),
    and the true labels of "watched" sent back; returns its request ids and labels."""
    labels = {}
    for index, (row, label) in enumerate(zip(digits.test_x, digits.test_y, strict=True)):
        client.predict("watched", {"x": row[None]}, request_id=f"in-{index}")
        client.predict("shifted", {"x": row[None] * 3})
        labels[f"in-{index}"] = int(label)
    # Calls answered by the other worker reach SQL within its flush interval: send until all match.
    unmatched = eventually(
        lambda: list(client.feedback("watched", {i: float(labels[i]) for i in labels}).unmatched_request_ids),
        lambda missing: not missing,
    )
    assert unmatched == []
    return labels


def settled_drift(client: Client, deployment: str, samples: int):
    return eventually(lambda: client.drift(deployment), lambda drift: drift.samples >= samples)


def test_in_distribution_traffic_has_low_psi_and_live_accuracy_near_the_test_split(client, served, digits):
    drift = settled_drift(client, "watched", len(served))
    assert drift.samples == len(served) and drift.has_baseline and drift.version == 1
    assert not drift.drifted and drift.threshold == 0.2
    assert max(f.psi for f in drift.features) < 0.2 and drift.output_psi < 0.2
    assert len(drift.classes) == 10 and sum(c.window_share for c in drift.classes) == pytest.approx(1.0)
    assert drift.live.metric == "accuracy" and drift.live.labelled == len(served)
    assert drift.live.test_value == pytest.approx(digits.accuracy)
    assert abs(drift.live.value - drift.live.test_value) <= 0.02


def test_shifted_traffic_crosses_the_alert_threshold(client, served, digits):
    drift = settled_drift(client, "shifted", len(served))
    assert drift.drifted and drift.features[0].psi >= 0.2
    assert [f.psi for f in drift.features] == sorted((f.psi for f in drift.features), reverse=True)
    assert drift.live.labelled == 0  # no feedback sent for it


def test_the_cli_shows_drift_worst_first_and_the_logged_samples(stack, client, served):
    env = {**stack.env, "MAAS_API_KEY": dict(client._metadata)["authorization"].removeprefix("Bearer "),
           "COLUMNS": "120"}
    shifted = stack.maas("deploy", "drift", "shifted", env=env).stdout.splitlines()
    assert shifted[0].startswith(f"shifted v1: {len(served)} predictions logged from ")
    assert shifted[1].startswith("DRIFTED: x[") and ">= 0.2" in shifted[1]
    psi = [float(line.split()[1]) for line in shifted if line.startswith("x[")]
    assert len(psi) == 10 and psi == sorted(psi, reverse=True) and psi[0] >= 0.2
    watched = stack.maas("deploy", "drift", "watched", env=env).stdout
    assert "\nno drift: worst PSI " in watched and "predicted class shares" in watched
    assert "live accuracy: 0.9" in watched and f"on {len(served)} labelled predictions (test split: 0.9" in watched
    logs = stack.maas("deploy", "logs", "watched", "--limit", "5", env=env).stdout.splitlines()
    assert len(logs) == 7 and all(line.split()[2].startswith("in-") for line in logs[2:])
    samples = json.loads(stack.maas("deploy", "logs", "watched", "--json", env=env).stdout)
    assert len(samples) == 20
    newest = samples[0]
    assert newest["requestId"] in served and newest["label"] == served[newest["requestId"]]
    assert len(json.loads(newest["inputsJson"])["x"][0]) == 64 and len(json.loads(newest["outputsJson"])["logits"][0]) == 10


def test_the_drift_and_live_accuracy_gauges_reach_the_gateways_metrics(stack, served, digits):
    def gauges() -> dict[tuple[str, str], float]:
        text = urllib.request.urlopen(f"http://{stack.env['MAAS_GATEWAY_METRICS_ADDR']}/metrics", timeout=10).read()
        found = {}
        for family in text_string_to_metric_families(text.decode()):
            if family.name in ("maas_model_drift_psi", "maas_model_live_accuracy"):
                for sample in family.samples:
                    if sample.labels.get("tenant") == TENANT:
                        key = (sample.labels["deployment"], sample.labels.get("feature", "accuracy"))
                        found[key] = max(found.get(key, 0.0), sample.value)
        return found

    found = eventually(gauges, lambda g: ("watched", "accuracy") in g and any(
        d == "shifted" and v >= 0.2 for (d, _), v in g.items()
    ))
    assert max(v for (d, _), v in found.items() if d == "shifted") >= 0.2
    assert ("shifted", "outputs") in found and ("watched", "outputs") in found
    assert max(v for (d, f), v in found.items() if d == "watched" and f != "accuracy") < 0.2
    assert abs(found[("watched", "accuracy")] - digits.accuracy) <= 0.02
