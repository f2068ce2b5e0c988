"""Clients and servers share one keepalive policy (services/common/channels.py KEEPALIVE): a
client pinging a quiet call is never answered with GOAWAY too_many_pings. The intervals are
shrunk so that the mismatch of the old options shows within seconds."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.channels import Keepalive

pytestmark = pytest.mark.slow  # ~25 s: a quiet call has to outlast several pings

QUIET_SECONDS = 12.0  # gRPC's default server cut it after about 4 s
IDLE_SECONDS = 5.0
FAST = Keepalive(ping_seconds=0.1, timeout_seconds=1.0)


class QuietHealth(health_pb2_grpc.HealthServicer):
    """Answers after a long silence, like a DeleteDeployment waiting for Triton to unload."""

    async def Check(self, request, context):
        await asyncio.sleep(QUIET_SECONDS)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def quiet_call(server_options: list[tuple[str, int]]) -> health_pb2.HealthCheckResponse:
    server = grpc.aio.server(options=server_options)
    health_pb2_grpc.add_HealthServicer_to_server(QuietHealth(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=FAST.client_options()) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return await stub.Check(health_pb2.HealthCheckRequest(), timeout=QUIET_SECONDS * 3)
    finally:
        await server.stop(0)


async def test_a_quiet_call_outlives_the_pings_of_the_shared_policy():
    reply = await quiet_call(FAST.server_options())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_servers_old_default_policy_cut_the_same_call():
    """The control: a server on gRPC's defaults ends the call with too_many_pings."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await quiet_call([])
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


class Health(health_pb2_grpc.HealthServicer):
    async def Check(self, request, context):
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def states_of_an_idle_channel(server_options: list[tuple[str, int]]) -> set[grpc.ChannelConnectivity]:
    """Connect, stay idle (no call) while the client pings, and record every state the channel took."""
    server = grpc.aio.server(options=server_options)
    health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=FAST.client_options()) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            states = {channel.get_state()}
            deadline = asyncio.get_running_loop().time() + IDLE_SECONDS
            while asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
                states.add(channel.get_state())
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            return states
    finally:
        await server.stop(0)


async def test_an_idle_channel_stays_ready_under_the_shared_policy():
    assert await states_of_an_idle_channel(FAST.server_options()) == {grpc.ChannelConnectivity.READY}


async def test_the_servers_old_default_policy_dropped_the_idle_channel():
    """The control: pings without calls are strikes on gRPC's default server, which ends the connection."""
    assert await states_of_an_idle_channel([]) != {grpc.ChannelConnectivity.READY}
