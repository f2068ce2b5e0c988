"""A stand-in for the worker process, for unit tests only: it plays scripted events and then
either exits or waits until it is stopped."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

RESULT_SIGNATURE = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [4]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [3]}],
}


class FakeWorker:
    def __init__(self, events: list[dict[str, Any]], exit_code: int | None) -> None:
        self.pid = 0
        self._events = events
        self._exit_code = exit_code  # None: run until stopped
        self._stopped = asyncio.Event()
        self.stop_calls = 0

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        for event in self._events:
            yield dict(event)
        if self._exit_code is None:
            await self._stopped.wait()

    async def wait(self) -> int:
        if self._exit_code is None:
            await self._stopped.wait()
            return -15
        return self._exit_code

    async def stop(self, grace: float) -> None:
        self.stop_calls += 1
        self._stopped.set()


class FakeLauncher:
    """Each launch takes the next script: (events, or a function of the job folder returning
    them; the exit code, or None to run until stopped). With no scripts left, it runs until stopped."""

    def __init__(self, *scripts: tuple[Any, int | None]) -> None:
        self.scripts = list(scripts)
        self.launched: list[tuple[Path, FakeWorker]] = []

    async def __call__(self, folder: Path, workers: int, threads: int) -> FakeWorker:
        events, code = self.scripts.pop(0) if self.scripts else ([], None)
        worker = FakeWorker(events(folder) if callable(events) else events, code)
        self.launched.append((folder, worker))
        return worker


def torchscript_result(folder: Path) -> dict[str, Any]:
    """A real scripted nn.Linear(4, 3) in the job folder, and the result event that names it."""
    import torch

    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 3)), str(folder / "model.pt"))
    return {"type": "result", "artifact": "model.pt", "signature": RESULT_SIGNATURE,
            "metrics": {"test_accuracy": 0.9}, "metadata": {"task": "classification"}}
