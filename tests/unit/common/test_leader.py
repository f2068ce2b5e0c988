"""LeaderLock: of two processes sharing a database, one leads and the other waits until it lets go
(or loses its session), on SQLite (a flock beside the file) and on a real PostgreSQL server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from services.common.leader import LeaderLock, lock_file, lock_key

POLL = 0.05
# Long enough for several polls of a waiting lock; short enough to keep the suite quick.
STILL_WAITING = 0.4


async def assert_second_waits_for_first(url: str) -> None:
    first = LeaderLock(url, "inference")
    second = LeaderLock(url, "inference")
    await first.acquire(poll_seconds=POLL)
    assert first.held
    waiting = asyncio.create_task(second.acquire(poll_seconds=POLL))
    try:
        await asyncio.sleep(STILL_WAITING)
        assert not waiting.done() and not second.held
        assert await LeaderLock(url, "inference").try_acquire() is False

        await first.release()
        assert not first.held
        await asyncio.wait_for(waiting, 5)
        assert second.held and not first.held
        assert await first.try_acquire() is False
    finally:
        waiting.cancel()
        await first.release()
        await second.release()


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'inference.db'}"


async def test_sqlite_second_lock_waits_until_the_first_releases(tmp_path: Path) -> None:
    await assert_second_waits_for_first(sqlite_url(tmp_path))
    assert lock_file(sqlite_url(tmp_path), "inference") == tmp_path / "inference.db.inference.lock"


async def test_sqlite_locks_of_other_names_do_not_conflict(tmp_path: Path) -> None:
    async with LeaderLock(sqlite_url(tmp_path), "inference") as one:
        async with LeaderLock(sqlite_url(tmp_path), "trainer") as other:
            assert one.held and other.held


async def test_a_cancelled_wait_leaves_no_lock_behind(tmp_path: Path) -> None:
    first, second = LeaderLock(sqlite_url(tmp_path), "x"), LeaderLock(sqlite_url(tmp_path), "x")
    await first.acquire(poll_seconds=POLL)
    waiting = asyncio.create_task(second.acquire(poll_seconds=POLL))
    await asyncio.sleep(STILL_WAITING)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await first.release()
    third = LeaderLock(sqlite_url(tmp_path), "x")
    assert await third.try_acquire()
    await third.release()


async def test_lost_returns_on_release_and_at_once_when_not_held(tmp_path: Path) -> None:
    lock = LeaderLock(sqlite_url(tmp_path), "x", check_seconds=POLL)
    await asyncio.wait_for(lock.lost(), 1)  # never held
    await lock.acquire()
    watch = asyncio.create_task(lock.lost())
    await asyncio.sleep(STILL_WAITING)
    assert not watch.done()  # a flock is not lost while the process lives
    await lock.release()
    await asyncio.wait_for(watch, 1)


def test_keys_are_stable_signed_64_bit_and_differ_by_name() -> None:
    assert lock_key("inference") == lock_key("inference") != lock_key("trainer")
    assert -(2**63) <= lock_key("inference") < 2**63


def test_unsupported_databases_are_refused() -> None:
    with pytest.raises(ValueError, match="memory"):
        LeaderLock("sqlite://", "x")
    with pytest.raises(ValueError, match="mysql"):
        LeaderLock("mysql://maas@db/maas", "x")


@pytest.mark.postgres
async def test_postgres_second_lock_waits_until_the_first_releases(postgres_url: str) -> None:
    await assert_second_waits_for_first(postgres_url)


@pytest.mark.postgres
async def test_postgres_leadership_is_lost_with_its_session(postgres_url: str) -> None:
    """The server ends the leader's session (a restart, a network cut, an admin): lost() returns
    and a standby takes over."""
    leader = LeaderLock(postgres_url, "inference", check_seconds=POLL, check_timeout_seconds=5)
    standby = LeaderLock(postgres_url, "inference")
    await leader.acquire(poll_seconds=POLL)
    watch = asyncio.create_task(leader.lost())
    waiting = asyncio.create_task(standby.acquire(poll_seconds=POLL))
    try:
        await asyncio.sleep(STILL_WAITING)
        assert not watch.done() and not waiting.done()  # checks pass while the session lives

        database = postgres_url.rsplit("/", 1)[1]
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{database}", autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks"
                " WHERE locktype = 'advisory' AND granted AND database ="
                " (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchall()
        assert killed == [(True,)]

        await asyncio.wait_for(watch, 5)
        assert not leader.held
        await asyncio.wait_for(waiting, 5)
        assert standby.held
    finally:
        watch.cancel()
        waiting.cancel()
        await leader.release()
        await standby.release()
