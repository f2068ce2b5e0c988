"""The audit log: every mutating call and every download through the gateway (who, tenant,
method, resource, outcome, when, and for a download the bytes it sent). The row of a change or
of a download that ran to its end is committed to SQL before the call is answered (`commit`);
refusals and abandoned downloads, whose caller waits for nothing, are written in the background
(`record`). The caller is recorded by key id; the key itself never reaches the log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf.message import Message

from services.common.interceptors import status_of
from services.gateway.store import AuditRecord, GatewayStore

log = logging.getLogger(__name__)

MUTATING_PREFIXES = (
    "Create",
    "Upload",
    "Update",
    "Delete",
    "Set",
    "Archive",
    "Cancel",
    "Revoke",
    "Drain",
    "Resume",
    "Define",
    "Finalize",
    "Rotate",
)
# Fields that name what a request acts on, in the order they are looked for.
RESOURCE_FIELDS = ("name", "id", "deployment", "model", "dataset", "tenant", "kek_id")
MAX_RESOURCE = 300
MAX_BATCH = 500
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def is_mutating(method: str) -> bool:
    """Full method path -> whether the call changes something."""
    return method.rpartition("/")[2].startswith(MUTATING_PREFIXES)


def is_download(method: str) -> bool:
    """Full method path -> whether the call hands the caller a model's or dataset's bytes."""
    return method.rpartition("/")[2].startswith("Download")


def is_audited(method: str) -> bool:
    return is_mutating(method) or is_download(method)


def resource_of(message: Message | None, depth: int = 0) -> str:
    """The resource a request names: its name/id field, a nested resource's name, plus the
    version number when one is given (model/3)."""
    if message is None or depth > 2:
        return ""
    fields = message.DESCRIPTOR.fields_by_name
    for field in RESOURCE_FIELDS:
        value = getattr(message, field, None) if field in fields else None
        if isinstance(value, str) and value:
            versioned = field in ("model", "dataset") and "version" in fields
            version = getattr(message, "version", 0) if versioned else 0
            named = f"{value}/{version}" if isinstance(version, int) and version else value
            return named[:MAX_RESOURCE]
    for descriptor, value in message.ListFields():
        if descriptor.message_type is not None and not descriptor.is_repeated:
            found = resource_of(value, depth + 1)
            if found:
                return found
    return ""


def outcome(error: BaseException, context: grpc.aio.ServicerContext) -> str:
    """The status code name a call that raised `error` ends with."""
    if isinstance(error, grpc.aio.AbortError):
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return code.name
        return next((s.name for s in grpc.StatusCode if s.value[0] == code), "UNKNOWN")
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    return status_of(error).name


def event_id(when: datetime) -> str:
    """The id of a row written about `when`: sorts by time (microseconds, hex), unique thanks to
    the random tail."""
    return f"{(when - EPOCH) // timedelta(microseconds=1):016x}{secrets.token_hex(8)}"


class AuditLog:
    def __init__(self, store: GatewayStore) -> None:
        self.store = store
        self._queue: asyncio.Queue[AuditRecord] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

    async def commit(
        self, tenant: str, api_key_id: str, method: str, resource: str, code: str, bytes_sent: int | None = None
    ) -> None:
        """Record a call and wait until its row is in SQL: a change is answered only once its
        audit row would survive a kill of the gateway. Should SQL fail, the row is queued and
        retried in the background, as `record` does, and the call is answered anyway (its
        change is made already)."""
        event = self._event(tenant, api_key_id, method, resource, code, bytes_sent)
        try:
            await asyncio.to_thread(self.store.add_audit_events, [event])
        except Exception:
            log.exception("audit write failed; queued for retry", extra={"method": method})
            self._queue.put_nowait(event)

    def record(
        self, tenant: str, api_key_id: str, method: str, resource: str, code: str, bytes_sent: int | None = None
    ) -> None:
        """Record a refused call or an abandoned download (with `bytes_sent`), written in the
        background (nothing changed that needs it)."""
        self._queue.put_nowait(self._event(tenant, api_key_id, method, resource, code, bytes_sent))

    @staticmethod
    def _event(
        tenant: str, api_key_id: str, method: str, resource: str, code: str, bytes_sent: int | None = None
    ) -> AuditRecord:
        now = datetime.now(UTC)
        event = AuditRecord(
            event_id(now), now, tenant, api_key_id, method, resource[:MAX_RESOURCE], code, bytes_sent
        )
        log.info(
            "audit",
            extra={
                "tenant": tenant,
                "key_id": api_key_id,
                "method": method,
                "resource": resource,
                "code": code,
                "bytes": bytes_sent,
            },
        )
        return event

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write(), name="audit-writer")

    async def flush(self) -> None:
        """Wait until every event recorded so far is in SQL."""
        await self._queue.join()

    async def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.flush(), timeout=5)
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer

    async def _write(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < MAX_BATCH:
                batch.append(self._queue.get_nowait())
            try:
                await self._write_batch(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write_batch(self, batch: list[AuditRecord]) -> None:
        delay = 0.1
        while True:
            try:
                await asyncio.to_thread(self.store.add_audit_events, batch)
                return
            except Exception:
                # The database is away: keep the events and retry rather than drop them.
                log.exception("audit write failed; retrying", extra={"events": len(batch)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
