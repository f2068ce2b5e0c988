"""Encryption at rest of the registry's blobs: which data key seals each blob, reading blobs back,
and rotating the key-encryption key.

Every blob written while encryption is on is sealed (envelope.py) under a random data key of its
own. The key is kept in the blob_keys table wrapped by the key-encryption key (keys.py), never in
plaintext. A blob without a key row was written without encryption (before encryption existed,
or with MAAS_REGISTRY_ENCRYPTION=false) and reads as stored.

A blob's data key is created by the first upload declaring its bytes and shared by the uploads
of the same bytes meanwhile (in any registry replica), so whichever of them stores the blob, the
stored key opens it. Just before a blob is stored its key is recorded again, wrapped by the KEK
of that moment; it is deleted after the blob is.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from services.common.errors import DataLoss, FailedPrecondition
from services.registry.blobs import Sealing
from services.registry.envelope import ALGORITHM, MAGIC, EnvelopeError, OpenedReader, Opener, new_data_key
from services.registry.keys import KekError, Keyring, KeyWrapper, UnwrapError, new_kek_text, write_kek_file
from services.registry.store import BlobKeyRecord, RegistryStore

log = logging.getLogger(__name__)

# Data keys re-wrapped per transaction during a rotation.
REWRAP_BATCH = 500


class NoDataKey(DataLoss):
    """A blob's stored bytes are sealed, but no data key for them is recorded."""


@dataclass(frozen=True)
class Rotation:
    rewrapped: int  # data keys re-wrapped by this call
    kek_id: str  # the KEK now in use
    previous_kek_id: str  # the one it replaced


def open_keyring(path: Path, store: RegistryStore) -> Keyring:
    """The registry's keyring. A registry that holds no data key yet (a new installation) gets
    its first KEK here when none exists; one whose data keys need a missing KEK refuses to start."""
    if not path.exists() and not store.has_blob_keys():
        log.info("creating the key-encryption key", extra={"path": str(path)})
        try:
            write_kek_file(path, new_kek_text())
        except OSError as error:
            raise KekError(f"cannot create the key-encryption key {path}: {error.strerror}") from None
    needed = store.kek_ids()
    try:
        keyring = Keyring(path)
    except KekError as error:
        raise KekError(
            f"{error}. This registry's data keys are wrapped by {', '.join(sorted(needed))}: put back the KEK "
            f"file that was in use at {path} (mode 0600); without it no encrypted artifact or dataset can be read"
        ) from None
    if missing := needed - {kek.id for kek in (keyring.current, keyring.next) if kek is not None}:
        raise KekError(
            f"the key-encryption key at {path} is {keyring.current.id}, but data keys in this registry are wrapped "
            f"by {', '.join(sorted(missing))}: put back the KEK file that was in use (after a restore, the one "
            "in use when the backup was taken)"
        )
    return keyring


class BlobEncryption:
    def __init__(self, store: RegistryStore, keyring: Keyring, *, enabled: bool) -> None:
        self.store = store
        self.keyring = keyring
        self.enabled = enabled
        self._rotation = threading.Lock()

    def sealing_for(self, sha256: str) -> Sealing | None:
        """How to seal an upload declaring these bytes; None with encryption off."""
        if not self.enabled:
            return None
        with self.keyring.wrapping() as kek:
            data_key = new_data_key()
            proposed = _wrapped(sha256, data_key, kek)
            stored = self.store.add_blob_key_unless_present(proposed)
        if stored != proposed:
            # An earlier upload of the same bytes created their key: seal with that one.
            data_key = unwrap_data_key(self.keyring, stored, f"the blob {sha256}")
        return Sealing(data_key, lambda: self._record(sha256, data_key))

    def has_key(self, sha256: str) -> bool:
        return self.store.blob_key(sha256) is not None

    def _record(self, sha256: str, data_key: bytes) -> None:
        with self.keyring.wrapping() as kek:
            self.store.put_blob_key(_wrapped(sha256, data_key, kek))

    def forget(self, sha256: str) -> None:
        """Delete the blob's data key: the blob is gone (or was never stored)."""
        self.store.delete_blob_key(sha256)

    def reader(self, sha256: str, stored: BinaryIO, what: str) -> BinaryIO:
        """The blob's plaintext from its stored bytes. A sealed blob that fails verification
        (changed, cut short, reordered, another key's) raises DataLoss naming `what`, before any
        byte of the failing chunk is handed on."""
        record = self.store.blob_key(sha256)
        if record is None:
            return _Unsealed(stored, sha256, what)  # type: ignore[return-value]
        try:
            data_key = unwrap_data_key(self.keyring, record, what)
        except BaseException:
            stored.close()
            raise
        return _Opened(OpenedReader(stored, data_key), sha256, what)  # type: ignore[return-value]

    def rotate(self) -> Rotation:
        """Re-wrap every data key with a new KEK (no blob is re-encrypted), then make it the KEK.
        Finishes the rotation a crash cut short, if any, instead of starting another."""
        if not self._rotation.acquire(blocking=False):
            raise FailedPrecondition("a key-encryption key rotation is already running; try again when it ends")
        try:
            previous = self.keyring.current.id
            try:
                next_kek = self.keyring.begin_rotation()
            except KekError as error:
                raise FailedPrecondition(str(error)) from None
            rewrapped = 0
            while batch := self.store.blob_keys_not_wrapped_by(next_kek.id, REWRAP_BATCH):
                rewrapped_batch = [
                    _wrapped(record.sha256, unwrap_data_key(self.keyring, record, f"the blob {record.sha256}"), next_kek)
                    for record in batch
                ]
                rewrapped += self.store.rewrap_blob_keys(batch, rewrapped_batch)
            self.keyring.finish_rotation()
            log.info("key-encryption key rotated", extra={"kek_id": next_kek.id, "rewrapped": rewrapped})
            return Rotation(rewrapped, next_kek.id, previous)
        finally:
            self._rotation.release()



