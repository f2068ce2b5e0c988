"""The serving fleet's admin face: AdminService.ListNodes, DrainNode and ResumeNode, for platform
admins only, answered by the inference service's internal FleetService (through the proxy, so
that its errors reach the caller as any forwarded call's do)."""

from __future__ import annotations

from typing import TypeVar

import grpc
from google.protobuf.message import Message
from maas.inference.v1 import inference_pb2

from services.gateway.auth import Caller
from services.gateway.proxy import CALLED_FOR_HANDLERS, Proxy
from services.gateway.service import check_platform_admin

FLEET_SERVICE = CALLED_FOR_HANDLERS["inference"].full_name
Response = TypeVar("Response", bound=Message)


class Fleet:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def list_nodes(self, caller: Caller, context: grpc.aio.ServicerContext) -> list[inference_pb2.Node]:
        check_platform_admin(caller, "listing the serving fleet's nodes")
        answer = await self._call(
            "ListNodes", inference_pb2.ListNodesRequest(), inference_pb2.ListNodesResponse, context
        )
        return list(answer.nodes)

    async def drain_node(
        self, name: str, caller: Caller, context: grpc.aio.ServicerContext
    ) -> inference_pb2.Node:
        check_platform_admin(caller, "draining a node")
        answer = await self._call(
            "DrainNode", inference_pb2.DrainNodeRequest(name=name), inference_pb2.DrainNodeResponse, context
        )
        return answer.node

    async def resume_node(
        self, name: str, caller: Caller, context: grpc.aio.ServicerContext
    ) -> inference_pb2.Node:
        check_platform_admin(caller, "resuming a node")
        answer = await self._call(
            "ResumeNode",
            inference_pb2.ResumeNodeRequest(name=name),
            inference_pb2.ResumeNodeResponse,
            context,
        )
        return answer.node

    async def _call(
        self, method: str, request: Message, response_class: type[Response], context: grpc.aio.ServicerContext
    ) -> Response:
        path = f"/{FLEET_SERVICE}/{method}"
        return response_class.FromString(
            await self.proxy.forward_unary(path, request.SerializeToString(), context)
        )
