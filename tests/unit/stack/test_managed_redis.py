"""The redis-server the stack manages: started from the supervisor's plan on a temporary home, it
wants the generated password (it held cached model outputs and quota counters open to any local
process), never shows it on a command line, and leaves the home private to its user."""

from __future__ import annotations

import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis

from services.common.settings import make_private
from services.stack.config import StackSettings
from services.stack.ephemeral import free_port
from services.stack.supervisor import Supervisor, healthy, redis_ready


def started(supervisor: Supervisor) -> subprocess.Popen:
    (child,) = [c for c in supervisor.children if c.name == "redis"]
    supervisor.start(child, supervisor.environment())
    deadline = time.monotonic() + 20
    while not healthy(child):
        assert child.process and child.process.poll() is None, child.log_file.read_text()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "redis-server did not answer"
        time.sleep(0.1)
    return child.process  # type: ignore[return-value]


@pytest.fixture
def stack_redis(tmp_path: Path) -> Iterator[Supervisor]:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)  # a home made before the fix
    settings = StackSettings(home=home, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    make_private(settings.home)
    supervisor = Supervisor(settings)
    process = started(supervisor)
    yield supervisor
    process.terminate()
    process.wait(10)


def test_the_stacks_redis_refuses_a_client_without_the_password(stack_redis: Supervisor) -> None:
    address = urlparse(stack_redis.settings.redis_url)
    with socket.create_connection((address.hostname, address.port), timeout=5) as sock:
        sock.sendall(b"GET quota:alpha\r\n")
        assert sock.recv(64).startswith(b"-NOAUTH")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(stack_redis.settings.redis_url).ping()
    assert not redis_ready(f"{address.hostname}:{address.port}")


def test_the_services_url_carries_the_password_and_the_command_line_does_not(stack_redis: Supervisor) -> None:
    url = stack_redis.environment()["MAAS_REDIS_URL"]
    password = (stack_redis.settings.home / "redis.password").read_text().strip()
    assert urlparse(url).password == password
    assert redis.Redis.from_url(url).ping()
    (child,) = [c for c in stack_redis.children if c.name == "redis"]
    cmdline = Path(f"/proc/{child.process.pid}/cmdline").read_bytes()  # type: ignore[union-attr]
    assert password.encode() not in cmdline
    assert redis_ready(child.address, password)
    assert not redis_ready(child.address, "wrong")


def test_a_password_in_the_url_is_the_one_the_managed_redis_gets(tmp_path: Path) -> None:
    settings = StackSettings(home=tmp_path, redis_url=f"redis://:p%40ss%22w@127.0.0.1:{free_port()}/0")
    make_private(settings.home)
    supervisor = Supervisor(settings)
    process = started(supervisor)
    try:
        assert supervisor.environment()["MAAS_REDIS_URL"] == settings.redis_url
        assert redis.Redis.from_url(settings.redis_url).ping()
    finally:
        process.terminate()
        process.wait(10)


def test_every_file_under_the_home_is_private(stack_redis: Supervisor) -> None:
    client = redis.Redis.from_url(stack_redis.environment()["MAAS_REDIS_URL"])
    client.set("cached-output", b"a tenant's prediction")  # lands in the append-only file
    client.close()
    home = stack_redis.settings.home
    paths = [home, *home.rglob("*")]
    assert any(p.name.endswith(".aof") for p in paths)
    open_to_others = [
        f"{oct(p.lstat().st_mode & 0o777)} {p.relative_to(home)}"
        for p in paths
        if p.lstat().st_mode & 0o077 and not stat.S_ISLNK(p.lstat().st_mode)
    ]
    assert not open_to_others, open_to_others
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in paths if p.is_file())
