from __future__ import annotations

import asyncio
from pathlib import Path

from tritonclient.grpc import service_pb2_grpc

from maas.gateway.v1 import admin_pb2_grpc
from services.common.database import make_engine, upgrade
from services.common.server import App, RunningServer, Servicer, ServerSpec, server_tls
from services.gateway import oip, predict
from services.gateway.auth import ApiKeyAuthenticator
from services.gateway.config import GatewaySettings
from services.gateway.proxy import FORWARDED, Backend, Proxy
from services.gateway.routes import RouteTable
from services.gateway.service import Admin
from services.gateway.servicer import AdminServicer
from services.gateway.store import GatewayStore, KeyRecord

MIGRATIONS = Path(__file__).parent / "migrations"


async def open_store(settings: GatewaySettings) -> GatewayStore:
    engine = make_engine(settings.gateway_database_url)
    await asyncio.to_thread(upgrade, engine, MIGRATIONS)
    return GatewayStore(engine)


async def create_app(settings: GatewaySettings) -> App:
    store = await open_store(settings)
    authenticator = ApiKeyAuthenticator(store, settings.auth_cache_seconds)
    admin = Admin(store, on_revoke=authenticator.forget)
    addresses = {
        "registry": settings.registry_addr,
        "inference": settings.inference_addr,
        "trainer": settings.trainer_addr,
    }
    backends = {name: Backend.open(name, addresses[name]) for name in FORWARDED}
    proxy = Proxy(settings.internal_token, backends, served_here={predict.PREDICT_PATH})
    routes = RouteTable(backends["inference"].channel, settings.internal_token, settings.predict_timeout_seconds)
    spec = ServerSpec(
        service="gateway",
        address=settings.gateway_addr,
        servicers=[
            Servicer(
                admin_pb2_grpc.add_AdminServiceServicer_to_server,
                AdminServicer(admin),
                "maas.gateway.v1.AdminService",
            ),
            # Predict alone; the proxy below serves the rest of InferenceService.
            Servicer(predict.add_to_server, predict.PredictHandler(routes, proxy), predict.SERVICE),
            Servicer(
                service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
                oip.OipServicer(routes),
                oip.SERVICE,
            ),
        ],
        authenticate=authenticator,
        max_message_bytes=settings.max_message_bytes,
        generic_handlers=[proxy],
        generic_service_names=[service.full_name for service in FORWARDED.values()],
        tls=server_tls(settings),
    )

    async def on_start(_: RunningServer) -> None:
        routes.start()

    async def on_stop() -> None:
        await routes.close()
        for backend in backends.values():
            await backend.close()
        store.engine.dispose()

    return App(spec, on_start=on_start, on_stop=on_stop)


async def bootstrap_admin(settings: GatewaySettings, key_file: Path, force: bool = False) -> KeyRecord | None:
    store = await open_store(settings)
    try:
        return await Admin(store).bootstrap_admin(key_file, force=force)
    finally:
        store.engine.dispose()
