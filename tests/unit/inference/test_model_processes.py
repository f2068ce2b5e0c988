"""The runner's execution limit, and the service's view of Triton's model processes: finding a
model's stubs, killing those an unload left behind, reloading a model whose stubs died."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services.common.serving import EXECUTION_LIMIT_PREFIX as SHARED_PREFIX
from services.inference import converge as converge_module
from services.inference.deployments import Deployments
from services.inference.runner.execution_limit import (
    EXECUTION_LIMIT_PREFIX,
    ExecutionLimit,
    ExecutionLimitExceeded,
)
from services.inference.stubs import reap_stubs, stub_pids, stubs_under
from tests.unit.inference.inference_fakes import TENANT
from tests.unit.inference.test_inference_service import deploy

# A stand-in for a stuck stub: Triton's argv shape, SIGTERM ignored, a core never released.
STUCK_STUB = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.01)\n"


def test_the_runner_and_the_services_agree_on_the_prefix():
    assert EXECUTION_LIMIT_PREFIX == SHARED_PREFIX


def test_a_call_within_the_limit_returns_its_value_and_kills_nothing():
    killed = threading.Event()
    limit = ExecutionLimit(5, kill=killed.set)
    assert limit.call(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):  # the call's own errors pass through
        limit.call(lambda: 1 / 0)
    assert not killed.wait(0.1)


def test_a_call_past_the_limit_fails_at_once_and_the_process_is_killed_a_moment_later():
    killed = threading.Event()
    release = threading.Event()
    limit = ExecutionLimit(0.2, kill=killed.set)
    started = time.monotonic()
    with pytest.raises(ExecutionLimitExceeded, match=r"^execution limit exceeded: .*limit of 0.2 s") as error:
        limit.call(release.wait)
    assert time.monotonic() - started < 1.0
    assert not killed.is_set(), "killed before the error response could leave"
    assert killed.wait(3), "the process was never killed"
    assert "execution_limit_seconds" in str(error.value)
    release.set()


def test_the_limit_comes_from_the_config_parameters():
    assert ExecutionLimit.from_parameters({"execution_limit_seconds": "7"}).seconds == 7
    assert ExecutionLimit.from_parameters({}).seconds == 30


def ignores_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
    return bool(ignored & (1 << (signal.SIGTERM - 1)))


@pytest.fixture
def stuck_stub(tmp_path: Path):
    """A process started as `triton_python_backend_stub <repo>/<model>/1/model.py <shm> ...`."""
    repository = tmp_path / "models"
    script = repository / "m_stuck" / "1" / "model.py"
    script.parent.mkdir(parents=True)
    script.write_text(STUCK_STUB)
    process = subprocess.Popen(
        ["triton_python_backend_stub", str(script), "shm-region", "1048576"], executable=sys.executable
    )
    deadline = time.monotonic() + 10
    while not ignores_sigterm(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    yield repository, process
    process.kill()
    process.wait()


def test_a_models_stubs_are_found_by_their_command_line(stuck_stub):
    repository, process = stuck_stub
    assert stub_pids(repository / "m_stuck") == [process.pid]
    assert stubs_under(repository) == {"m_stuck": [process.pid]}
    assert stub_pids(repository / "m_stuc") == []  # a name prefix is another model


async def test_reaping_kills_a_stub_that_ignores_sigterm_after_the_grace(stuck_stub):
    repository, process = stuck_stub
    process.send_signal(signal.SIGTERM)  # ignored, as the stuck stub ignored it
    started = time.monotonic()
    assert await reap_stubs(repository / "m_stuck", grace_seconds=0.5) == 1
    assert 0.5 <= time.monotonic() - started < 3
    assert process.wait(5) == -signal.SIGKILL


async def test_reaping_kills_nothing_when_the_stubs_leave_in_time(tmp_path: Path):
    assert await reap_stubs(tmp_path / "m_none", grace_seconds=0.1) == 0


async def test_a_served_model_without_stubs_is_reloaded_once(deployments: Deployments, triton, repository, monkeypatch):
    await deploy(deployments, "web")
    triton_model = (await deployments.get(TENANT, "web")).triton_model
    stubs = {triton_model: [123]}
    monkeypatch.setattr(converge_module, "stubs_under", lambda root: dict(stubs))
    loads = len(triton.loads)
    await deployments.converger.revive_models()
    await asyncio.sleep(0.05)
    assert len(triton.loads) == loads, "a model with its stubs was reloaded"

    runner = repository.path(triton_model) / "1" / "model.py"
    before = runner.stat().st_mtime_ns
    stubs.clear()
    await deployments.converger.revive_models()
    await asyncio.sleep(0.05)
    assert triton.loads[loads:] == [triton_model]
    assert runner.stat().st_mtime_ns > before  # so that Triton sees a change and reloads
