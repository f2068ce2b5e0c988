"""Periodic rounds: at once and then every interval, or first after one interval (wait_first);
a failed round does not stop the next."""

from __future__ import annotations

import asyncio

from services.common.periodic import Periodic


async def test_rounds_start_at_once_or_one_interval_later_and_survive_a_failure():
    calls = {"now": 0, "later": 0}
    second_round, first_later = asyncio.Event(), asyncio.Event()

    async def now() -> None:
        calls["now"] += 1
        if calls["now"] == 2:
            second_round.set()
        raise RuntimeError("a failed round")

    async def later() -> None:
        calls["later"] += 1
        first_later.set()

    rounds = [Periodic("now", now, 0.5), Periodic("later", later, 0.5, wait_first=True)]
    for periodic in rounds:
        periodic.start()
    await asyncio.sleep(0)  # one pass of the loop: each task has run up to its first wait
    assert calls == {"now": 1, "later": 0}
    await asyncio.wait_for(asyncio.gather(second_round.wait(), first_later.wait()), 5)
    for periodic in rounds:
        await periodic.close()
