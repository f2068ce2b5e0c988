"""Starting, reading and stopping worker processes, and choosing which queued job runs next."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from services.trainer.store import JobRecord
from services.trainer.worker import TRAINER_PID_ENV

log = logging.getLogger(__name__)

WORKER_LOG = "worker.log"
# Event lines are small; a longer line is a runaway print, cut rather than buffered.
MAX_LINE_BYTES = 1024 * 1024


def pick_next(
    queued: Sequence[JobRecord],
    running: Mapping[str, int],
    *,
    global_limit: int,
    tenant_limit: int,
    last_start: Mapping[str, float],
) -> JobRecord | None:
    """The queued job to start now, or None. Fair between tenants: among tenants below their
    limit, the one with the fewest running jobs goes first, ties to the one served longest ago;
    within a tenant, its oldest job. One tenant's long queue never starves another's one job."""
    if sum(running.values()) >= global_limit:
        return None
    oldest: dict[str, JobRecord] = {}
    for job in queued:  # oldest first
        if job.tenant not in oldest and running.get(job.tenant, 0) < tenant_limit:
            oldest[job.tenant] = job
    if not oldest:
        return None
    tenant = min(oldest, key=lambda t: (running.get(t, 0), last_start.get(t, float("-inf")), oldest[t].id))
    return oldest[tenant]


class WorkerProcess:
    """One job's worker, or its torchrun group, in a session of its own."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @property
    def pid(self) -> int:
        return self.process.pid

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The worker's events until its stdout closes; a line that is not an event is a log line."""
        assert self.process.stdout is not None
        while True:
            try:
                line = await self.process.stdout.readline()
            except ValueError:  # a line over the limit
                line = b'{"type": "log", "level": "warning", "message": "(an over-long output line was dropped)"}'
            if not line:
                return
            text = line.decode("utf-8", errors="replace").strip()
            if not text:
                continue
            try:
                event = json.loads(text)
            except json.JSONDecodeError:
                event = None
            if not isinstance(event, dict) or "type" not in event:
                event = {"type": "log", "level": "info", "message": text[:4096]}
            yield event

    async def wait(self) -> int:
        return await self.process.wait()

    async def stop(self, grace: float) -> None:
        """SIGTERM to the group (torchrun passes it to its ranks), SIGKILL after `grace` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), wait)
                return


async def launch(folder: Path, workers: int, threads: int) -> WorkerProcess:
    """Start `python -m services.trainer.worker FOLDER`, under torchrun for several workers."""
    worker = ["-m", "services.trainer.worker", str(folder)]
    if workers > 1:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={workers}", *worker]
    else:
        argv = [sys.executable, *worker]
    env = dict(os.environ)
    env.update({
        TRAINER_PID_ENV: str(os.getpid()),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    })
    with (folder / WORKER_LOG).open("ab") as worker_log:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=worker_log, stdin=asyncio.subprocess.DEVNULL,
            env=env, cwd=folder, start_new_session=True, limit=MAX_LINE_BYTES,
        )
    log.info("worker started", extra={"job_folder": str(folder), "pid": process.pid, "workers": workers})
    return WorkerProcess(process)


def log_tail(folder: Path, lines: int = 5) -> str:
    """The last lines of a worker's log, for a failure message."""
    try:
        text = (folder / WORKER_LOG).read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def running_by_tenant(jobs: Sequence[JobRecord]) -> Counter[str]:
    return Counter(job.tenant for job in jobs)
