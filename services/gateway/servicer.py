"""gRPC face of AdminService: proto <-> domain only."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from maas.gateway.v1 import admin_pb2, admin_pb2_grpc
from services.gateway.auth import current_caller
from services.gateway.keys import Role
from services.gateway.service import Admin
from services.gateway.store import KeyRecord, TenantRecord

ROLE_OF_PROTO = {
    admin_pb2.ROLE_READER: Role.READER,
    admin_pb2.ROLE_DEVELOPER: Role.DEVELOPER,
    admin_pb2.ROLE_ADMIN: Role.ADMIN,
}
PROTO_OF_ROLE = {role: value for value, role in ROLE_OF_PROTO.items()}


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    async def CreateTenant(self, request, context):  # noqa: N802
        tenant = await self.admin.create_tenant(request.name, request.display_name)
        return admin_pb2.CreateTenantResponse(tenant=tenant_to_proto(tenant))

    async def GetTenant(self, request, context):  # noqa: N802
        tenant = await self.admin.get_tenant(request.name)
        return admin_pb2.GetTenantResponse(tenant=tenant_to_proto(tenant))

    async def ListTenants(self, request, context):  # noqa: N802
        tenants, next_token = await self.admin.list_tenants(request.page_size, request.page_token)
        return admin_pb2.ListTenantsResponse(
            tenants=[tenant_to_proto(t) for t in tenants], next_page_token=next_token
        )

    async def CreateApiKey(self, request, context):  # noqa: N802
        created = await self.admin.create_key(
            request.tenant, ROLE_OF_PROTO.get(request.role), request.description
        )
        return admin_pb2.CreateApiKeyResponse(api_key=key_to_proto(created.key), plaintext=created.plaintext)

    async def ListApiKeys(self, request, context):  # noqa: N802
        keys, next_token = await self.admin.list_keys(request.tenant, request.page_size, request.page_token)
        return admin_pb2.ListApiKeysResponse(
            api_keys=[key_to_proto(k) for k in keys], next_page_token=next_token
        )

    async def RevokeApiKey(self, request, context):  # noqa: N802
        key = await self.admin.revoke_key(request.id)
        return admin_pb2.RevokeApiKeyResponse(api_key=key_to_proto(key))

    async def WhoAmI(self, request, context):  # noqa: N802
        key = await self.admin.get_key(current_caller().key_id)
        return admin_pb2.WhoAmIResponse(api_key=key_to_proto(key))


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
    return proto


def _timestamp(value) -> Timestamp:  # type: ignore[no-untyped-def]
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp
