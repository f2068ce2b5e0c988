"""`maas up`, `maas down`, `maas status`: the local stack."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Annotated

import typer
from rich.text import Text

from maas.cli._shared import console, errors, maas_home, new_table


def read_state() -> dict | None:
    state_file = maas_home() / "run" / "stack.json"
    try:
        return json.loads(state_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def up(detach: Annotated[bool, typer.Option("--detach", "-d", help="Run in the background")] = False) -> None:
    """Start redis-server, registry, trainer, inference (with Triton) and gateway."""
    state = read_state()
    if state and pid_alive(state.get("supervisor_pid")):
        console.print(
            f"the stack is already running (supervisor pid {state['supervisor_pid']}); `maas status`"
        )
        return
    command = [sys.executable, "-m", "services.stack"]
    if not detach:
        os.execv(sys.executable, command)
    home = maas_home()
    # Keys, databases and cached outputs live here: private to this user from the first file.
    os.umask(0o077)
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    home.chmod(0o700)
    (home / "logs").mkdir(parents=True, exist_ok=True)
    log_path = home / "logs" / "supervisor.log"
    with log_path.open("ab") as log_file:
        supervisor = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    started = time.monotonic()
    with console.status("starting redis, registry, trainer, inference + Triton, gateway ...") as status:
        while True:
            state = read_state() or {}
            if state.get("supervisor_pid") == supervisor.pid and state.get("state") == "ready":
                break
            if supervisor.poll() is not None or state.get("state") == "failed":
                errors.print(
                    Text.assemble(("the stack failed to start", "red"), f": {state.get('error') or 'see ' + str(log_path)}")
                )
                raise typer.Exit(1)
            starting = [n for n, c in state.get("children", {}).items() if c.get("pid")]
            if starting:
                status.update(f"starting ... {', '.join(starting)} ({time.monotonic() - started:.0f}s)")
            time.sleep(0.3)
    print_banner(time.monotonic() - started)


def print_banner(elapsed: float) -> None:
    home = maas_home()
    address = os.environ.get("MAAS_GATEWAY_ADDR", "127.0.0.1:50051")
    console.print(Text.assemble(("MaaS is up", "green"), f" in {elapsed:.1f}s. Gateway: ", (address, "bold")))
    console.print(f"Admin key: {home / 'admin.key'} (mode 0600). Logs: {home / 'logs'}")
    console.print(Text.assemble("Try: ", ("maas whoami", "bold"), "  then  ", ("maas admin tenant create my-team", "bold")))


def down() -> None:
    """Stop every process `maas up` started."""
    state = read_state()
    if not state:
        console.print("the stack is not running")
        return
    pid = state.get("supervisor_pid")
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        with console.status("stopping ..."):
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
    # A supervisor that was killed leaves its children: stop them too.
    for child in state.get("children", {}).values():
        if pid_alive(child.get("pid")) and child.get("pid") != pid:
            os.kill(child["pid"], signal.SIGTERM)
    (maas_home() / "run" / "stack.json").unlink(missing_ok=True)
    console.print("stopped")


def _gateway_workers() -> list[dict]:
    """The gateway's worker processes, as its primary lists them (none with one worker)."""
    try:
        return json.loads((maas_home() / "run" / "gateway-workers.json").read_text()).get("workers", [])
    except (OSError, ValueError):
        return []


def _gateway_http_addr() -> str:
    """The gateway's HTTP port (MAAS_GATEWAY_HTTP_ADDR); empty when it is off."""
    from services.gateway.config import GatewaySettings

    return GatewaySettings().gateway_http_addr


def _accepts_connections(address: str) -> bool:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection(("127.0.0.1" if host in ("", "0.0.0.0", "::") else host, int(port)), 2):
            return True
    except (OSError, ValueError):
        return False


def status() -> None:
    """Health of every process of the local stack."""
    from services.common.channels import internal_credentials
    from services.stack.config import StackSettings
    from services.stack.supervisor import grpc_serving, managed_redis_password, redis_ready

    # The same credentials the supervisor uses, so that a TLS stack reads as healthy.
    settings = StackSettings()
    credentials = internal_credentials(settings)
    state = read_state()
    if not state:
        console.print("the stack is not running (`maas up --detach` starts it)")
        raise typer.Exit(1)
    table = new_table("service", "address", "pid", "health")
    all_ok = True
    for name, child in state.get("children", {}).items():
        if name == "redis":
            ok = pid_alive(child.get("pid")) and redis_ready(child["address"], managed_redis_password(settings))
        else:
            ok = pid_alive(child.get("pid")) and grpc_serving(child["address"], credentials=credentials)
        all_ok &= ok
        table.add_row(
            name,
            child["address"],
            str(child.get("pid") or "-"),
            Text("SERVING", "green") if ok else Text("DOWN", "red"),
        )
        if name == "gateway" and (http := _gateway_http_addr()):
            listening = _accepts_connections(http)
            all_ok &= listening
            table.add_row("  gateway http", http, "-", Text("LISTENING", "green") if listening else Text("DOWN", "red"))
        if name == "gateway":
            for worker in _gateway_workers():
                alive = pid_alive(worker.get("pid"))
                all_ok &= alive
                table.add_row(
                    f"  gateway worker {worker.get('index')}",
                    child["address"],
                    str(worker.get("pid") or "-"),
                    Text("RUNNING", "green") if alive else Text("DOWN", "red"),
                )
    console.print(f"stack: {state.get('state')} (supervisor pid {state.get('supervisor_pid')})")
    console.print(table)
    if not all_ok:
        raise typer.Exit(1)
