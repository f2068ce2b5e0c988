from __future__ import annotations

import asyncio
from pathlib import Path

from services.common.database import make_engine, upgrade
from services.common.interceptors import internal_token_authenticator
from services.common.server import App, ServerSpec, Servicer, server_tls
from services.registry.blobs import BlobStore, LocalBlobStore
from services.registry.config import RegistrySettings
from services.registry.service import Registry
from services.registry.servicer import SERVICE, RegistryServicer, add_to_server
from services.registry.store import RegistryStore

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def open_blob_store(settings: RegistrySettings) -> BlobStore:
    if not settings.registry_s3_bucket:
        return LocalBlobStore(settings.registry_blob_dir)
    # Imported here: boto3 is needed only by registries that use a bucket.
    from services.registry.s3_blobs import S3BlobStore

    return S3BlobStore(
        settings.registry_s3_bucket,
        settings.registry_blob_dir / "tmp",
        prefix=settings.registry_s3_prefix,
        endpoint_url=settings.registry_s3_endpoint_url,
        region=settings.registry_s3_region,
    )


async def create_app(settings: RegistrySettings) -> App:
    engine = make_engine(settings.registry_database_url)
    await asyncio.to_thread(upgrade, engine, MIGRATIONS)
    blobs = open_blob_store(settings)
    blobs.sweep_temps()
    registry = Registry(
        RegistryStore(engine),
        blobs,
        chunk_bytes=settings.registry_chunk_bytes,
        max_artifact_bytes=settings.registry_max_artifact_bytes,
        check_operators=not settings.registry_unsafe_skip_operator_check,
    )
    servicer = Servicer(add_to_server, RegistryServicer(registry), SERVICE)
    spec = ServerSpec(
        service="registry",
        address=settings.registry_addr,
        servicers=[servicer],
        authenticate=internal_token_authenticator(settings.internal_token)
        if settings.internal_token
        else None,
        max_message_bytes=settings.max_message_bytes,
        tls=server_tls(settings),
    )

    async def dispose() -> None:
        engine.dispose()

    return App(spec, on_stop=dispose)
