"""Key-encryption keys (KEKs): what wraps each blob's data key before it is stored.

`KeyWrapper` is the interface the registry needs: an id, wrap and unwrap, each bound to a
context (the blob's sha256) so that a wrapped key moved to another blob's row does not unwrap.
One implementation lives here, `FileKek`: 32 random bytes, base64-encoded in a file
(MAAS_REGISTRY_KEK_FILE; $MAAS_HOME/kek in the embedded stack, a mounted Kubernetes Secret at
scale), wrapping with AES-256-GCM. An external KMS (AWS KMS, Google Cloud KMS, Vault transit)
would be another KeyWrapper whose wrap and unwrap are the KMS's encrypt and decrypt calls with
the context as their encryption context; the KEK would then never be in this process at all.

`Keyring` holds the KEK file and, while a rotation is under way, its successor `<file>.next`,
written and fsynced before any data key is re-wrapped with it. Either unwraps, so a rotation
cut short (kill -9) loses no key: the next rotation, or the registry's next start, finishes it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEK_BYTES = 32
NONCE_BYTES = 12
# Bound into every wrapped key: a key wrapped for anything else never unwraps as a blob's.
WRAP_PURPOSE = b"maas registry blob data key\x00"


class KekError(Exception):
    """The KEK file is missing, unreadable, malformed or too open; the message says what to do."""


class UnwrapError(ValueError):
    """A wrapped key does not unwrap: damaged, bound to another blob, or another KEK's."""


class KeyWrapper(Protocol):
    @property
    def id(self) -> str:
        """Names the key (never reveals it); stored beside every key it wrapped."""
        ...

    def wrap(self, key: bytes, context: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """The key `wrap` was given with the same context; UnwrapError otherwise."""
        ...


class FileKek:
    """A KEK held in this process: AES-256-GCM over the data key, the context as associated data."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEK_BYTES:
            raise ValueError(f"a KEK is {KEK_BYTES} bytes, not {len(key)}")
        self._cipher = AESGCM(key)
        # A one-way function of the key: shows which KEK a row needs without giving it away.
        self.id = "kek-" + hashlib.sha256(b"maas kek id\x00" + key).hexdigest()[:16]

    def wrap(self, key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._cipher.encrypt(nonce, key, WRAP_PURPOSE + context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        try:
            return self._cipher.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], WRAP_PURPOSE + context)
        except (InvalidTag, ValueError):
            raise UnwrapError(f"the data key does not unwrap with {self.id}") from None


def new_kek_text() -> str:
    """A fresh KEK as a KEK file holds it: 32 random bytes, base64."""
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode() + "\n"


def write_kek_file(path: Path, text: str) -> None:
    """Write a KEK file durably (0600, fsynced, renamed into place, the rename fsynced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    temp.unlink(missing_ok=True)  # a previous attempt's, cut short
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)
    _fsync_directory(path.parent)


def ensure_kek_file(path: Path) -> None:
    """Create the KEK file with a fresh key unless it exists (`maas up` calls this)."""
    if not path.exists():
        write_kek_file(path, new_kek_text())


def load_kek_file(path: Path) -> FileKek:
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except FileNotFoundError:
        raise KekError(f"the key-encryption key {path} is missing") from None
    except OSError as error:
        raise KekError(f"the key-encryption key {path} cannot be read: {error.strerror}") from None
    if mode & (stat.S_IRWXO | stat.S_IWGRP):
        raise KekError(
            f"the key-encryption key {path} is open to other users (mode {stat.S_IMODE(mode):o}): "
            f"chmod 600 {path}"
        )
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEK_BYTES:
        raise KekError(
            f"{path} does not hold a key-encryption key: it must hold {KEK_BYTES} random bytes, base64-encoded "
            "(head -c 32 /dev/urandom | base64)"
        )
    return FileKek(key)


class Keyring:
    """The KEK file and, during a rotation, the next one. Thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.next_path = path.with_name(path.name + ".next")
        self.current = load_kek_file(path)
        self.next: FileKek | None = load_kek_file(self.next_path) if self.next_path.exists() else None
        # Held from wrapping a new data key until its row is stored, and by a rotation while it
        # switches to the next KEK: no key wrapped by the old one is stored after the switch.
        self._switch = threading.Lock()

    @property
    def rotating(self) -> bool:
        return self.next is not None

    @contextmanager
    def wrapping(self) -> Iterator[KeyWrapper]:
        """The KEK that wraps new data keys (the next one during a rotation); store what it
        wrapped before the block ends."""
        with self._switch:
            yield self.next or self.current

    def unwrap(self, wrapped: bytes, kek_id: str, context: bytes) -> bytes:
        for kek in (self.current, self.next):
            if kek is not None and kek.id == kek_id:
                return kek.unwrap(wrapped, context)
        held = " and ".join(kek.id for kek in (self.current, self.next) if kek is not None)
        raise UnwrapError(f"the data key is wrapped by {kek_id}, and this registry holds only {held}")

    def begin_rotation(self) -> FileKek:
        """The next KEK, durable on disk before it wraps anything: a new one, or the one an
        interrupted rotation left (`<file>.next`)."""
        with self._switch:
            if self.next is None:
                try:
                    write_kek_file(self.next_path, new_kek_text())
                except OSError as error:
                    raise KekError(
                        f"cannot write the next key-encryption key beside {self.path}: {error.strerror}. "
                        "Rotation replaces the KEK file, so its directory must be writable; a KEK mounted "
                        "read-only (a Kubernetes Secret) cannot be rotated by the registry"
                    ) from None
                self.next = load_kek_file(self.next_path)
            return self.next

    def finish_rotation(self) -> None:
        """Make the next KEK the KEK (once no data key is wrapped by the old one)."""
        with self._switch:
            if self.next is None:
                return
            os.replace(self.next_path, self.path)
            _fsync_directory(self.path.parent)
            self.current, self.next = self.next, None


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
