"""Versions and their artifacts, from the registry service into a local cache keyed by sha256."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from maas.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.channels import internal_metadata
from services.common.errors import DataLoss, Unavailable
from services.common.remote_errors import domain_error

log = logging.getLogger(__name__)

SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Waits between tries while the registry is unavailable (it may still be starting up).
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)


class Registry:
    """The registry calls this service makes, on the caller's tenant."""

    def __init__(self, channel: grpc.aio.Channel, token: str, timeout: float) -> None:
        self._stub = registry_pb2_grpc.RegistryServiceStub(channel)
        self._token = token
        self._timeout = timeout

    async def get_version(
        self, tenant: str, model: str, version: int | None, alias: str | None
    ) -> registry_pb2.Version:
        """The version a deployment targets; NotFound when the model, version or alias is missing."""
        request = registry_pb2.GetVersionRequest(model=model, alias=alias or "")
        if version is not None:
            request.version = version
        try:
            response = await self._stub.GetVersion(
                request, metadata=internal_metadata(self._token, tenant), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            raise domain_error("the registry", exc) from None
        return response.version

    async def chunks(self, tenant: str, model: str, version: int) -> AsyncIterator[bytes]:
        """The artifact's bytes as the registry streams them."""
        call = self._stub.DownloadVersion(
            registry_pb2.DownloadVersionRequest(model=model, version=version),
            metadata=internal_metadata(self._token, tenant),
            timeout=self._timeout,
        )
        try:
            async for part in call:
                if part.HasField("chunk"):
                    yield part.chunk
        except grpc.aio.AioRpcError as exc:
            raise domain_error("the registry", exc) from None


class ArtifactCache:
    """<root>/<sha256>: each artifact downloaded once, verified, then shared by every deployment."""

    def __init__(
        self, root: Path, registry: Registry, retry_delays: tuple[float, ...] = RETRY_DELAYS
    ) -> None:
        self.root = root
        self.registry = registry
        self.retry_delays = retry_delays
        self._locks: dict[str, asyncio.Lock] = {}
        root.mkdir(parents=True, exist_ok=True)

    async def fetch(self, tenant: str, model: str, version: int, sha256: str) -> Path:
        if not SHA256.match(sha256):
            raise DataLoss(f"version {version} of model {model!r} has no valid sha256 in the registry")
        path = self.root / sha256
        if path.exists():
            return path
        async with self._locks.setdefault(sha256, asyncio.Lock()):
            tries = 0
            while not path.exists():
                try:
                    await self._download(tenant, model, version, sha256, path)
                except Unavailable as exc:
                    if tries == len(self.retry_delays):
                        raise
                    log.warning("registry unavailable; retrying the download", extra={"error": str(exc)})
                    await asyncio.sleep(self.retry_delays[tries])
                    tries += 1
        return path

    def prune(self, keep: set[str]) -> None:
        """Drop artifacts no deployment uses and partial downloads a crash left behind."""
        for entry in self.root.iterdir():
            if entry.name not in keep:
                entry.unlink(missing_ok=True)

    async def _download(self, tenant: str, model: str, version: int, sha256: str, path: Path) -> None:
        partial = self.root / f".{sha256}.{uuid.uuid4().hex[:8]}.part"
        hasher = hashlib.sha256()
        try:
            with open(partial, "wb") as destination:
                async for chunk in self.registry.chunks(tenant, model, version):
                    hasher.update(chunk)
                    destination.write(chunk)
            if hasher.hexdigest() != sha256:
                raise DataLoss(
                    f"the artifact of {model!r} version {version} arrived with sha256 {hasher.hexdigest()}, "
                    f"the registry records {sha256}"
                )
            partial.rename(path)
        finally:
            partial.unlink(missing_ok=True)
