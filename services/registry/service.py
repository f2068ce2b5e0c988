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
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterable,
)
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from maas import hf_format
from maas.common.v1 import common_pb2
from maas.tiers import PLATFORM_SOURCE, SOURCE_METADATA_KEY, UPLOAD_SOURCE

from services.common.errors import DataLoss, InvalidArgument, PermissionDenied, ResourceExhausted
from services.common.generation import GENERATION_INPUTS, GENERATION_OUTPUTS
from services.common.summaries import BASELINE_KEY
from services.common.tensors import check_signature
from services.common.validation import Page, check_name
from services.registry import torchscript_ops
from services.registry.artifacts import check_artifact, check_dataset
from services.registry.blobs import BlobStore, BlobWriter, Check, Chunk, Sealing
from services.registry.encryption import BlobEncryption, Rotation
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
# A trained version's baseline (summaries.BASELINE_KEY: decile histograms of up to 64 features)
# runs to a few kilobytes more than other entries.
MAX_BASELINE_CHARS = 64 * 1024
# Metadata keys the platform writes; UpdateVersionMetadata may set only the retraining verdict's.
PLATFORM_KEY_PREFIX = "maas."
RETRAIN_KEY_PREFIX = "maas.retrain."
# An upload's chunks waiting while the previous ones are written: past this, receiving waits.
MAX_WAITING_BYTES = 4 * 1024 * 1024
UPDATABLE_MODEL_FIELDS = frozenset({"description", "labels", "no_download"})
# The roles the gateway asserts for an API key (services.common.channels.CALLER_ROLE_KEY) that
# may download: readers never; of a no-download model, admins only. A caller with no role is
# another MaaS service (the inference service deploying a model, the trainer optimizing one).
DOWNLOADING_ROLES = ("developer", "admin")
ADMIN_ROLE = "admin"


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
    # Sent by a tenant's key through the gateway (not by a MaaS service such as the trainer).
    from_tenant_key: bool = False


