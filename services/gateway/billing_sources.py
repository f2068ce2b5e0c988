"""Where an invoice's quantities come from: what the gateway metered itself (requests, tokens,
training time), the bytes the registry stores for the tenant, and the replica time its
deployments held in the inference service. Each answers rows per UTC day, resource and tier;
an invoice is computed only when every source answered, never from part of the usage."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc
from maas.inference.v1 import inference_pb2, inference_pb2_grpc
from maas.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.channels import internal_metadata
from services.common.errors import Unavailable
from services.gateway.billing import STORAGE
from services.gateway.store import BillableRecord, GatewayStore

REPLICA_SECONDS = "replica_seconds"
# How long a usage source may take to answer before the invoice is refused as unavailable.
SOURCE_TIMEOUT_SECONDS = 30.0


class UsageSource(Protocol):
    async def daily_usage(self, tenant: str, first_day: str, last_day: str) -> list[BillableRecord]:
        """The tenant's usage between two UTC days (YYYY-MM-DD, inclusive)."""
        ...


class MeteredUsage:
    """The gateway's own billable_usage rows, after what this process still holds in memory or
    Redis is flushed to SQL (as GetUsage does), so that an invoice reads its own calls."""

    def __init__(self, store: GatewayStore, flush: Callable[[], Awaitable[None]] | None = None) -> None:
        self.store = store
        self.flush = flush

    async def daily_usage(self, tenant: str, first_day: str, last_day: str) -> list[BillableRecord]:
        if self.flush is not None:
            await self.flush()
        return await asyncio.to_thread(self.store.billable_usage, tenant, first_day, last_day)


class StorageUsage:
    """The registry's daily samples of the bytes a tenant stores: a day's bytes are its byte-days."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self.registry = registry_pb2_grpc.RegistryServiceStub(channel)
        self.token = token

    async def daily_usage(self, tenant: str, first_day: str, last_day: str) -> list[BillableRecord]:
        request = registry_pb2.GetStorageUsageRequest(start_day=first_day, end_day=last_day)
        try:
            answer = await self.registry.GetStorageUsage(
                request, metadata=internal_metadata(self.token, tenant), timeout=SOURCE_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as error:
            raise _unavailable("the registry", "storage", tenant, error) from None
        return [BillableRecord(day.day, tenant, STORAGE, "", day.bytes) for day in answer.days]


class ReplicaUsage:
    """The seconds replicas of the tenant's deployments were READY, per day and version tier."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self.inference = inference_pb2_grpc.InferenceServiceStub(channel)
        self.token = token

    async def daily_usage(self, tenant: str, first_day: str, last_day: str) -> list[BillableRecord]:
        request = inference_pb2.GetReplicaUsageRequest(start_day=first_day, end_day=last_day)
        try:
            answer = await self.inference.GetReplicaUsage(
                request, metadata=internal_metadata(self.token, tenant), timeout=SOURCE_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as error:
            raise _unavailable("the inference service", "replica", tenant, error) from None
        return [
            BillableRecord(row.day, tenant, REPLICA_SECONDS, row.tier, row.replica_seconds)
            for row in answer.rows
        ]


def _unavailable(service: str, what: str, tenant: str, error: grpc.aio.AioRpcError) -> Unavailable:
    return Unavailable(
        f"{service} did not answer the {what} usage of tenant {tenant!r} "
        f"({error.code().name}: {(error.details() or '')[:200]}); an invoice needs all of its usage: "
        f"retry once {service} is back"
    )
