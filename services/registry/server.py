from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from services.common.database import make_engine, upgrade
from services.common.interceptors import internal_token_authenticator
from services.common.periodic import Periodic
from services.common.server import App, RunningServer, ServerSpec, Servicer, server_tls
from services.registry.blobs import BlobStore, LocalBlobStore
from services.registry.config import RegistrySettings
from services.registry.encryption import BlobEncryption, open_keyring
from services.registry.keys import KekError
from services.registry.service import Registry
from services.registry.servicer import SERVICE, RegistryServicer, add_to_server
from services.registry.storage_usage import StorageMeter
from services.registry.store import RegistryStore

log = logging.getLogger(__name__)

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
    store = RegistryStore(engine)
    try:
        keyring = await asyncio.to_thread(open_keyring, settings.registry_kek_file, store)
    except KekError as error:
        engine.dispose()
        raise SystemExit(f"registry: {error}") from None
    encryption = BlobEncryption(store, keyring, enabled=settings.registry_encryption)
    if keyring.rotating:
        # A rotation was cut short (the process was killed): finish it before serving.
        await asyncio.to_thread(encryption.rotate)
    registry = Registry(
        store,
        blobs,
        encryption=encryption,
        chunk_bytes=settings.registry_chunk_bytes,
        max_artifact_bytes=settings.registry_max_artifact_bytes,
        check_operators=not settings.registry_unsafe_skip_operator_check,
    )
    storage = StorageMeter(store)
    sampling = Periodic("sample-storage", storage.sample, settings.registry_storage_sample_seconds, wait_first=True)
    servicer = Servicer(add_to_server, RegistryServicer(registry, storage), SERVICE)
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

    async def start(_: RunningServer) -> None:
        # One sample as it starts (before serving), then one every interval.
        try:
            await storage.sample()
        except SQLAlchemyError:
            log.exception("sampling storage at start failed; the next round runs as planned")
        sampling.start()

    async def dispose() -> None:
        await sampling.close()
        engine.dispose()

    return App(spec, on_start=start, on_stop=dispose)
