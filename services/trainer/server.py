from __future__ import annotations

from maas.trainer.v1 import trainer_pb2_grpc
from services.common.interceptors import internal_token_authenticator
from services.common.server import App, Servicer, ServerSpec, server_tls
from services.trainer.config import TrainerSettings
from services.trainer.servicer import TrainerServicer


async def create_app(settings: TrainerSettings) -> App:
    servicer = Servicer(
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server, TrainerServicer(), "maas.trainer.v1.TrainerService"
    )
    spec = ServerSpec(
        service="trainer",
        address=settings.trainer_addr,
        servicers=[servicer],
        authenticate=internal_token_authenticator(settings.internal_token) if settings.internal_token else None,
        max_message_bytes=settings.max_message_bytes,
        tls=server_tls(settings),
    )
    return App(spec)
