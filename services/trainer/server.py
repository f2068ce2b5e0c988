from __future__ import annotations

import asyncio
from pathlib import Path

from maas.trainer.v1 import trainer_pb2_grpc

from services.common.channels import internal_credentials, open_channel
from services.common.database import make_engine, upgrade
from services.common.interceptors import internal_token_authenticator
from services.common.leader import LeaderLock
from services.common.periodic import Periodic
from services.common.server import App, RunningServer, ServerSpec, Servicer, server_tls
from services.trainer.config import TrainerSettings
from services.trainer.inference_link import InferenceLink
from services.trainer.registry_link import RegistryLink
from services.trainer.retrain import Retrainer
from services.trainer.retrain_eval import ArtifactEvaluator
from services.trainer.retrain_store import RetrainStore
from services.trainer.runner import launch
from services.trainer.service import Launcher, Trainer, new_job_id
from services.trainer.servicer import TrainerServicer
from services.trainer.store import JobStore

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


async def create_app(settings: TrainerSettings, launcher: Launcher = launch) -> App:
    engine = make_engine(settings.trainer_database_url)
    await asyncio.to_thread(upgrade, engine, MIGRATIONS)
    settings.trainer_jobs_dir.mkdir(parents=True, exist_ok=True)
    credentials = internal_credentials(settings)
    registry_channel = open_channel(settings.registry_addr, credentials)
    inference_channel = open_channel(settings.inference_addr, credentials)
    registry = RegistryLink(registry_channel, settings.internal_token)
    trainer = Trainer(JobStore(engine), registry, settings, launcher)
    evaluator = ArtifactEvaluator(registry, settings.trainer_jobs_dir.parent / "evaluations",
                                  settings.trainer_retrain_evaluation_timeout_seconds, settings.threads_per_job())
    retrainer = Retrainer(RetrainStore(engine), registry, InferenceLink(inference_channel, settings.internal_token),
                          trainer, evaluator, new_job_id=new_job_id)
    # Several trainers may share one database: only the one holding this lock runs the retrain loop.
    leader = LeaderLock(settings.trainer_database_url, "trainer-retrain")

    async def retrain_round() -> None:
        if await leader.try_acquire():
            await retrainer.tick()

    retrain_loop = Periodic("trainer-retrain", retrain_round, settings.trainer_retrain_poll_seconds)
    servicer = Servicer(
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server, TrainerServicer(trainer, retrainer),
        "maas.trainer.v1.TrainerService",
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
        retrain_loop.start()

    async def stop() -> None:
        await retrain_loop.close()
        await leader.release()
        await trainer.stop()
        await registry_channel.close()
        await inference_channel.close()
        engine.dispose()

    return App(spec, on_start=start, on_stop=stop)
