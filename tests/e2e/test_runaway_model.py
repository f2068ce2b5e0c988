"""Issue 11's runaway model, end to end: a tenant's forward that never returns held a core at
100 % for good, through DeleteDeployment and SIGTERM. Now the request fails at the deployment's
execution limit, the model's process is killed and restarted, deleting a deployment kills a
stuck process, and another tenant's deployment answers all the while."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from maas import Client
from maas.common.v1 import common_pb2
from maas.errors import ApiError
from maas.inference.v1 import inference_pb2

from services.inference.stubs import stub_pids
from services.stack.ephemeral import EphemeralStack
from tests.support.digits import SIGNATURE
from tests.support.tenants import developer_clients

pytestmark = pytest.mark.slow

LIMIT_SECONDS = 3
TICKS = os.sysconf("SC_CLK_TCK")


class Spinner(torch.nn.Module):
    """Doubles its input, unless the first element is positive: then it loops for ever."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x[0][0] > 0):
            while True:
                x = x + 1.0
        return x * 2.0


SPINNER_SIGNATURE = common_pb2.Signature(
    inputs=[common_pb2.TensorSpec(name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=[4])],
    outputs=[common_pb2.TensorSpec(name="y", datatype=common_pb2.DATA_TYPE_FP32, shape=[4])],
)
CALM = {"x": np.zeros((1, 4), np.float32)}
SPIN = {"x": np.ones((1, 4), np.float32)}


@pytest.fixture(scope="module")
def tenants(tmp_path_factory, digits):
    """Tenant `spinner` owns the looping model; tenant `steady` an ordinary one."""
    with EphemeralStack() as stack, developer_clients(stack, "spinner", "steady") as clients:
        path = tmp_path_factory.mktemp("spinner") / "spinner.pt"
        torch.jit.script(Spinner()).save(str(path))
        spinner, steady = clients["spinner"], clients["steady"]
        spinner.create_model("spinner")
        spinner.upload_version("spinner", path, format="torchscript", signature=SPINNER_SIGNATURE)
        steady.create_model("digits")
        steady.upload_version("digits", digits.path, format="torchscript", signature=SIGNATURE)
        steady.create_deployment("digits", "digits", version=1)
        steady.wait_ready("digits", timeout=240)
        yield stack, spinner, steady, digits


def models_dir(stack: EphemeralStack) -> Path:
    return (stack.home / "inference" / "nodes" / "triton-0" / "models").resolve()


def stubs_of_spinner(stack: EphemeralStack, owned: set[Path]) -> dict[int, Path]:
    """Stub processes of model directories not in `owned` (the steady tenant's): the spinner's."""
    found = {}
    for model_dir in models_dir(stack).iterdir():
        if model_dir not in owned:
            found.update(dict.fromkeys(stub_pids(model_dir), model_dir))
    return found


def cpu_seconds(pids) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone: it uses nothing
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def cpu_share(pids, seconds: float = 1.0) -> float:
    """Cores the processes used over `seconds`."""
    before = cpu_seconds(pids)
    time.sleep(seconds)
    return (cpu_seconds(pids) - before) / seconds


def predict_steadily(steady: Client, digits, until: concurrent.futures.Future) -> int:
    """Predict on the steady tenant's deployment until `until` is done; returns how many answered."""
    answered = 0
    sample = digits.test_x[:1]
    while not until.done():
        steady.predict("digits", {"x": sample}, timeout=10)
        answered += 1
        time.sleep(0.05)
    return answered


def test_a_runaway_request_fails_at_the_limit_and_its_process_is_replaced(tenants):
    stack, spinner, steady, digits = tenants
    owned = set(models_dir(stack).iterdir())
    spinner.create_deployment("spin", "spinner", version=1, max_batch_size=1, execution_limit_seconds=LIMIT_SECONDS)
    spinner.wait_ready("spin", timeout=240)
    assert spinner.predict("spin", CALM)["y"].tolist() == [[0.0] * 4]
    [original] = stubs_of_spinner(stack, owned)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        runaway = pool.submit(spinner.predict, "spin", SPIN, None, 60)
        answered = predict_steadily(steady, digits, runaway)
        with pytest.raises(ApiError) as failure:
            runaway.result()
        took = time.monotonic() - started
    assert failure.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED, failure.value
    assert "execution limit" in failure.value.details and f"{LIMIT_SECONDS} s" in failure.value.details
    assert "m_" not in failure.value.details
    assert LIMIT_SECONDS <= took < LIMIT_SECONDS + 10
    assert answered > 0, "the other tenant's deployment did not answer while the model spun"

    # The spinning process is gone within a few seconds, and nothing of the deployment burns a core.
    deadline = time.monotonic() + 10
    while original in stubs_of_spinner(stack, owned) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert original not in stubs_of_spinner(stack, owned), "the runaway model's process is still there"
    assert cpu_share(stubs_of_spinner(stack, owned)) < 0.2

    # Restarted: the deployment answers again, and stays READY.
    deadline = time.monotonic() + 60
    while True:
        try:
            assert spinner.predict("spin", CALM, timeout=30)["y"].tolist() == [[0.0] * 4]
            break
        except ApiError as error:
            if time.monotonic() > deadline:
                raise
            print("not yet answering after the restart:", error)  # shown with a failure
            time.sleep(0.5)
    assert spinner.get_deployment("spin").state == inference_pb2.DEPLOYMENT_STATE_READY
    spinner.delete_deployment("spin")


def test_deleting_a_deployment_kills_its_stuck_process(tenants):
    stack, spinner, steady, digits = tenants
    owned = set(models_dir(stack).iterdir())
    spinner.create_deployment("stuck", "spinner", version=1, max_batch_size=1, execution_limit_seconds=600)
    spinner.wait_ready("stuck", timeout=240)
    with pytest.raises(ApiError) as failure:
        spinner.predict("stuck", SPIN, timeout=2)
    assert failure.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    stubs = stubs_of_spinner(stack, owned)
    assert cpu_share(stubs) > 0.5, "the control: the stuck model should be burning a core"

    spinner.delete_deployment("stuck")
    deadline = time.monotonic() + 10
    while stubs_of_spinner(stack, owned) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not stubs_of_spinner(stack, owned), "the stuck process outlived its deployment"
    assert steady.predict("digits", {"x": digits.test_x[:1]})["logits"].shape == (1, 10)


def test_a_model_process_killed_from_outside_is_revived(tenants):
    """Triton never restarts a python stub that died (an OOM kill, a crash in native code): the
    inference service sees the model without its process and reloads it."""
    stack, _, steady, digits = tenants
    sample = {"x": digits.test_x[:1]}
    steady.predict("digits", sample)
    stubs = [pid for model_dir in models_dir(stack).iterdir() for pid in stub_pids(model_dir)]
    assert stubs, "the steady tenant's model process was not found"
    for pid in stubs:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        try:
            assert steady.predict("digits", sample, timeout=10)["logits"].shape == (1, 10)
            break
        except ApiError as error:
            assert time.monotonic() < deadline, f"the model was not revived: {error}"
            time.sleep(0.5)
