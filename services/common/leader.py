"""Leader election: one of several replicas of a service acts, the others wait to take over.

The lock lives in the service's own database, so no other system is needed:
- PostgreSQL: a session-level advisory lock (`pg_try_advisory_lock`, 64-bit key derived from the
  lock's name) held on one dedicated connection that stays open while this process leads. The
  server drops the lock when that session ends, so a dead leader's lock goes with it; and a
  leader whose connection fails (or stops answering) has lost the lock and must stop acting.
  The connection must reach the server directly: a transaction-pooling proxy (PgBouncer in
  transaction mode) breaks session-level locks.
- SQLite: an exclusive `flock` on a file beside the database file; the kernel drops it with the
  process. It only elects among processes on one host, which is all SQLite serves anyway.

Use:

    lock = LeaderLock(settings.inference_database_url, "inference")
    await lock.acquire()                  # standbys wait here
    watch = asyncio.create_task(lock.lost())
    ...                                   # act; once `watch` finishes, stop acting (exit)
    await lock.release()
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

T = TypeVar("T")

# libpq keepalives: a leader cut off from the server notices within about half a minute.
PG_CONNECT_ARGS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10,
                   "keepalives_interval": 5, "keepalives_count": 3}


def lock_key(name: str) -> int:
    """The signed 64-bit advisory-lock key for `name` (stable across processes and versions)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def lock_file(database_url: str | URL, name: str) -> Path:
    """<database file>.<name>.lock: where SQLite deployments hold the lock for `name`."""
    database = make_url(database_url).database
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        raise ValueError("leader election needs a SQLite database file to lock beside, not memory")
    path = Path(database).expanduser().resolve()
    return path.with_name(f"{path.name}.{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock")


class _Backend(Protocol):
    """Blocking calls; LeaderLock runs them one at a time in a worker thread."""

    def try_acquire(self) -> bool: ...
    def still_held(self) -> bool: ...
    def release(self) -> None: ...  # never raises


class _PostgresLock:
    def __init__(self, url: URL, key: int) -> None:
        connect_args = PG_CONNECT_ARGS if url.get_driver_name() in ("psycopg", "psycopg2") else {}
        # NullPool: close() really ends the session (and with it the lock); autocommit: the
        # session never sits idle in a transaction for the whole leadership.
        self._engine = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT",
                                     connect_args=connect_args)
        self._key = key
        self._connection: Connection | None = None

    def try_acquire(self) -> bool:
        try:
            if self._connection is None:
                self._connection = self._engine.connect()
            query = text("SELECT pg_try_advisory_lock(:key)")
            return bool(self._connection.execute(query, {"key": self._key}).scalar())
        except SQLAlchemyError:
            self.release()
            raise

    def still_held(self) -> bool:
        if self._connection is None:
            return False
        # A bigint key is stored as (classid, objid) = (high, low 32 bits), objsubid 1.
        query = text(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND pid = pg_backend_pid() AND objsubid = 1"
            " AND CAST(classid AS bigint) = :high AND CAST(objid AS bigint) = :low)"
        )
        unsigned = self._key & 0xFFFF_FFFF_FFFF_FFFF
        params = {"high": unsigned >> 32, "low": unsigned & 0xFFFF_FFFF}
        return bool(self._connection.execute(query, params).scalar())

    def release(self) -> None:
        # Ending the session releases its advisory locks; a broken connection has already lost it.
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None


class _FileLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def still_held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        # Closing the descriptor drops the flock.
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class LeaderLock:
    """The lock `name` in the database at `database_url` (PostgreSQL or SQLite).

    `check_seconds`: how often `lost()` confirms that the lock is still held; a check that fails
    or takes longer than `check_timeout_seconds` counts as lost (the session is then closed, so
    that a standby can take over).
    """

    def __init__(
        self, database_url: str, name: str, *, check_seconds: float = 5.0, check_timeout_seconds: float = 10.0
    ) -> None:
        url = make_url(database_url)
        self.name = name
        self.key = lock_key(name)
        self.check_seconds = check_seconds
        self.check_timeout_seconds = check_timeout_seconds
        backend = url.get_backend_name()
        if backend == "postgresql":
            self._backend: _Backend = _PostgresLock(url, self.key)
        elif backend == "sqlite":
            self._backend = _FileLock(lock_file(url, name))
        else:
            raise ValueError(f"leader election supports PostgreSQL and SQLite, not {backend}")
        # One call at a time on the backend's connection, even when an awaiting caller gave up.
        self._guard = threading.Lock()
        self._ended: asyncio.Event | None = None  # set: the current leadership is over

    @property
    def held(self) -> bool:
        """Whether this process leads, as of the last acquire, check or release."""
        return self._ended is not None and not self._ended.is_set()

    async def try_acquire(self) -> bool:
        """Takes the lock if it is free; True when this process holds it. Database errors raise."""
        if self.held:
            return True
        attempt = self._submit(self._backend.try_acquire)
        try:
            got = await attempt
        except asyncio.CancelledError:
            # The attempt runs on in its thread and may still win: give back whatever it gets.
            self._submit(self._backend.release)
            raise
        if got:
            self._ended = asyncio.Event()
            log.info("leader lock %s acquired", self.name)
        return got

    async def acquire(self, poll_seconds: float = 2.0) -> None:
        """Waits until this process holds the lock, trying every `poll_seconds`; database errors
        are logged and retried (a standby outlives an outage of the database)."""
        waiting = False
        while True:
            try:
                if await self.try_acquire():
                    return
                if not waiting:
                    log.info("leader lock %s is held elsewhere; waiting to take over", self.name)
                    waiting = True
            except (SQLAlchemyError, OSError) as error:
                log.warning("leader lock %s: %s; trying again", self.name, error)
            await asyncio.sleep(poll_seconds)

    async def lost(self) -> None:
        """Returns once this process no longer leads: its connection failed, a check went
        unanswered, or release() was called. Returns at once when the lock is not held."""
        ended = self._ended
        if ended is None:
            return
        while not ended.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), self.check_seconds)
                return
            try:
                still = await self._within_timeout(self._backend.still_held)
            except (TimeoutError, SQLAlchemyError, OSError) as error:
                log.error("leader lock %s: the check failed: %r", self.name, error)
                still = False
            if not still and not ended.is_set():
                log.error("leader lock %s lost: this process must stop acting as the leader", self.name)
                await self.release()

    async def release(self) -> None:
        """Gives the lock up (and stops waiting for it); never raises."""
        if self._ended is not None:
            self._ended.set()
        try:
            await self._within_timeout(self._backend.release)
        except TimeoutError:
            # The release runs on in its thread once the hung call returns.
            log.warning("leader lock %s: release still pending after %.0f s", self.name, self.check_timeout_seconds)

    async def __aenter__(self) -> LeaderLock:
        await self.acquire()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.release()

    def _submit(self, call: Callable[[], T]) -> asyncio.Future[T]:
        """Runs `call` in a worker thread; submitted at once, so it runs even if nobody awaits."""
        return asyncio.get_running_loop().run_in_executor(None, self._guarded, call)

    async def _within_timeout(self, call: Callable[[], T]) -> T:
        # Shielded: past the timeout the call still runs (a queued release must not be dropped).
        return await asyncio.wait_for(asyncio.shield(self._submit(call)), self.check_timeout_seconds)

    def _guarded(self, call: Callable[[], T]) -> T:
        with self._guard:
            return call()
