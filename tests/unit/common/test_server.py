"""Graceful stop: an in-flight call finishes; health flips to NOT_SERVING first."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc

from services.common.server import ServerSpec, Servicer, start_server


class SlowTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def GetJob(self, request, context):  # noqa: N802
        self.entered.set()
        await asyncio.sleep(0.5)
        return trainer_pb2.GetJobResponse(job=trainer_pb2.Job(id="done"))


async def test_stop_lets_in_flight_calls_finish() -> None:
    slow = SlowTrainer()
    spec = ServerSpec("test", "127.0.0.1:0",
                      [Servicer(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, slow, "maas.trainer.v1.TrainerService")])
    server = await start_server(spec)
    await server.set_serving(True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = trainer_pb2_grpc.TrainerServiceStub(channel).GetJob(trainer_pb2.GetJobRequest())
        await slow.entered.wait()
        stopping = asyncio.create_task(server.stop(grace=5))
        await asyncio.sleep(0.05)
        assert (await server.health.Check(health_pb2.HealthCheckRequest(), None)).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        assert (await call).job.id == "done"
        await stopping

