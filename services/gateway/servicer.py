"""gRPC face of AdminService: proto <-> domain only."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from maas.gateway.v1 import admin_pb2, admin_pb2_grpc

from services.common.errors import InvalidArgument
from services.gateway.audit import AuditLog, resource_of
from services.gateway.audited import audited
from services.gateway.auth import current_caller
from services.gateway.fleet import Fleet
from services.gateway.kek import KekRotation
from services.gateway.keys import Role
from services.gateway.service import Admin
from services.gateway.store import (
    QUOTA_FIELDS,
    USAGE_FIELDS,
    AuditFilter,
    AuditRecord,
    KeyRecord,
    QuotaRecord,
    RateLimit,
    TenantRecord,
    UsageRecord,
)

SERVICE = "maas.gateway.v1.AdminService"

ROLE_OF_PROTO = {
    admin_pb2.ROLE_READER: Role.READER,
    admin_pb2.ROLE_DEVELOPER: Role.DEVELOPER,
    admin_pb2.ROLE_ADMIN: Role.ADMIN,
}
PROTO_OF_ROLE = {role: value for value, role in ROLE_OF_PROTO.items()}


# The response names the resource as resolved (a key id prefix: the whole id).
audited_change = audited(SERVICE, lambda request, response: resource_of(response) or resource_of(request))


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, admin: Admin, fleet: Fleet, kek: KekRotation, audit: AuditLog | None = None) -> None:
        self.admin = admin
        self.fleet = fleet
        self.kek = kek
        self.audit = audit

    @audited_change
    async def CreateTenant(self, request, context):
        tenant = await self.admin.create_tenant(request.name, request.display_name, caller=current_caller())
        return admin_pb2.CreateTenantResponse(tenant=tenant_to_proto(tenant))

    async def GetTenant(self, request, context):
        tenant = await self.admin.get_tenant(request.name, caller=current_caller())
        return admin_pb2.GetTenantResponse(tenant=tenant_to_proto(tenant))

    async def ListTenants(self, request, context):
        tenants, next_token = await self.admin.list_tenants(
            request.page_size, request.page_token, caller=current_caller()
        )
        return admin_pb2.ListTenantsResponse(
            tenants=[tenant_to_proto(t) for t in tenants], next_page_token=next_token
        )

    @audited_change
    async def CreateApiKey(self, request, context):
        created = await self.admin.create_key(
            request.tenant, ROLE_OF_PROTO.get(request.role), request.description, caller=current_caller()
        )
        return admin_pb2.CreateApiKeyResponse(api_key=key_to_proto(created.key), plaintext=created.plaintext)

    async def ListApiKeys(self, request, context):
        keys, next_token = await self.admin.list_keys(
            request.tenant, request.page_size, request.page_token, caller=current_caller()
        )
        return admin_pb2.ListApiKeysResponse(
            api_keys=[key_to_proto(k) for k in keys], next_page_token=next_token
        )

    @audited_change
    async def RevokeApiKey(self, request, context):
        key = await self.admin.revoke_key(request.id, caller=current_caller())
        return admin_pb2.RevokeApiKeyResponse(api_key=key_to_proto(key))

    async def WhoAmI(self, request, context):
        key = await self.admin.get_key(current_caller().key_id)
        return admin_pb2.WhoAmIResponse(api_key=key_to_proto(key))

    @audited_change
    async def SetApiKeyRateLimit(self, request, context):
        rate_limit = rate_limit_of(request.rate_limit) if request.HasField("rate_limit") else None
        key = await self.admin.set_key_rate_limit(request.id, rate_limit, caller=current_caller())
        return admin_pb2.SetApiKeyRateLimitResponse(api_key=key_to_proto(key))

    @audited_change
    async def SetQuota(self, request, context):
        budgets = {name: getattr(request.quota, name) for name in QUOTA_FIELDS}
        quota = QuotaRecord(
            request.quota.tenant,
            **budgets,
            rate_limit=rate_limit_of(request.quota.rate_limit),
            max_replicas=request.quota.max_replicas,
        )
        saved = await self.admin.set_quota(quota, request.update_mask.paths, caller=current_caller())
        return admin_pb2.SetQuotaResponse(quota=quota_to_proto(saved))

    async def GetQuota(self, request, context):
        quota = await self.admin.get_quota(request.tenant, caller=current_caller())
        return admin_pb2.GetQuotaResponse(quota=quota_to_proto(quota))

    async def GetUsage(self, request, context):
        rows = await self.admin.get_usage(
            request.tenant, request.api_key_id, request.start_day, request.end_day, caller=current_caller()
        )
        return admin_pb2.GetUsageResponse(rows=[usage_to_proto(row) for row in rows])

    async def ListAuditEvents(self, request, context):
        where = AuditFilter(
            tenant=request.tenant,
            api_key_id=request.api_key_id,
            method=request.method,
            start_time=_datetime("start_time", request.start_time)
            if request.HasField("start_time")
            else None,
            end_time=_datetime("end_time", request.end_time) if request.HasField("end_time") else None,
        )
        events, next_token = await self.admin.list_audit_events(
            where, request.page_size, request.page_token, caller=current_caller()
        )
        return admin_pb2.ListAuditEventsResponse(
            audit_events=[audit_to_proto(e) for e in events], next_page_token=next_token
        )

    async def ListNodes(self, request, context):
        nodes = await self.fleet.list_nodes(current_caller(), context)
        return admin_pb2.ListNodesResponse(nodes=nodes)

    @audited_change
    async def DrainNode(self, request, context):
        node = await self.fleet.drain_node(request.name, current_caller(), context)
        return admin_pb2.DrainNodeResponse(node=node)

    @audited_change
    async def ResumeNode(self, request, context):
        node = await self.fleet.resume_node(request.name, current_caller(), context)
        return admin_pb2.ResumeNodeResponse(node=node)

    @audited_change
    async def RotateKek(self, request, context):
        rotation = await self.kek.rotate(current_caller(), context)
        return admin_pb2.RotateKekResponse(
            rewrapped_keys=rotation.rewrapped_keys,
            kek_id=rotation.kek_id,
            previous_kek_id=rotation.previous_kek_id,
        )


def tenant_to_proto(tenant: TenantRecord) -> admin_pb2.Tenant:
    return admin_pb2.Tenant(
        name=tenant.name, display_name=tenant.display_name, create_time=_timestamp(tenant.create_time)
    )


def key_to_proto(key: KeyRecord) -> admin_pb2.ApiKey:
    proto = admin_pb2.ApiKey(
        id=key.id,
        tenant=key.tenant,
        role=PROTO_OF_ROLE[key.role],
        description=key.description,
        revoked=key.revoked,
        create_time=_timestamp(key.create_time),
    )
    if key.revoke_time is not None:
        proto.revoke_time.CopyFrom(_timestamp(key.revoke_time))
    if key.rate_limit is not None:
        proto.rate_limit.CopyFrom(rate_limit_to_proto(key.rate_limit))
    return proto


def rate_limit_of(proto: admin_pb2.RateLimit) -> RateLimit:
    return RateLimit(proto.requests_per_second, proto.burst, proto.tokens_per_minute)


def rate_limit_to_proto(rate_limit: RateLimit) -> admin_pb2.RateLimit:
    return admin_pb2.RateLimit(
        requests_per_second=rate_limit.requests_per_second,
        burst=rate_limit.burst,
        tokens_per_minute=rate_limit.tokens_per_minute,
    )


def quota_to_proto(quota: QuotaRecord) -> admin_pb2.Quota:
    proto = admin_pb2.Quota(
        tenant=quota.tenant,
        rate_limit=rate_limit_to_proto(quota.rate_limit),
        max_replicas=quota.max_replicas,
        **{name: getattr(quota, name) for name in QUOTA_FIELDS},
    )
    if quota.update_time is not None:
        proto.update_time.CopyFrom(_timestamp(quota.update_time))
    return proto


def usage_to_proto(row: UsageRecord) -> admin_pb2.UsageRow:
    counts = {name: row.counts.get(name, 0) for name in USAGE_FIELDS}
    return admin_pb2.UsageRow(day=row.day, tenant=row.tenant, api_key_id=row.api_key_id, **counts)


def audit_to_proto(event: AuditRecord) -> admin_pb2.AuditEvent:
    return admin_pb2.AuditEvent(
        id=event.id,
        time=_timestamp(event.time),
        tenant=event.tenant,
        api_key_id=event.api_key_id,
        method=event.method,
        resource=event.resource,
        code=event.code,
        bytes=event.bytes,
    )


def _datetime(field: str, stamp: Timestamp) -> datetime:
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(f"{field} is not a valid time") from None


def _timestamp(value) -> Timestamp:  # type: ignore[no-untyped-def]
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp
