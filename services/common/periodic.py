"""A background round that runs every few seconds until the service stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Periodic:
    """Calls `round_` every `interval_seconds`; a failed round is logged and the next one still
    runs. An interval of 0 or less never starts it (tests drive the round by hand). `wait_first`:
    the first round comes one interval after the start (the caller ran one itself)."""

    def __init__(
        self, name: str, round_: Callable[[], Awaitable[object]], interval_seconds: float, *, wait_first: bool = False
    ) -> None:
        self.name = name
        self.round = round_
        self.interval_seconds = interval_seconds
        self.wait_first = wait_first
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval_seconds > 0:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        if self.wait_first:
            await asyncio.sleep(self.interval_seconds)
        while True:
            try:
                await self.round()
            except Exception:
                log.exception("%s: the round failed; the next one runs as planned", self.name)
            await asyncio.sleep(self.interval_seconds)
