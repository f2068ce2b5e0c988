"""The registry's domain logic: plain Python, no gRPC. Raises services.common.errors.*.

Uploads stream into the blob store chunk by chunk (never whole in memory), and a version or
dataset version row is inserted only after its bytes are verified, checked and committed.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from maas.common.v1 import common_pb2

from services.common.errors import DataLoss, InvalidArgument, ResourceExhausted
from services.common.tensors import check_signature
from services.common.validation import Page, check_name
from services.registry import torchscript_ops
from services.registry.artifacts import check_artifact, check_dataset
from services.registry.blobs import BlobStore, BlobWriter, Chunk
from services.registry.store import (
    AliasRecord,
    ArtifactFormat,
    DatasetFormat,
    DatasetRecord,
    DatasetVersionRecord,
    Lineage,
    ModelRecord,
    NewVersion,
    RegistryStore,
    VersionRecord,
)

T = TypeVar("T")
R = TypeVar("R")

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MAX_DESCRIPTION_CHARS = 4096
MAX_MAP_ENTRIES = 64
MAX_KEY_CHARS = 128
MAX_VALUE_CHARS = 4096
# An upload's chunks waiting while the previous ones are written: past this, receiving waits.
MAX_WAITING_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class VersionUpload:
    """The header of an UploadVersion stream."""

    model: str
    format: ArtifactFormat | None  # None: the caller did not say
    signature: common_pb2.Signature
    sha256: str
    size_bytes: int
    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    lineage: Lineage = field(default_factory=Lineage)
    precision: str = ""


class Registry:
    def __init__(
        self,
        store: RegistryStore,
        blobs: BlobStore,
        *,
        chunk_bytes: int,
        max_artifact_bytes: int,
        check_operators: bool = True,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._chunk_bytes = chunk_bytes
        self._max_artifact_bytes = max_artifact_bytes
        self._check_operators = check_operators
        self._content_locks = _KeyedLocks()

    # Models

    async def create_model(
        self, tenant: str, name: str, description: str, labels: dict[str, str]
    ) -> ModelRecord:
        check_name("model", name)
        _check_text("description", description, MAX_DESCRIPTION_CHARS)
        _check_map("labels", labels)
        return await asyncio.to_thread(self._store.create_model, tenant, name, description, labels)

    async def get_model(self, tenant: str, name: str) -> ModelRecord:
        check_name("model", name)
        return await asyncio.to_thread(self._store.get_model, tenant, name)

    async def list_models(
        self, tenant: str, page_size: int, page_token: str
    ) -> tuple[list[ModelRecord], str]:
        page = Page.parse(page_size, page_token)
        models = await asyncio.to_thread(self._store.list_models, tenant, page.after, page.size + 1)
        return _paged(models, page, lambda model: model.name)

    async def delete_model(self, tenant: str, name: str) -> None:
        check_name("model", name)
        await asyncio.to_thread(self._delete_model, tenant, name)

    def _delete_model(self, tenant: str, name: str) -> None:
        for sha256 in self._store.delete_model(tenant, name):
            self._delete_blob_if_unused(sha256)

    # Versions

    async def upload_version(
        self, tenant: str, header: VersionUpload, chunks: AsyncIterator[Chunk]
    ) -> VersionRecord:
        artifact_format = _check_version_upload(header)
        self._check_declared_bytes(header.sha256, header.size_bytes)
        await asyncio.to_thread(self._store.get_model, tenant, header.model)
        if artifact_format is ArtifactFormat.TORCHSCRIPT and self._check_operators:
            # The operator check's zygote, if not running, starts while the bytes arrive.
            await asyncio.to_thread(torchscript_ops.warm_up)
        new = NewVersion(
            format=artifact_format,
            signature=header.signature.SerializeToString(deterministic=True),
            sha256=header.sha256,
            size_bytes=header.size_bytes,
            metrics=dict(header.metrics),
            metadata=dict(header.metadata),
            lineage=header.lineage,
            precision=header.precision,
        )
        return await self._receive(
            chunks,
            header.sha256,
            header.size_bytes,
            lambda path: check_artifact(artifact_format, path, check_operators=self._check_operators),
            lambda: self._store.add_version(tenant, header.model, new),
        )

    async def get_version(self, tenant: str, model: str, version: int | None, alias: str) -> VersionRecord:
        check_name("model", model)
        if version is not None and alias:
            raise InvalidArgument("set only one of version and alias to select the version")
        if alias:
            check_name("alias", alias)
            return await asyncio.to_thread(self._store.resolve_alias, tenant, model, alias)
        if version is None:
            raise InvalidArgument("set version or alias to select the version")
        _check_version_number(version)
        return await asyncio.to_thread(self._store.get_version, tenant, model, version)

    async def list_versions(
        self, tenant: str, model: str, page_size: int, page_token: str
    ) -> tuple[list[VersionRecord], str]:
        check_name("model", model)
        page = Page.parse(page_size, page_token)
        versions = await asyncio.to_thread(
            self._store.list_versions, tenant, model, _version_after(page), page.size + 1
        )
        return _paged(versions, page, lambda version: str(version.version))

    async def archive_version(self, tenant: str, model: str, version: int) -> VersionRecord:
        check_name("model", model)
        _check_version_number(version)
        return await asyncio.to_thread(self._store.archive_version, tenant, model, version)

    async def download_version(
        self, tenant: str, model: str, version: int
    ) -> tuple[VersionRecord, AsyncGenerator[bytes, None]]:
        """The version, and its bytes in chunks. Close the generator if you stop early."""
        check_name("model", model)
        _check_version_number(version)
        record = await asyncio.to_thread(self._store.get_version, tenant, model, version)
        stream = await asyncio.to_thread(
            self._open_blob, record.sha256, f"version {version} of model {model!r}"
        )
        return record, self._chunks_of(stream)

    # Aliases

    async def set_alias(self, tenant: str, model: str, alias: str, version: int) -> AliasRecord:
        check_name("model", model)
        check_name("alias", alias)
        _check_version_number(version)
        return await asyncio.to_thread(self._store.set_alias, tenant, model, alias, version)

    async def delete_alias(self, tenant: str, model: str, alias: str) -> None:
        check_name("model", model)
        check_name("alias", alias)
        await asyncio.to_thread(self._store.delete_alias, tenant, model, alias)

    # Datasets

    async def create_dataset(
        self, tenant: str, name: str, description: str, format: DatasetFormat | None, target_column: str
    ) -> DatasetRecord:
        check_name("dataset", name)
        _check_text("description", description, MAX_DESCRIPTION_CHARS)
        if format is None:
            raise InvalidArgument("format is required: NPZ (arrays X and y) or CSV (with a target column)")
        if format is DatasetFormat.CSV and not target_column:
            raise InvalidArgument("a CSV dataset needs target_column: the header column to predict")
        if format is DatasetFormat.NPZ and target_column:
            raise InvalidArgument(
                "target_column applies to CSV datasets only; an NPZ dataset predicts its array y"
            )
        _check_text("target_column", target_column, 256)
        return await asyncio.to_thread(
            self._store.create_dataset, tenant, name, description, format, target_column
        )

    async def get_dataset(self, tenant: str, name: str) -> DatasetRecord:
        check_name("dataset", name)
        return await asyncio.to_thread(self._store.get_dataset, tenant, name)

    async def list_datasets(
        self, tenant: str, page_size: int, page_token: str
    ) -> tuple[list[DatasetRecord], str]:
        page = Page.parse(page_size, page_token)
        datasets = await asyncio.to_thread(self._store.list_datasets, tenant, page.after, page.size + 1)
        return _paged(datasets, page, lambda dataset: dataset.name)

    async def upload_dataset_version(
        self, tenant: str, dataset: str, sha256: str, size_bytes: int, chunks: AsyncIterator[Chunk]
    ) -> DatasetVersionRecord:
        check_name("dataset", dataset)
        self._check_declared_bytes(sha256, size_bytes)
        record = await asyncio.to_thread(self._store.get_dataset, tenant, dataset)
        return await self._receive(
            chunks,
            sha256,
            size_bytes,
            lambda path: check_dataset(record.format, record.target_column, path),
            lambda: self._store.add_dataset_version(tenant, dataset, sha256, size_bytes),
        )

    async def list_dataset_versions(
        self, tenant: str, dataset: str, page_size: int, page_token: str
    ) -> tuple[list[DatasetVersionRecord], str]:
        check_name("dataset", dataset)
        page = Page.parse(page_size, page_token)
        versions = await asyncio.to_thread(
            self._store.list_dataset_versions, tenant, dataset, _version_after(page), page.size + 1
        )
        return _paged(versions, page, lambda version: str(version.version))

    async def download_dataset_version(
        self, tenant: str, dataset: str, version: int
    ) -> tuple[DatasetVersionRecord, AsyncGenerator[bytes, None]]:
        """The dataset version, and its bytes in chunks. Close the generator if you stop early."""
        check_name("dataset", dataset)
        _check_version_number(version)
        record = await asyncio.to_thread(self._store.get_dataset_version, tenant, dataset, version)
        stream = await asyncio.to_thread(
            self._open_blob, record.sha256, f"version {version} of dataset {dataset!r}"
        )
        return record, self._chunks_of(stream)

    # The streaming machinery both kinds of upload share

    def _check_declared_bytes(self, sha256: str, size_bytes: int) -> None:
        if not SHA256_HEX.match(sha256):
            raise InvalidArgument("sha256 must be the 64 lower-case hex digits of the file's SHA-256")
        if size_bytes < 1:
            raise InvalidArgument("size_bytes must be the file's size, at least 1")
        if size_bytes > self._max_artifact_bytes:
            raise ResourceExhausted(
                f"size_bytes {size_bytes} exceeds this registry's limit of {self._max_artifact_bytes} bytes"
            )

    async def _receive(
        self,
        chunks: AsyncIterator[Chunk],
        sha256: str,
        size_bytes: int,
        check: Callable[[Path], None],
        insert: Callable[[], R],
    ) -> R:
        """Stream the chunks into a new blob, then commit it and insert its row.

        Until every byte has arrived, any failure (a short or long stream, the caller cancelling)
        removes the temp file. After that, commit and insert run to the end even if the caller
        goes away, so that a committed blob always gets its row or is removed again.
        """
        writer = self._blobs.begin_write()
        received = 0
        # One write at a time runs in a thread; chunks that arrive meanwhile join the next one.
        writing: asyncio.Task[None] | None = None
        waiting: list[Chunk] = []
        waiting_bytes = 0
        try:
            async for chunk in chunks:
                received += len(chunk)
                if received > size_bytes:
                    raise DataLoss(
                        f"received more than the {size_bytes} bytes the header declared; "
                        "send exactly size_bytes bytes"
                    )
                waiting.append(chunk)
                waiting_bytes += len(chunk)
                if writing is not None and not writing.done() and waiting_bytes < MAX_WAITING_BYTES:
                    continue
                if writing is not None:
                    await writing
                writing = _start_write(writer, waiting)
                waiting, waiting_bytes = [], 0
            if writing is not None:
                await writing
            if waiting:
                await _start_write(writer, waiting)
        except BaseException:
            if writing is not None:
                writing.cancel()  # its thread finishes the write; abort() waits for it
            writer.abort()
            raise
        return await _finish_despite_cancel(
            asyncio.to_thread(self._publish, writer, sha256, size_bytes, check, insert)
        )

    def _publish(
        self,
        writer: BlobWriter,
        sha256: str,
        size_bytes: int,
        check: Callable[[Path], None],
        insert: Callable[[], R],
    ) -> R:
        # Held while the blob becomes visible and its row appears, so that deleting another
        # version with the same bytes cannot remove the blob in between.
        with self._content_locks(sha256):
            writer.commit(sha256, size_bytes, check)
            try:
                return insert()
            except BaseException:
                self._delete_blob_if_unused_locked(sha256)
                raise

    def _delete_blob_if_unused(self, sha256: str) -> None:
        with self._content_locks(sha256):
            self._delete_blob_if_unused_locked(sha256)

    def _delete_blob_if_unused_locked(self, sha256: str) -> None:
        if not self._store.blob_in_use(sha256):
            self._blobs.delete(sha256)

    def _open_blob(self, sha256: str, what: str) -> BinaryIO:
        try:
            return self._blobs.open(sha256)
        except FileNotFoundError:
            raise DataLoss(f"the bytes of {what} (sha256 {sha256}) are missing from the blob store") from None

    async def _chunks_of(self, stream: BinaryIO) -> AsyncGenerator[bytes, None]:
        # The next chunk is read while this one is sent.
        reading = _in_thread(stream.read, self._chunk_bytes)
        try:
            while chunk := await reading:
                reading = _in_thread(stream.read, self._chunk_bytes)
                yield chunk
        finally:
            try:
                # A read still in its thread ends before the stream is closed under it.
                await asyncio.wait([reading])
            finally:
                stream.close()


class _KeyedLocks:
    """One thread lock per key, alive only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, threading.Lock] = weakref.WeakValueDictionary()
        self._guard = threading.Lock()

    def __call__(self, key: str) -> threading.Lock:
        with self._guard:
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = threading.Lock()
            return lock


