"""Under continuous Predict load through the real gateway: a deployment that follows an alias
rolls when the alias moves, and a canary is started, promoted, started again and rolled back
with `maas deploy canary|promote|rollback`, `maas deploy load` showing what Triton did.
No request fails, and every answer comes from exactly one of the two versions (the outputs match
that version's model and the version it names, in the body and in the x-maas-model-version
trailer)."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
from maas import Client
from maas.inference.v1 import inference_pb2
from maas.tensors import from_tensor, to_tensor

from tests.support.digits import SIGNATURE, train_digits_mlp

pytestmark = pytest.mark.slow

log = logging.getLogger(__name__)
LOAD_THREADS = 4


@pytest.fixture(scope="module")
def roller(stack, digits, tmp_path_factory):
    """Tenant `rollout`: model `roller` with two versions that answer differently."""
    admin = Client(stack.gateway, stack.admin_key)
    admin.create_tenant("rollout")
    key = admin.create_api_key("rollout", "developer")[1]
    client = Client(stack.gateway, key)
    admin.close()
    second = train_digits_mlp(tmp_path_factory.mktemp("digits-v2"), epochs=3, seed=1)
    client.create_model("roller", "two versions of the digits MLP")
    client.upload_version("roller", digits.path, format="torchscript", signature=SIGNATURE)
    client.upload_version("roller", second.path, format="torchscript", signature=SIGNATURE)
    client.set_alias("roller", "production", 1)
    client.create_deployment("roller", "roller", alias="production")
    client.wait_ready("roller", timeout=180)
    yield client, {1: digits, 2: second}, key
    client.close()


class Load:
    """Predict in a loop from a few threads, recording every answer or error."""

    def __init__(self, client: Client, x: np.ndarray, deployment: str = "roller") -> None:
        self.client = client
        self.request = inference_pb2.PredictRequest(deployment=deployment, inputs=[to_tensor("x", x)])
        self.answers: list[tuple[float, float, int, str, np.ndarray]] = []  # start, seconds, ...
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(LOAD_THREADS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        predict = self.client.inference.Predict
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response, call = predict.with_call(self.request, metadata=self.client._metadata, timeout=30)
            except Exception as error:  # every failure counts, whatever its kind
                self.errors.append(error)
                continue
            trailer = dict(call.trailing_metadata() or ()).get("x-maas-model-version", "")
            self.answers.append(
                (
                    started,
                    time.monotonic() - started,
                    response.version,
                    trailer,
                    from_tensor(response.outputs[0]),
                )
            )

    def versions(self) -> list[int]:
        return [answer[2] for answer in self.answers]


def check_answers(load: Load, references: dict[int, np.ndarray]) -> None:
    assert load.errors == [], load.errors[:3]
    for _, _, version, trailer, outputs in load.answers:
        assert trailer == str(version)
        np.testing.assert_allclose(outputs, references[version], rtol=1e-5, atol=1e-5)


def wait_for(condition, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def p99_ms(seconds: list[float]) -> float:
    return float(np.percentile(seconds, 99) * 1000) if seconds else float("nan")


def test_moving_the_alias_rolls_the_deployment_without_failing_a_request(roller) -> None:
    client, models, _ = roller
    x = models[1].test_x[:4]
    references = {version: model.reference(x) for version, model in models.items()}
    assert not np.allclose(references[1], references[2], atol=1e-3)

    with Load(client, x) as load:
        time.sleep(2)
        rolled_at = time.monotonic()
        client.set_alias("roller", "production", 2)
        deadline = time.monotonic() + 180
        while 2 not in load.versions()[-20:] or client.get_deployment("roller").resolved_version != 2:
            assert time.monotonic() < deadline, client.get_deployment("roller").message
            assert not load.errors, load.errors[:3]
            time.sleep(0.2)
        switched_at = time.monotonic()
        time.sleep(4)  # past the drain: the old version is unloaded under load

    check_answers(load, references)
    assert set(load.versions()) == {1, 2}
    # Once the new version has answered, the old one never does again.
    first_v2 = load.versions().index(2)
    late_v1 = [a for a in load.answers[first_v2:] if a[2] == 1 and a[0] > switched_at]
    assert late_v1 == []
    deployment = client.get_deployment("roller")
    assert deployment.state == inference_pb2.DEPLOYMENT_STATE_READY and deployment.alias == "production"

    steady = [seconds for started, seconds, *_ in load.answers if started < rolled_at]
    rolling = [seconds for started, seconds, *_ in load.answers if rolled_at <= started < switched_at + 4]
    log.info(
        "predict p99: steady %.1f ms (%d), during the roll %.1f ms (%d)",
        p99_ms(steady),
        len(steady),
        p99_ms(rolling),
        len(rolling),
    )


def test_a_canary_is_promoted_then_another_rolled_back_without_failing_a_request(stack, roller) -> None:
    client, models, key = roller
    x = models[1].test_x[:4]
    references = {version: model.reference(x) for version, model in models.items()}
    client.create_deployment("canaried", "roller", version=1)
    client.wait_ready("canaried", timeout=180)
    env = dict(stack.env, MAAS_API_KEY=key, COLUMNS="200")

    def maas(*args: str) -> str:
        result = stack.maas("deploy", *args, env=env, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def deployment() -> inference_pb2.Deployment:
        return client.get_deployment("canaried")

    def start(version: int) -> None:
        assert f"canary v{version} at 30%" in maas("canary", "canaried", "--version", str(version), "--weight", "30")

    with Load(client, x, "canaried") as load:
        time.sleep(1)
        start(2)
        wait_for(lambda: deployment().canary.state == inference_pb2.DEPLOYMENT_STATE_READY, "canary ready")
        wait_for(lambda: load.versions()[-40:].count(2) > 3, "the canary answers its share")
        assert 1 in load.versions()[-40:]
        maas("promote", "canaried")
        promoted_at = len(load.answers)
        wait_for(lambda: len(load.answers) > promoted_at + 40, "answers after the promotion")
        assert set(load.versions()[-20:]) == {2}
        start(1)
        wait_for(lambda: load.versions()[-40:].count(1) > 3, "the second canary answers its share")
        maas("rollback", "canaried")
        rolled_back_at = len(load.answers)
        wait_for(lambda: len(load.answers) > rolled_back_at + 40, "answers after the rollback")
        assert set(load.versions()[-20:]) == {2}
        time.sleep(3)  # past the drain: the canary is unloaded under load

    check_answers(load, references)
    final = deployment()
    assert final.version == final.resolved_version == 2 and not final.HasField("canary")
    # Triton counted the requests the promoted version answered; the CLI shows them.
    [served] = client.get_deployment_load("canaried").versions
    assert served.version == 2 and served.success_count >= load.versions().count(2) - 1
    assert served.failure_count == 0 and served.execution_count > 0
    shown = maas("load", "canaried")
    assert "v2" in shown and "m_" not in shown  # deployment names only, never Triton's

    # Operations on what is not there say why, with the CLI's exit status 1.
    for args, complaint in (
        (("promote", "canaried"), "FAILED_PRECONDITION"),
        (("rollback", "nope"), "NOT_FOUND"),
        (("canary", "canaried", "--version", "9"), "NOT_FOUND"),
        (("load", "nope"), "NOT_FOUND"),
    ):
        result = stack.maas("deploy", *args, env=env, check=False)
        assert result.returncode == 1 and complaint in result.stderr, (args, result.stderr)
    client.delete_deployment("canaried")
