"""`maas deploy monitor|logs|drift` and `maas feedback` (and the Client methods under them)
through the real gateway, in front of the fakes of test_monitoring_rpc."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from maas.cli import app
from maas.client import Client
from typer.testing import CliRunner, Result

from tests.unit.gateway.gateway_fakes import Stack
from tests.unit.gateway.test_monitoring_rpc import predict
from tests.unit.gateway.test_monitoring_rpc import stack as stack  # noqa: F401 - the fixture


async def maas(stack: Stack, who: str, *args: str) -> Result:
    """The CLI as a user runs it, in a thread so that the gateway keeps serving meanwhile."""
    env = {"MAAS_API_KEY": stack.keys[who], "MAAS_GATEWAY_ADDR": f"127.0.0.1:{stack.port}", "COLUMNS": "120"}
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


def unboxed(output: str) -> str:
    """A usage error's text without the box and line breaks rich draws around it."""
    return " ".join(output.replace("│", " ").split())


async def serve_logged(stack: Stack, shifted: bool = False) -> dict[str, int]:
    """Turn logging on for "mlp", serve a few calls; returns request id -> predicted class."""
    result = await maas(stack, "developer", "deploy", "monitor", "mlp", "--sample-rate", "1", "--keep-payloads")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("mlp: logging 1 of predictions (payloads kept up to 67108864 bytes a day), kept 7 days")
    rng = np.random.default_rng(5)
    served = {}
    for index in range(30):
        x = rng.random((1, 4)) * (3 if shifted else 1)
        served[f"req-{index}"] = int(x.argmax())
        await predict(stack, "mlp", x, f"req-{index}")
    return served


async def test_logs_show_the_newest_samples_and_their_json(stack, tmp_path):
    await serve_logged(stack)
    result = await maas(stack, "reader", "deploy", "logs", "mlp", "--limit", "3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "request id" in lines[0] and "inputs" in lines[0]
    assert [line.split()[2] for line in lines[2:]] == ["req-29", "req-28", "req-27"]
    result = await maas(stack, "reader", "deploy", "logs", "mlp", "--json")
    samples = json.loads(result.stdout)
    assert len(samples) == 20 and samples[0]["requestId"] == "req-29" and samples[0]["version"] == "1"
    assert json.loads(samples[0]["inputsJson"])["x"][0][0] >= 0
    result = await maas(stack, "reader", "deploy", "logs", "cached")
    assert "no payloads logged for cached" in result.stdout


async def test_feedback_from_csv_or_json_then_drift_shows_live_accuracy(stack, tmp_path):
    served = await serve_logged(stack)
    ids = list(served)
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("request_id,label\n" + "".join(f"{i},{served[i]}\n" for i in ids[:20]) + "unknown,1\n")
    result = await maas(stack, "developer", "feedback", "mlp", "--labels", str(csv_file))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "20 of 21 labels attached to logged predictions of mlp",
        "1 not found (not sampled, past retention, or a call of several rows): unknown",
    ]
    json_file = tmp_path / "labels.json"
    wrong = {i: (served[i] + 1) % 4 for i in ids[20:]}  # ten wrong labels
    json_file.write_text(json.dumps([{"request_id": i, "label": label} for i, label in wrong.items()]))
    result = await maas(stack, "developer", "feedback", "mlp", "--labels", str(json_file))
    assert result.stdout.startswith("10 of 10 labels attached")
    result = await maas(stack, "reader", "deploy", "drift", "mlp", "--features", "2")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("mlp v1: 30 predictions logged from ")
    assert "live accuracy: 0.667 on 30 labelled predictions (test split: 0.970)" in out
    assert "predicted class shares" in out and "outputs" in out
    assert len([line for line in out.splitlines() if line.startswith("x[")]) == 2
    drift = json.loads((await maas(stack, "reader", "deploy", "drift", "mlp", "--json")).stdout)
    assert drift["live"]["labelled"] == "30" and len(drift["features"]) == 4 and drift["hasBaseline"]


async def test_drift_says_drifted_worst_first(stack):
    await serve_logged(stack, shifted=True)
    result = await maas(stack, "reader", "deploy", "drift", "mlp")
    lines = result.stdout.splitlines()
    assert lines[1].startswith("DRIFTED: x[") and ">= 0.2" in lines[1]
    psi = [float(line.split()[1]) for line in lines if line.startswith("x[")]
    assert psi == sorted(psi, reverse=True) and "drifted" in next(line for line in lines if line.startswith("x["))
    assert "live accuracy: no feedback yet (test split: 0.970)" in result.stdout


async def test_logging_turned_off_and_bad_input(stack, tmp_path):
    result = await maas(stack, "developer", "deploy", "monitor", "mlp", "--off")
    assert result.exit_code == 0 and result.stdout == "mlp: prediction logging is off\n"
    result = await maas(stack, "developer", "deploy", "monitor", "mlp", "--sample-rate", "2")
    assert result.exit_code == 2 and "--sample-rate" in result.output
    result = await maas(stack, "reader", "deploy", "monitor", "mlp")
    assert result.exit_code == 1 and "PERMISSION_DENIED" in result.output
    result = await maas(stack, "reader", "deploy", "drift", "nope")
    assert result.exit_code == 1 and "NOT_FOUND: deployment 'nope' not found" in result.output
    for content, message in (
        ("a,1,2\n", "every CSV row is request_id,label"),
        ("a,x\n", "the label of 'a' is not a number"),
        ("", "holds no labels"),
    ):
        bad = tmp_path / "bad.csv"
        bad.write_text(content)
        result = await maas(stack, "developer", "feedback", "mlp", "--labels", str(bad))
        assert result.exit_code == 2 and message in unboxed(result.output), result.output
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    result = await maas(stack, "developer", "feedback", "mlp", "--labels", str(bad))
    assert result.exit_code == 2 and "give" in result.output


async def test_the_client_sends_feedback_in_batches_the_gateway_takes(stack):
    served = await serve_logged(stack)
    labels = {f"unlogged-{i}": 1.0 for i in range(10_000)} | {i: float(c) for i, c in served.items()}

    def send() -> tuple[int, int]:
        with Client(f"127.0.0.1:{stack.port}", stack.keys["developer"]) as client:
            answer = client.feedback("mlp", labels)
            return answer.matched, len(answer.unmatched_request_ids)

    assert await asyncio.to_thread(send) == (30, 10_000)


@pytest.mark.parametrize("request_id", ["", "my-own-id"])
async def test_the_client_predicts_with_a_request_id_feedback_can_use(stack, request_id):
    await maas(stack, "developer", "deploy", "monitor", "mlp", "--sample-rate", "1")

    def call() -> list[str]:
        with Client(f"127.0.0.1:{stack.port}", stack.keys["developer"]) as client:
            client.predict("mlp", {"x": np.array([[0.1, 0.7, 0.1, 0.1]], np.float32)}, request_id=request_id)
            return list(client.feedback("mlp", {"my-own-id": 1.0}).unmatched_request_ids)

    assert await asyncio.to_thread(call) == ([] if request_id else ["my-own-id"])