def _background(work: Awaitable[T]) -> asyncio.Task[T]:
    """`work` as a task; a failure nobody awaits any more is not reported as "never retrieved"."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    return task


def _in_thread(function: Callable[..., T], *args: Any) -> asyncio.Task[T]:
    return _background(asyncio.to_thread(function, *args))


def _start_write(writer: BlobWriter, chunks: list[Chunk]) -> asyncio.Task[None]:
    def write() -> None:
        for chunk in chunks:
            writer.write(chunk)

    return _in_thread(write)


async def _finish_despite_cancel(work: Coroutine[Any, Any, T]) -> T:
    """Await `work`, letting it run to the end even if the caller is cancelled meanwhile."""
    return await asyncio.shield(_background(work))


def _check_version_upload(header: VersionUpload) -> ArtifactFormat:
    check_name("model", header.model)
    if header.format is None:
        raise InvalidArgument("format is required: TORCHSCRIPT (a torch.jit.save archive) or ONNX")
    check_signature(header.signature)
    for name, value in header.metrics.items():
        _check_text("metric name", name, MAX_KEY_CHARS)
        if not math.isfinite(value):
            raise InvalidArgument(f"metric {name!r} is {value}; metrics must be finite numbers")
    if len(header.metrics) > MAX_MAP_ENTRIES:
        raise InvalidArgument(f"at most {MAX_MAP_ENTRIES} metrics per version")
    _check_map("metadata", header.metadata)
    _check_lineage(header.lineage)
    _check_text("precision", header.precision, 32)
    return header.format


def _check_lineage(lineage: Lineage) -> None:
    _check_text("lineage.job_id", lineage.job_id, MAX_KEY_CHARS)
    if lineage.dataset:
        check_name("lineage dataset", lineage.dataset)
    if lineage.dataset_version < 0 or lineage.parent_version < 0:
        raise InvalidArgument("lineage.dataset_version and lineage.parent_version must not be negative")
    _check_map("lineage.hyperparameters", lineage.hyperparameters)


def _check_version_number(version: int) -> None:
    if version < 1:
        raise InvalidArgument(f"version must be a version number, 1 or more (got {version})")


def _check_text(what: str, value: str, max_chars: int) -> None:
    if len(value) > max_chars:
        raise InvalidArgument(f"{what} has {len(value)} characters; at most {max_chars} are allowed")
    if "\x00" in value:
        raise InvalidArgument(f"{what} must not contain NUL characters")


def _check_map(what: str, mapping: dict[str, str]) -> None:
    if len(mapping) > MAX_MAP_ENTRIES:
        raise InvalidArgument(f"{what} has {len(mapping)} entries; at most {MAX_MAP_ENTRIES} are allowed")
    for key, value in mapping.items():
        _check_text(f"{what} key", key, MAX_KEY_CHARS)
        _check_text(f"{what}[{key[:40]!r}]", value, MAX_VALUE_CHARS)


def _version_after(page: Page) -> int:
    if not page.after:
        return 0
    try:
        return int(page.after)
    except ValueError:
        raise InvalidArgument("invalid page_token: pass back next_page_token unchanged") from None


def _paged(items: list[T], page: Page, key_of: Callable[[T], str]) -> tuple[list[T], str]:
    """Stores fetch one item more than the page holds: its presence means another page exists."""
    if len(items) > page.size:
        items = items[: page.size]
        return items, Page.token_after(key_of(items[-1]))
    return items, ""