class Registry:
    def __init__(
        self,
        store: RegistryStore,
        blobs: BlobStore,
        *,
        encryption: BlobEncryption,
        chunk_bytes: int,
        max_artifact_bytes: int,
        check_operators: bool = True,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._encryption = encryption
        self._chunk_bytes = chunk_bytes
        self._max_artifact_bytes = max_artifact_bytes
        self._check_operators = check_operators
        self._content_locks = _KeyedLocks()

    # Models

    async def create_model(
        self, tenant: str, name: str, description: str, labels: dict[str, str], no_download: bool = False
    ) -> ModelRecord:
        check_name("model", name)
        _check_text("description", description, MAX_DESCRIPTION_CHARS)
        _check_map("labels", labels)
        return await asyncio.to_thread(
            self._store.create_model, tenant, name, description, labels, no_download
        )

    async def update_model(
        self,
        tenant: str,
        name: str,
        fields: Collection[str],
        *,
        description: str = "",
        labels: dict[str, str] | None = None,
        no_download: bool = False,
        role: str | None = None,
    ) -> ModelRecord:
        """Change the `fields` (an update mask's paths) of the model to the values given. Marking
        a model no-download is any developer's call; lifting the mark hands the weights to
        developers, so only an admin (`role`) may."""
        check_name("model", name)
        fields = set(fields)
        if not fields:
            raise InvalidArgument(
                f"update_mask is required: name the fields to change, from {sorted(UPDATABLE_MODEL_FIELDS)}"
            )
        if unknown := fields - UPDATABLE_MODEL_FIELDS:
            raise InvalidArgument(
                f"cannot update {sorted(unknown)}; updatable fields are {sorted(UPDATABLE_MODEL_FIELDS)}"
            )
        changes: dict[str, Any] = {}
        if "description" in fields:
            _check_text("description", description, MAX_DESCRIPTION_CHARS)
            changes["description"] = description
        if "labels" in fields:
            _check_map("labels", labels or {})
            changes["labels"] = labels or {}
        if "no_download" in fields:
            changes["no_download"] = no_download
        lifts_mark = "no_download" in fields and not no_download and role not in (None, ADMIN_ROLE)
        updated = await asyncio.to_thread(
            self._store.update_model, tenant, name, changes, unless_no_download=lifts_mark
        )
        if updated is None:
            raise PermissionDenied(
                f"model {name!r} is marked no-download and only an admin key may allow its download "
                f"again; this key has the {role!s:.20} role"
            )
        return updated

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
            # Who registered it is the registry's to say: a value sent (say, copied from another
            # version's metadata) is replaced.
            metadata={
                **header.metadata,
                SOURCE_METADATA_KEY: UPLOAD_SOURCE if header.from_tenant_key else PLATFORM_SOURCE,
            },
            lineage=header.lineage,
            precision=header.precision,
        )
        # What the check reads from the bytes replaces the uploader's claims (a language model's
        # architecture, size and dtype, which deployments and the runner rely on).
        derived: dict[str, str] = {}

        def check(path: Path) -> None:
            derived.update(check_artifact(artifact_format, path, check_operators=self._check_operators))

        def insert() -> VersionRecord:
            precision = hf_format.precision_of(derived["dtype"]) if "dtype" in derived else new.precision
            return self._store.add_version(
                tenant, header.model, replace(new, metadata={**new.metadata, **derived}, precision=precision)
            )

        return await self._receive(chunks, header.sha256, header.size_bytes, check, insert)

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

    async def update_version_metadata(
        self, tenant: str, model: str, version: int, entries: dict[str, str]
    ) -> VersionRecord:
        """Merge `entries` into the version's metadata; an empty value removes its key. Keys under
        maas. are the platform's (who uploaded it, its baseline), except the retraining verdict's."""
        check_name("model", model)
        _check_version_number(version)
        if not entries:
            raise InvalidArgument("metadata is required: the entries to set (an empty value removes a key)")
        _check_map("metadata", entries)
        for key in entries:
            if not key:
                raise InvalidArgument("metadata keys must not be empty")
            if key.startswith(PLATFORM_KEY_PREFIX) and not key.startswith(RETRAIN_KEY_PREFIX):
                raise InvalidArgument(
                    f"metadata key {key[:80]!r} is the platform's: keys starting with {PLATFORM_KEY_PREFIX!r} "
                    f"cannot be set, except those starting with {RETRAIN_KEY_PREFIX!r}"
                )
        return await asyncio.to_thread(
            self._store.update_version_metadata, tenant, model, version, entries, MAX_MAP_ENTRIES
        )

    async def download_version(
        self, tenant: str, model: str, version: int, role: str | None = None
    ) -> tuple[VersionRecord, AsyncGenerator[bytes, None]]:
        """The version, and its bytes in chunks, for a caller with `role` (None: another MaaS
        service). Close the generator if you stop early."""
        check_name("model", model)
        _check_version_number(version)
        _check_may_download(role, "a model's weights")
        model_record = await asyncio.to_thread(self._store.get_model, tenant, model)
        if model_record.no_download and role not in (None, ADMIN_ROLE):
            raise PermissionDenied(
                f"model {model!r} is marked no-download: only an admin key of its tenant may download "
                "its versions; deploy or optimize it instead, or ask an admin to download it or to "
                f"allow downloads (maas models update {model} --allow-download)"
            )
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

    async def delete_dataset(self, tenant: str, name: str) -> None:
        check_name("dataset", name)
        await asyncio.to_thread(self._delete_dataset, tenant, name)

    def _delete_dataset(self, tenant: str, name: str) -> None:
        for sha256 in self._store.delete_dataset(tenant, name):
            self._delete_blob_if_unused(sha256)

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
        self, tenant: str, dataset: str, version: int, role: str | None = None
    ) -> tuple[DatasetVersionRecord, AsyncGenerator[bytes, None]]:
        """The dataset version, and its bytes in chunks, for a caller with `role` (None: another
        MaaS service). Close the generator if you stop early."""
        check_name("dataset", dataset)
        _check_version_number(version)
        _check_may_download(role, "a dataset's data")
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
        check: Check,
        insert: Callable[[], R],
    ) -> R:
        """Stream the chunks into a new blob (sealed, with encryption on), then commit it and
        insert its row. A failed upload leaves no data key for bytes that were not stored."""
        sealing = await asyncio.to_thread(self._sealing_for, sha256)
        try:
            return await self._receive_into(
                self._blobs.begin_write(sealing), chunks, sha256, size_bytes, check, insert
            )
        except BaseException:
            if sealing is not None:
                await _finish_despite_cancel(asyncio.to_thread(self._forget_key_unless_stored, sha256))
            raise

    async def _receive_into(
        self,
        writer: BlobWriter,
        chunks: AsyncIterator[Chunk],
        sha256: str,
        size_bytes: int,
        check: Check,
        insert: Callable[[], R],
    ) -> R:
        """Until every byte has arrived, any failure (a short or long stream, the caller cancelling)
        removes the temp file. After that, commit and insert run to the end even if the caller
        goes away, so that a committed blob always gets its row or is removed again.
        """
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
        check: Check,
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
            # The blob before its key: a crash in between leaves a key without a blob, harmless.
            self._blobs.delete(sha256)
            self._encryption.forget(sha256)

    def _sealing_for(self, sha256: str) -> Sealing | None:
        with self._content_locks(sha256):
            if self._blobs.exists(sha256) and not self._encryption.has_key(sha256):
                # Stored before encryption: an upload of the same bytes shares that blob as it is.
                return None
            return self._encryption.sealing_for(sha256)

    def _forget_key_unless_stored(self, sha256: str) -> None:
        with self._content_locks(sha256):
            if not self._blobs.exists(sha256):
                self._encryption.forget(sha256)

    def _open_blob(self, sha256: str, what: str) -> BinaryIO:
        try:
            stored = self._blobs.open(sha256)
        except FileNotFoundError:
            raise DataLoss(f"the bytes of {what} (sha256 {sha256}) are missing from the blob store") from None
        return self._encryption.reader(sha256, stored, what)

    # Encryption at rest

    async def rotate_kek(self) -> Rotation:
        """A new key-encryption key wraps every blob's data key (platform admins only: the
        gateway checks)."""
        return await asyncio.to_thread(self._encryption.rotate)

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
        raise InvalidArgument(
            "format is required: TORCHSCRIPT (a torch.jit.save archive), ONNX or SAFETENSORS "
            "(a Hugging Face language model packed by `maas models import-hf`)"
        )
    check_signature(header.signature)
    if header.format is ArtifactFormat.SAFETENSORS:
        _check_generation_signature(header.signature)
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


