"""Retraining steps in the audit log. The trainer runs the retraining policies and keeps each step
as an event; the gateway keeps the audit log, and asks (the trainer never calls the gateway).

Every `interval_seconds`, the one gateway process holding the retrain-audit lock among all those
sharing the gateway's database asks the trainer for the events after its cursor (the id of the
last event copied, in the gateway's SQL) and writes them as audit rows in the transaction that
moves the cursor past them. So each event is written exactly once: a process that dies before
that commit wrote none of them and the next round copies them again, and of two processes copying
the same events (the lock handed over mid-round) only the first to move the cursor writes them.
A trainer that does not answer is asked again next round."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC

import grpc
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc

from services.common.interceptors import INTERNAL_TOKEN_KEY
from services.common.leader import LeaderLock
from services.common.periodic import Periodic
from services.gateway.audit import MAX_RESOURCE, event_id
from services.gateway.store import AuditRecord, GatewayStore

log = logging.getLogger(__name__)

# Who the rows name as the caller (no key: the trainer's retrain loop), and the method they record.
RETRAINER = "retrainer"
METHOD = "/maas.trainer.v1.TrainerService/Retrain"
# The cursor's name in the gateway's SQL.
CURSOR = "trainer-retrain-events"
# Events asked for at a time; a round asks until it has them all.
PAGE = 500
CALL_TIMEOUT_SECONDS = 30.0


def audit_row(copied: trainer_pb2.TenantRetrainEvent) -> AuditRecord:
    """A retraining event as an audit row of the event's tenant, at the time of its step. The
    outcome is OK whatever the step: a failed or rejected run says so in the resource."""
    event = copied.event
    when = event.time.ToDatetime(UTC)
    resource = f"{copied.model}: {event.step} ({event.run_id}) {event.message}"
    return AuditRecord(event_id(when), when, copied.tenant, RETRAINER, METHOD, resource[:MAX_RESOURCE], "OK")


class RetrainAudit:
    def __init__(
        self, store: GatewayStore, trainer: grpc.aio.Channel, token: str, lock: LeaderLock, interval_seconds: float
    ) -> None:
        self.store = store
        self.trainer = trainer_pb2_grpc.TrainerServiceStub(trainer)
        self.lock = lock
        # Every tenant's events in one call: it asserts no tenant.
        self._metadata = ((INTERNAL_TOKEN_KEY, token),)
        self._rounds = Periodic("retrain-audit", self.round, interval_seconds)

    def start(self) -> None:
        self._rounds.start()

    async def close(self) -> None:
        await self._rounds.close()
        await self.lock.release()

    async def round(self) -> None:
        if await self.lock.try_acquire():
            await self.copy()

    async def copy(self) -> int:
        """Copy every event the trainer has after the cursor; returns how many this process wrote."""
        copied = 0
        while True:
            after = await asyncio.to_thread(self.store.cursor, CURSOR)
            request = trainer_pb2.ListRetrainEventsRequest(after_id=after, limit=PAGE)
            try:
                response = await self.trainer.ListRetrainEvents(
                    request, metadata=self._metadata, timeout=CALL_TIMEOUT_SECONDS
                )
            except grpc.aio.AioRpcError as error:
                log.warning(
                    "reading the trainer's retraining events failed; asked again next round",
                    extra={"after": after, "error": f"{error.code().name}: {error.details()}"},
                )
                return copied
            events = response.events
            if not events:
                return copied
            rows = [audit_row(event) for event in events]
            if not await asyncio.to_thread(self.store.copy_audit_events, CURSOR, after, events[-1].id, rows):
                log.info("another gateway process copied these retraining events first", extra={"after": after})
                return copied
            copied += len(rows)
            log.info("retraining events copied to the audit log", extra={"events": len(rows), "cursor": events[-1].id})
            if len(events) < PAGE:
                return copied
