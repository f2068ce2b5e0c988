"""Fixtures every suite may use."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

POSTGRES_SERVER = "postgresql://postgres@127.0.0.1:5432"


def _admin_connection() -> psycopg.Connection:
    try:
        return psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL is not reachable on 127.0.0.1:5432 as user postgres: {exc}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI must provide it)")
        pytest.skip(message)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL database (SQLAlchemy URL), dropped afterwards. Skips locally when
    the server is missing; fails under CI, where the PostgreSQL path must be tested."""
    name = f"maas_test_{uuid.uuid4().hex[:12]}"
    with _admin_connection() as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with _admin_connection() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- redis_server: a throwaway redis-server the test may kill and restart (gateway tests) ---


class RedisServer:
    """A real redis-server on a free loopback port, without persistence."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A started redis-server; the test may kill() and start() it again on the same port."""
    if shutil.which("redis-server") is None:
        message = "redis-server is not on PATH"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI must provide it)")
        pytest.skip(message)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = RedisServer(port)
    server.start()
    try:
        yield server
    finally:
        server.kill()
