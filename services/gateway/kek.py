"""AdminService.RotateKek: a new key-encryption key for the registry's blobs, for platform admins
only, done by the registry's internal RotateKek (through the proxy, so that its errors reach the
caller as any forwarded call's do)."""

from __future__ import annotations

import grpc
from maas.registry.v1 import registry_pb2

from services.gateway.auth import Caller
from services.gateway.proxy import FORWARDED, Proxy
from services.gateway.service import check_platform_admin

ROTATE_KEK = f"/{FORWARDED['registry'].full_name}/RotateKek"


class KekRotation:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def rotate(self, caller: Caller, context: grpc.aio.ServicerContext) -> registry_pb2.RotateKekResponse:
        check_platform_admin(caller, "rotating the key-encryption key")
        answer = await self.proxy.forward_unary(
            ROTATE_KEK, registry_pb2.RotateKekRequest().SerializeToString(), context
        )
        return registry_pb2.RotateKekResponse.FromString(answer)
