"""The platform in containers: every image built from Debian by deploy/docker/build.sh, the stack
started by deploy/docker/stack.sh with two Triton node containers, and driven from the host
through the gateway's published port only, as a user would. `make test` installs and starts the
Docker engine first (scripts/install-docker.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.stack.ephemeral import free_ports

REPO = Path(__file__).resolve().parents[2]
NODES = 2


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=timeout)


@dataclass
class ContainerStack:
    """What the tests need of a running container stack: EphemeralStack's shape (gateway,
    admin_key, env, maas) plus the containers themselves."""

    name: str
    home: Path
    gateway: str
    http: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def admin_key(self) -> str:
        return (self.home / "admin.key").read_text().strip()

    def container(self, role: str) -> str:
        return f"{self.name}-{role}"

    def maas(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
        command = [sys.executable, "-c", "from maas.cli import main; main()", *args]
        return subprocess.run(command, env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              check=check, stdin=subprocess.DEVNULL, **kwargs)

    def inspect(self, role: str) -> dict:
        return json.loads(docker("inspect", self.container(role)).stdout)[0]


def stack_script(*args: str, env: dict[str, str], timeout: float = 600) -> None:
    result = subprocess.run([str(REPO / "deploy/docker/stack.sh"), *args], env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"stack.sh {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="session")
def images() -> None:
    for script in ("scripts/install-docker.sh", "deploy/docker/build.sh"):
        result = subprocess.run([str(REPO / script)], capture_output=True, text=True, timeout=1800,
                                env=dict(os.environ, MAAS_PYTHON=sys.executable))
        assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.fixture(scope="session")
def container_stack(images, tmp_path_factory) -> Iterator[ContainerStack]:
    home = tmp_path_factory.mktemp("container-home")
    gateway_port, http_port = free_ports(2)
    name = f"maas-test-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ)
    env.pop("MAAS_API_KEY", None)
    env.update(MAAS_HOME=str(home), MAAS_STACK_NAME=name, MAAS_CONTAINER_NODES=str(NODES),
               MAAS_GATEWAY_PORT=str(gateway_port), MAAS_GATEWAY_HTTP_PORT=str(http_port),
               MAAS_GATEWAY_ADDR=f"127.0.0.1:{gateway_port}")
    stack = ContainerStack(name, home, f"127.0.0.1:{gateway_port}", f"http://127.0.0.1:{http_port}", env)
    try:
        stack_script("up", env=env)
        yield stack
    finally:
        for role in ("gateway", "inference", "registry"):
            logs = docker("logs", "--tail", "30", stack.container(role), check=False)
            print(f"--- {role}\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        stack_script("down", "--volumes", env=env)
