from __future__ import annotations

import asyncio
from pathlib import Path

from maas.trainer.v1 import trainer_pb2_grpc

from services.common.channels import internal_credentials, open_channel
from services.common.database import make_engine, upgrade
from services.common.interceptors import internal_token_authenticator
from services.common.server import App, RunningServer, ServerSpec, Servicer, server_tls
from services.trainer.config import TrainerSettings
from services.trainer.registry_link import RegistryLink
from services.trainer.runner import launch
from services.trainer.service import Launcher, Trainer
from services.trainer.servicer import TrainerServicer
from services.trainer.store import JobStore

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


async def create_app(settings: TrainerSettings, launcher: Launcher = launch) -> App:
    engine = make_engine(settings.trainer_database_url)
    await asyncio.to_thread(upgrade, engine, MIGRATIONS)
    settings.trainer_jobs_dir.mkdir(parents=True, exist_ok=True)
    registry_channel = open_channel(settings.registry_addr, internal_credentials(settings))
    trainer = Trainer(JobStore(engine), RegistryLink(registry_channel, settings.internal_token), settings, launcher)
    servicer = Servicer(
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server, TrainerServicer(trainer), "maas.trainer.v1.TrainerService"
    )
    spec = ServerSpec(
        service="trainer",
        address=settings.trainer_addr,
        servicers=[servicer],
        authenticate=internal_token_authenticator(settings.internal_token) if settings.internal_token else None,
        max_message_bytes=settings.max_message_bytes,
        tls=server_tls(settings),
    )

    async def start(_: RunningServer) -> None:
        await trainer.start()

    async def stop() -> None:
        await trainer.stop()
        await registry_channel.close()
        engine.dispose()

    return App(spec, on_start=start, on_stop=stop)
