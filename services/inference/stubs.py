"""The python-backend stub processes of one Triton model on this host, found by their command
line, and killed when an unload leaves them behind.

Triton's unload asks each stub to finish; a stub stuck in a model call never does, and it ignores
SIGTERM (the call holds no GIL-checking point), so it would keep its core until its own execution
limit fires. Unloading waits briefly for the stubs to leave, then SIGKILLs what is still there.
A stub that dies (its runner kills itself at the execution limit, or it crashes) is not
restarted by Triton, which answers "Stub process ... is not healthy" from then on; the inference
service looks for READY models without their stubs and reloads them (Deployments.revive_models).
Where Triton runs on another host (MAAS_TRITON_URL) there is nothing here to find: the runner's
execution limit still frees the core, but the model then needs a reload (UpdateDeployment).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

STUB_NAME = b"triton_python_backend_stub"
POLL_SECONDS = 0.2


def stub_pids(model_dir: Path, proc: Path = Path("/proc")) -> list[int]:
    """Processes started as `triton_python_backend_stub <model_dir>/<version>/model.py ...`."""
    return stubs_under(model_dir.parent, proc).get(model_dir.name, [])


def stubs_under(repository: Path, proc: Path = Path("/proc")) -> dict[str, list[int]]:
    """Stub processes of every model in `repository`, by model directory name: one pass over /proc."""
    prefix = os.fsencode(repository) + b"/"
    found: dict[str, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if len(argv) > 1 and STUB_NAME in os.path.basename(argv[0]) and argv[1].startswith(prefix):
            model = os.fsdecode(argv[1][len(prefix) :]).split("/", 1)[0]
            found.setdefault(model, []).append(int(entry.name))
    return found


async def reap_stubs(model_dir: Path, grace_seconds: float) -> int:
    """Wait up to grace_seconds for the model's stubs to exit, then SIGKILL those left; returns
    how many were killed."""
    deadline = time.monotonic() + grace_seconds
    while pids := await asyncio.to_thread(stub_pids, model_dir):
        if time.monotonic() >= deadline:
            killed = 0
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            log.warning("killed model processes an unload left behind", extra={"processes": killed})
            return killed
        await asyncio.sleep(POLL_SECONDS)
    return 0
