"""Faults and restarts lose nothing that was acknowledged: kill -9 the inference service, kill -9
Triton, and restart the whole stack on the same MAAS_HOME; the deployment comes back by itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from maas import Client
from maas.errors import ApiError

from services.stack.ephemeral import EphemeralStack
from tests.support.digits import deploy_digits

pytestmark = pytest.mark.slow


def predict_eventually(client: Client, deployment: str, x: np.ndarray, timeout: float = 120) -> np.ndarray:
    """Retry through the window in which a restarted process is coming back."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.predict(deployment, {"x": x}, timeout=10)["logits"]
        except ApiError as error:
            if time.monotonic() > deadline:
                raise AssertionError(f"no answer after {timeout}s: {error}") from error
            time.sleep(0.5)


def child_pid(stack: EphemeralStack, name: str) -> int:
    state = json.loads((stack.home / "run" / "stack.json").read_text())
    return state["children"][name]["pid"]


def triton_pid(stack: EphemeralStack) -> int:
    found = subprocess.run(["pgrep", "-f", f"tritonserver.*{stack.home}"], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    assert len(pids) == 1, f"expected one tritonserver for {stack.home}, found {pids}"
    return pids[0]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: it only waits for its parent to collect it.
    status = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout
    return bool(status.strip()) and not status.strip().startswith("Z")


def test_kills_and_restarts(tmp_path, digits) -> None:
    stack = EphemeralStack(home=tmp_path / "home").up()
    try:
        acme, key = deploy_digits(stack.gateway, stack.admin_key, digits)
        x = digits.test_x[:4]
        expected = digits.reference(x)
        np.testing.assert_allclose(acme.predict("digits", {"x": x})["logits"], expected, rtol=1e-5, atol=1e-5)

        # The inference service dies hard: the supervisor restarts it and it reconciles.
        inference = child_pid(stack, "inference")
        os.kill(inference, signal.SIGKILL)
        np.testing.assert_allclose(predict_eventually(acme, "digits", x), expected, rtol=1e-5, atol=1e-5)

        # Triton dies hard: the inference service restarts it and reloads the deployment.
        os.kill(triton_pid(stack), signal.SIGKILL)
        time.sleep(0.5)
        np.testing.assert_allclose(predict_eventually(acme, "digits", x), expected, rtol=1e-5, atol=1e-5)

        # The whole stack restarts on the same home: keys, models and deployments are all back.
        admin_key = stack.admin_key
        started = json.loads((stack.home / "run" / "stack.json").read_text())
        pids = [started["supervisor_pid"], triton_pid(stack), *(c["pid"] for c in started["children"].values())]
        stack.down()
        assert [pid for pid in pids if alive(pid)] == [], "maas down left processes running"
        stack.up()
        assert stack.admin_key == admin_key
        acme = Client(stack.gateway, key)
        assert [m.name for m in acme.list_models()] == ["digits"]
        np.testing.assert_allclose(predict_eventually(acme, "digits", x), expected, rtol=1e-5, atol=1e-5)
        assert acme.get_deployment("digits").resolved_version == 1
    finally:
        stack.down()
