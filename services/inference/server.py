from __future__ import annotations

import asyncio
from pathlib import Path

from maas.inference.v1 import inference_pb2_grpc

from services.common.channels import internal_credentials, open_channel, triton_credentials
from services.common.database import make_engine, upgrade
from services.common.interceptors import internal_token_authenticator
from services.common.server import App, RunningServer, ServerSpec, Servicer, server_tls
from services.inference.artifacts import ArtifactCache, Registry
from services.inference.caps import TenantCaps
from services.inference.config import InferenceSettings
from services.inference.deployments import Deployments, gpu_on_this_host
from services.inference.load import LoadReporter
from services.inference.repository import ModelRepository
from services.inference.servicer import InferenceServicer, RoutingServicer
from services.inference.store import DeploymentStore
from services.inference.triton import TritonClient, TritonSupervisor, TritonTls

MIGRATIONS = Path(__file__).parent / "migrations"
# How often the service looks for served models whose processes died (its own Triton only).
STUB_CHECK_SECONDS = 1.0


def triton_tls(settings: InferenceSettings) -> TritonTls | None:
    """The certificate our own Triton serves, when its port speaks TLS."""
    if settings.triton_url or not settings.uses_triton_tls:
        return None
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise ValueError("MAAS_TRITON_TLS=true for our own Triton needs MAAS_TLS_CERT_FILE and MAAS_TLS_KEY_FILE")
    return TritonTls(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)


async def create_app(settings: InferenceSettings) -> App:
    engine = make_engine(settings.inference_database_url)
    await asyncio.to_thread(upgrade, engine, MIGRATIONS)
    directory = settings.directory
    registry_channel = open_channel(settings.registry_addr, internal_credentials(settings))
    registry = Registry(registry_channel, settings.internal_token, settings.model_load_timeout_seconds)
    triton = TritonClient(settings.triton_address, settings.triton_token, triton_credentials(settings))
    deployments = Deployments(
        store=DeploymentStore(engine),
        registry=registry,
        artifacts=ArtifactCache(directory / "artifacts", registry),
        repository=ModelRepository(directory / "models", directory / "staging"),
        triton=triton,
        gpu_available=gpu_on_this_host() if settings.gpu_available is None else settings.gpu_available,
        load_timeout=settings.model_load_timeout_seconds,
        load_concurrency=settings.model_load_concurrency,
        predict_timeout=settings.predict_timeout_seconds,
        cold_start_wait=settings.cold_start_wait_seconds,
        drain_seconds=settings.rollout_drain_seconds,
        alias_poll_interval=settings.alias_poll_seconds,
        canary_check_interval=settings.canary_check_seconds,
        # Only a Triton on this host has its model processes where the service can see them.
        stub_check_interval=0.0 if settings.triton_url else STUB_CHECK_SECONDS,
        execution_limit=settings.inference_execution_limit_seconds,
        caps=TenantCaps(
            max_deployments=settings.inference_max_deployments_per_tenant,
            max_memory_mb=settings.inference_max_memory_per_tenant_mb,
        ),
    )
    await deployments.converger.restore()
    loads = LoadReporter(deployments, triton, settings.metrics_url, settings.load_refresh_seconds)
    supervisor = TritonSupervisor(
        directory=directory,
        client=triton,
        external=bool(settings.triton_url),
        grpc_port=settings.triton_grpc_port,
        http_port=settings.triton_http_port,
        metrics_port=settings.triton_metrics_port,
        start_timeout=settings.triton_start_timeout_seconds,
        on_start=deployments.converger.reconcile,
        on_exit=deployments.converger.triton_down,
        token=settings.triton_token,
        fence_models=settings.model_fence == "required",
        tls=triton_tls(settings),
    )

    async def on_start(server: RunningServer) -> None:
        # Health stays NOT_SERVING until this returns: Triton up, deployments reloading into it.
        await supervisor.start()
        deployments.start_watching()
        loads.start()

    async def on_stop() -> None:
        await loads.close()
        await deployments.close()
        await supervisor.stop()
        await triton.close()
        await registry_channel.close()
        engine.dispose()

    spec = ServerSpec(
        service="inference",
        address=settings.inference_addr,
        servicers=[
            Servicer(
                inference_pb2_grpc.add_InferenceServiceServicer_to_server,
                InferenceServicer(deployments, loads),
                "maas.inference.v1.InferenceService",
            ),
            Servicer(
                inference_pb2_grpc.add_RoutingServiceServicer_to_server,
                RoutingServicer(deployments),
                "maas.inference.v1.RoutingService",
            ),
        ],
        authenticate=internal_token_authenticator(settings.internal_token)
        if settings.internal_token
        else None,
        max_message_bytes=settings.max_message_bytes,
        tls=server_tls(settings),
    )
    return App(spec, on_start=on_start, on_stop=on_stop)
