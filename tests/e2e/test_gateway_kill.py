"""Nothing acknowledged is lost on a gateway kill: N acknowledged mutating calls through the
gateway, kill -9 of the gateway right after the last answer, the supervisor restarts it, and the
audit log and the usage both hold exactly N."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from maas import Client
from maas.errors import ApiError

from services.stack.ephemeral import EphemeralStack

pytestmark = pytest.mark.slow

CALLS = 40


def _gateway_pid(stack: EphemeralStack) -> int:
    state = json.loads((stack.home / "run" / "stack.json").read_text())
    return int(state["children"]["gateway"]["pid"])


def test_kill_9_of_the_gateway_loses_no_acknowledged_audit_row_or_usage(stack: EphemeralStack) -> None:
    admin = Client(stack.gateway, stack.admin_key)
    admin.create_tenant("killed")
    key, plaintext = admin.create_api_key("killed", role="developer")
    developer = Client(stack.gateway, plaintext)
    for index in range(CALLS):
        developer.create_model(f"model-{index}")
    pid = _gateway_pid(stack)
    os.kill(pid, signal.SIGKILL)

    deadline = time.monotonic() + 120
    while True:  # the killed gateway answers nothing: an answer comes from the one restarted
        try:
            admin.whoami()
            break
        except ApiError:
            assert time.monotonic() < deadline, "the gateway did not come back"
            time.sleep(0.5)
    assert _gateway_pid(stack) != pid

    events = admin.list_audit_events(tenant="killed", method="CreateModel", limit=1000)
    assert len(events) == CALLS and {e.code for e in events} == {"OK"}
    [row] = admin.get_usage(tenant="killed", api_key_id=key.id)
    assert row.requests == CALLS
