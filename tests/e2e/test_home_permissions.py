"""What `maas up` leaves on disk and on the loopback: MAAS_HOME private to its user, and the
stack's Redis (which holds cached model outputs and the quota counters) behind a password."""

from __future__ import annotations

import socket
import stat
from urllib.parse import urlparse

import pytest
from maas import Client

from tests.support.digits import SIGNATURE

pytestmark = pytest.mark.slow


def test_nothing_under_maas_home_is_readable_by_group_or_others(stack, digits):
    # Something in every service's folder first: a tenant, a model version, a deployment.
    admin = Client(stack.gateway, stack.admin_key)
    admin.create_tenant("perms")
    developer = Client(stack.gateway, admin.create_api_key("perms", "developer")[1])
    developer.create_model("digits")
    developer.upload_version("digits", digits.path, format="torchscript", signature=SIGNATURE)
    open_to_others = []
    for path in [stack.home, *stack.home.rglob("*")]:
        mode = path.lstat().st_mode
        if not stat.S_ISLNK(mode) and mode & 0o077:
            open_to_others.append(f"{oct(mode & 0o777)} {path.relative_to(stack.home)}")
    assert not open_to_others, "\n".join(open_to_others)
    developer.close()
    admin.close()


def test_the_stacks_redis_wants_its_password(stack):
    address = urlparse(stack.env["MAAS_REDIS_URL"])
    with socket.create_connection((address.hostname, address.port), timeout=5) as sock:
        sock.sendall(b"GET anything\r\n")
        assert sock.recv(64).startswith(b"-NOAUTH")
        password = (stack.home / "redis.password").read_text().strip()
        sock.sendall(f"AUTH {password}\r\nPING\r\n".encode())
        assert sock.recv(64).startswith(b"+OK")
    assert password not in (stack.home / "run" / "stack.json").read_text()
