"""Several gateway processes on one port, so that the gateway uses every core.

`python -m services.gateway` with MAAS_GATEWAY_WORKERS above 1 runs this primary process: it
checks the port is free, runs the database migrations once, starts the workers (each a whole
gateway: its own route watcher, key and quota caches, Redis link), serves their metrics merged
(Prometheus multiprocess mode) on the gateway's metrics port, restarts a worker that dies, and
stops them all on SIGTERM. The kernel spreads new connections across the workers
(SO_REUSEPORT). What must be exact across workers already is across gateways: limits and quotas
live in Redis, revocation reaches every worker within the key cache's lifetime (1 s)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, multiprocess, start_http_server

from services.common.database import make_engine, upgrade
from services.gateway.config import GatewaySettings
from services.gateway.server import MIGRATIONS

log = logging.getLogger(__name__)

# How long a new primary waits for the port while the workers of one that died let it go.
PORT_WAIT_SECONDS = 15.0
RESTART_BACKOFF_SECONDS = 1.0
PR_SET_PDEATHSIG = 1


@dataclass
class Worker:
    index: int
    process: subprocess.Popen[bytes]
    started: float


def workers_file(settings: GatewaySettings) -> Path:
    """Where the primary lists its workers, for `maas status`."""
    return settings.home / "run" / "gateway-workers.json"


def metrics_dir(settings: GatewaySettings) -> Path:
    return settings.home / "run" / "gateway-metrics"


def die_with_parent(primary_pid: int) -> None:
    """In a worker: be killed when the primary dies unasked (kill -9, a crash), as a one-process
    gateway would be, so that no orphan keeps serving the port. A primary that is stopped
    stops its workers gracefully first."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # The primary died before the line above. Compared with its pid, not with 1: in a container
    # the primary itself is pid 1.
    if os.getppid() != primary_pid:
        sys.exit(0)


def serve_workers(settings: GatewaySettings) -> None:
    _wait_for_port(settings.gateway_addr)
    engine = make_engine(settings.gateway_database_url)
    upgrade(engine, MIGRATIONS)
    engine.dispose()
    metrics = metrics_dir(settings)
    shutil.rmtree(metrics, ignore_errors=True)
    metrics.mkdir(parents=True)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(metrics))
    host, _, port = settings.gateway_metrics_addr.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)

    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
    workers = [_start(index, env) for index in range(settings.gateway_workers)]
    _write_list(settings, workers)
    log.info("gateway workers started", extra={"workers": len(workers), "address": settings.gateway_addr})
    try:
        while not stopping:
            time.sleep(0.2)
            for slot, worker in enumerate(workers):
                if worker.process.poll() is None or stopping:
                    continue
                multiprocess.mark_process_dead(worker.process.pid, str(metrics))
                log.warning(
                    "gateway worker exited; restarting",
                    extra={"worker": worker.index, "code": worker.process.returncode},
                )
                # A worker that dies at once (bad configuration) is not restarted in a busy loop.
                time.sleep(max(0.0, RESTART_BACKOFF_SECONDS - (time.monotonic() - worker.started)))
                workers[slot] = _start(worker.index, env)
                _write_list(settings, workers)
    finally:
        _stop(workers, settings.shutdown_grace_seconds)
        workers_file(settings).unlink(missing_ok=True)
        log.info("gateway workers stopped")


def _start(index: int, env: dict[str, str]) -> Worker:
    process = subprocess.Popen(
        [sys.executable, "-m", "services.gateway", "worker", "--index", str(index), "--primary", str(os.getpid())],
        env=env,
        stdin=subprocess.DEVNULL,
    )
    return Worker(index, process, time.monotonic())


def _stop(workers: list[Worker], grace: float) -> None:
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):
            worker.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace + 5
    for worker in workers:
        try:
            worker.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()


def _write_list(settings: GatewaySettings, workers: list[Worker]) -> None:
    path = workers_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "primary_pid": os.getpid(),
        "address": settings.gateway_addr,
        "workers": [{"index": w.index, "pid": w.process.pid} for w in workers],
    }
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(payload, indent=2))
    temp.replace(path)


def _wait_for_port(address: str) -> None:
    """The workers share the port with each other only: refuse one that anything else holds
    (a plain bind fails while any socket has it). Waits a little for the workers of a primary
    that just died, which leave on their own."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + PORT_WAIT_SECONDS
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As grpc does: connections of an earlier gateway in TIME_WAIT do not hold the port.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, int(port)))
                return
            except OSError as error:
                if time.monotonic() > deadline:
                    raise OSError(f"gateway: cannot listen on {address}: {error}") from None
        time.sleep(0.2)
