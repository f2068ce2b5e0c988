"""SingleFlight: concurrent misses of one key share one lookup, and its error."""

from __future__ import annotations

import asyncio

import pytest

from services.common.single_flight import SingleFlight


async def test_concurrent_callers_share_one_lookup_and_a_later_one_runs_again():
    flights: SingleFlight[str] = SingleFlight()
    calls = 0

    async def lookup() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return f"answer {calls}"

    answers = await asyncio.gather(*(flights.run("key", lookup) for _ in range(16)))
    assert answers == ["answer 1"] * 16 and calls == 1
    assert await flights.run("key", lookup) == "answer 2"
    assert await flights.run("other", lookup) == "answer 3"


async def test_an_error_reaches_every_caller_and_is_not_kept():
    flights: SingleFlight[str] = SingleFlight()
    failing = True

    async def lookup() -> str:
        await asyncio.sleep(0.01)
        if failing:
            raise OSError("database away")
        return "back"

    results = await asyncio.gather(*(flights.run("key", lookup) for _ in range(4)), return_exceptions=True)
    assert all(isinstance(result, OSError) for result in results)
    failing = False
    assert await flights.run("key", lookup) == "back"


async def test_a_cancelled_caller_leaves_the_lookup_to_the_others():
    flights: SingleFlight[str] = SingleFlight()
    started = asyncio.Event()

    async def lookup() -> str:
        started.set()
        await asyncio.sleep(0.05)
        return "done"

    first = asyncio.create_task(flights.run("key", lookup))
    await started.wait()
    second = asyncio.create_task(flights.run("key", lookup))
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second == "done"
