"""A throwaway stack on free loopback ports in its own MAAS_HOME, started and stopped through
the real `maas up --detach` / `maas down`. End-to-end tests and benchmarks use it; so can a
team's own integration tests."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

PORT_SETTINGS = [
    "MAAS_GATEWAY_ADDR", "MAAS_REGISTRY_ADDR", "MAAS_INFERENCE_ADDR", "MAAS_TRAINER_ADDR",
    "MAAS_GATEWAY_METRICS_ADDR", "MAAS_REGISTRY_METRICS_ADDR", "MAAS_INFERENCE_METRICS_ADDR",
    "MAAS_TRAINER_METRICS_ADDR", "MAAS_GATEWAY_HTTP_ADDR",
]


# Embedded Triton node i listens on the three base ports plus 3 x i: room for this many nodes.
MAX_TRITON_NODES = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int, excluding: range = range(0)) -> list[int]:
    """`count` different free loopback ports, none of them in `excluding`."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in excluding and port not in ports:
            ports.append(port)
    return ports


def free_port_block(count: int) -> int:
    """The first of `count` consecutive loopback ports that are all free now."""
    for _ in range(200):
        first = random.randrange(20000, 60000 - count)
        try:
            with contextlib.ExitStack() as held:
                for port in range(first, first + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no block of {count} free loopback ports found")


class EphemeralStack:
    def __init__(self, home: Path | None = None, start_timeout: float = 300.0) -> None:
        self._tempdir = None if home else tempfile.TemporaryDirectory(prefix="maas-")
        self.home = home or Path(self._tempdir.name)  # type: ignore[union-attr]
        self.env = dict(os.environ)
        triton_ports = free_port_block(3 * MAX_TRITON_NODES)
        # Nothing holds these ports until the stack starts, so each is checked against the others:
        # a service port inside the Triton block would make a node fail to bind.
        *service_ports, redis_port = free_ports(len(PORT_SETTINGS) + 1,
                                               excluding=range(triton_ports, triton_ports + 3 * MAX_TRITON_NODES))
        self.env.update({name: f"127.0.0.1:{port}" for name, port in zip(PORT_SETTINGS, service_ports, strict=True)})
        self.env.update({
            "MAAS_HOME": str(self.home),
            "MAAS_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "MAAS_TRITON_GRPC_PORT": str(triton_ports),
            "MAAS_TRITON_HTTP_PORT": str(triton_ports + 1),
            "MAAS_TRITON_METRICS_PORT": str(triton_ports + 2),
            "MAAS_START_TIMEOUT_SECONDS": str(start_timeout),
        })
        self.env.pop("MAAS_API_KEY", None)

    @property
    def gateway(self) -> str:
        return self.env["MAAS_GATEWAY_ADDR"]

    @property
    def http(self) -> str:
        """The gateway's HTTP port as a base URL (the OpenAI API is under /v1)."""
        return f"http://{self.env['MAAS_GATEWAY_HTTP_ADDR']}"

    @property
    def admin_key(self) -> str:
        return (self.home / "admin.key").read_text().strip()

    def maas(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
        """Run the `maas` CLI against this stack."""
        command = [sys.executable, "-c", "from maas.cli import main; main()", *args]
        return subprocess.run(command, env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              check=check, stdin=subprocess.DEVNULL, **kwargs)

    def up(self) -> EphemeralStack:
        result = self.maas("up", "--detach", check=False)
        if result.returncode != 0:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.home / "logs").glob("*.log")))
            raise RuntimeError(f"maas up failed:\n{result.stdout}\n{result.stderr}\n{logs}")
        return self

    def down(self) -> None:
        self.maas("down", check=False)

    def __enter__(self) -> EphemeralStack:
        return self.up()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.down()
        if self._tempdir:
            self._tempdir.cleanup()