def _check_generation_signature(signature: common_pb2.Signature) -> None:
    """A language model is served by the generation runner, whose tensors are fixed."""
    expected = (_tensors(GENERATION_INPUTS), _tensors(GENERATION_OUTPUTS))
    if (_tensors(signature.inputs), _tensors(signature.outputs)) != expected:
        inputs, outputs = (
            ", ".join(f"{name} {common_pb2.DataType.Name(datatype).removeprefix('DATA_TYPE_')} {list(shape)}"
                      for name, datatype, shape in tensors)
            for tensors in expected
        )
        raise InvalidArgument(
            f"a SAFETENSORS version has the text-generation signature: inputs {inputs}; outputs {outputs}"
        )


def _tensors(specs: Iterable[Any]) -> list[tuple[str, int, tuple[int, ...]]]:
    return [(spec.name, spec.datatype, tuple(spec.shape)) for spec in specs]


def _check_lineage(lineage: Lineage) -> None:
    _check_text("lineage.job_id", lineage.job_id, MAX_KEY_CHARS)
    if lineage.dataset:
        check_name("lineage dataset", lineage.dataset)
    if lineage.dataset_version < 0 or lineage.parent_version < 0:
        raise InvalidArgument("lineage.dataset_version and lineage.parent_version must not be negative")
    _check_map("lineage.hyperparameters", lineage.hyperparameters)


def _check_may_download(role: str | None, what: str) -> None:
    if role is not None and role not in DOWNLOADING_ROLES:
        raise PermissionDenied(
            f"downloading {what} needs a developer or admin API key; this key has the {role:.20} role"
        )


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
        limit = MAX_BASELINE_CHARS if what == "metadata" and key == BASELINE_KEY else MAX_VALUE_CHARS
        _check_text(f"{what}[{key[:40]!r}]", value, limit)


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