def unwrap_data_key(keyring: Keyring, record: BlobKeyRecord, what: str) -> bytes:
    if record.algorithm != ALGORITHM:
        raise DataLoss(f"{what} is sealed with {record.algorithm!r}, which this registry cannot open")
    try:
        return keyring.unwrap(record.wrapped_key, record.kek_id, record.sha256.encode())
    except UnwrapError as error:
        raise DataLoss(f"the data key of {what} (sha256 {record.sha256}) cannot be unwrapped: {error}") from None


def _wrapped(sha256: str, data_key: bytes, kek: KeyWrapper) -> BlobKeyRecord:
    return BlobKeyRecord(
        sha256=sha256, wrapped_key=kek.wrap(data_key, sha256.encode()), kek_id=kek.id, algorithm=ALGORITHM
    )


class StoredCheck:
    """Checks a blob's stored bytes, fed as they are copied (backups copy them as they are),
    against the sha256 of its plaintext: a sealed blob is opened on the way, every chunk
    verified, and the plaintext dropped. Raises DataLoss (NoDataKey for sealed bytes without
    `data_key`)."""

    def __init__(self, sha256: str, data_key: bytes | None) -> None:
        self.sha256 = sha256
        self._opener = Opener(data_key) if data_key is not None else None
        self._hash = hashlib.sha256()
        self._first = True

    def update(self, stored: bytes) -> None:
        if self._first and self._opener is None and stored.startswith(MAGIC):
            raise NoDataKey(f"blob {self.sha256} is encrypted but no data key for it is recorded")
        self._first = False
        try:
            for plaintext in self._opener.open(stored) if self._opener else [stored]:
                self._hash.update(plaintext)
        except EnvelopeError as error:
            raise DataLoss(f"blob {self.sha256} is damaged: {error}") from None

    def finish(self) -> None:
        if self._opener is not None:
            try:
                self._hash.update(self._opener.finish())
            except EnvelopeError as error:
                raise DataLoss(f"blob {self.sha256} is damaged: {error}") from None
        if self._hash.hexdigest() != self.sha256:
            raise DataLoss(f"blob {self.sha256} is damaged: its bytes hash to {self._hash.hexdigest()}")


class _Opened:
    """A sealed blob read as plaintext; verification failures become DataLoss naming the blob."""

    def __init__(self, reader: OpenedReader, sha256: str, what: str) -> None:
        self._reader = reader
        self._sha256 = sha256
        self._what = what

    def read(self, size: int = -1) -> bytes:
        try:
            return self._reader.read(size)
        except EnvelopeError as error:
            raise DataLoss(
                f"the stored bytes of {self._what} (sha256 {self._sha256}) are damaged and were not served: {error}"
            ) from None

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> _Opened:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class _Unsealed:
    """A blob stored without encryption, read as it is; one that is sealed after all (its key
    row lost) is refused rather than served as ciphertext."""

    def __init__(self, stored: BinaryIO, sha256: str, what: str) -> None:
        self._stored = stored
        self._sha256 = sha256
        self._what = what
        self._first = True

    def read(self, size: int = -1) -> bytes:
        data = self._stored.read(size)
        if self._first:
            self._first = False
            if data.startswith(MAGIC):
                raise NoDataKey(
                    f"the stored bytes of {self._what} (sha256 {self._sha256}) are encrypted but the registry "
                    "holds no data key for them"
                )
        return data

    def close(self) -> None:
        self._stored.close()

    def __enter__(self) -> _Unsealed:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

