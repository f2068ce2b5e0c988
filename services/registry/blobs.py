"""Content-addressed blob storage for artifacts and dataset files.

A write streams into a temp file beside the blobs (same filesystem), hashing as it goes; commit
checks size and sha256, fsyncs (while the format checks run) and renames it to sha256/<ab>/<hex>
in one atomic step. Readers never see a partial blob. The S3-compatible backend (s3_blobs.py)
spools and verifies the same way, then uploads the verified file under the same key.

A sealed write (encryption at rest, services/registry/encryption.py) rewrites the temp file in
place as its sealed form (envelope.py's format) once the format checks have read it, then
publishes it: the blob store holds ciphertext only. The plaintext exists only in the temp file
while the upload arrives and is checked. The sha256 is always the plaintext's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from services.common.errors import DataLoss
from services.registry.envelope import CHUNK_BYTES, Sealer, sealed_size

log = logging.getLogger(__name__)

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

# A piece of an upload: received bytes, or a view into the message that carried them.
Chunk = bytes | memoryview
# Looks at the verified bytes before they become a blob; raises to refuse them.
Check = Callable[[Path], None]
# Runs just before a blob is stored that was not stored yet (e.g. recording its data key).
BeforeNew = Callable[[], None]
# Makes a verified, closed temp file the blob with this digest.
Publish = Callable[[Path, str, BeforeNew | None], None]


@dataclass(frozen=True)
class Sealing:
    """How a writer seals its blob: the data key, and what records that key (wrapped) just
    before the blob is stored, so that no stored blob lacks its key."""

    data_key: bytes
    record_key: BeforeNew


def blob_key(sha256: str) -> str:
    """sha256/<ab>/<hex>: the blob's path under a directory, or its key in a bucket."""
    if not SHA256_HEX.match(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256[:80]!r}")
    return f"sha256/{sha256[:2]}/{sha256}"


class BlobWriter(Protocol):
    @property
    def size(self) -> int: ...

    def write(self, chunk: Chunk) -> None: ...

    def commit(self, expected_sha256: str, expected_size: int, check: Check | None = None) -> None:
        """Publish the bytes as blob `expected_sha256` if they match; otherwise discard them and raise."""
        ...

    def abort(self) -> None:
        """Discard everything written; a no-op after commit or a previous abort."""
        ...


class BlobStore(Protocol):
    @property
    def temp_dir(self) -> Path:
        """Where writes spool (a local directory)."""
        ...

    def begin_write(self, sealing: Sealing | None = None) -> BlobWriter: ...

    def open(self, sha256: str) -> BinaryIO:
        """The blob's stored bytes (sealed or not) for streaming reads; FileNotFoundError when
        it is absent."""
        ...

    def put_file(self, path: Path, sha256: str, before_new: BeforeNew | None = None) -> None:
        """Store a verified, closed file (in temp_dir) as blob `sha256`, as it is, and remove it.
        Content-addressed: when the blob is stored already, the file is just removed."""
        ...

    def exists(self, sha256: str) -> bool: ...

    def delete(self, sha256: str) -> None: ...

    def digests(self) -> Iterator[str]:
        """Every stored blob's sha256 (backups walk them)."""
        ...

    def sweep_temps(self) -> None:
        """Remove uploads a crash left half-written; call at start-up, before serving."""
        ...


def sweep_temp_dir(temp_dir: Path) -> None:
    for leftover in temp_dir.iterdir():
        log.warning("removing an unfinished upload left by a previous run", extra={"path": str(leftover)})
        leftover.unlink(missing_ok=True)


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.temp_dir = root / "tmp"
        self.temp_dir.mkdir(parents=True, exist_ok=True)

    def path_of(self, sha256: str) -> Path:
        return self.root / blob_key(sha256)

    def sweep_temps(self) -> None:
        sweep_temp_dir(self.temp_dir)

    def begin_write(self, sealing: Sealing | None = None) -> SpooledBlobWriter:
        return SpooledBlobWriter(self.temp_dir / f"{uuid.uuid4().hex}.part", self.put_file, sealing)

    def open(self, sha256: str) -> BinaryIO:
        return self.path_of(sha256).open("rb")

    def exists(self, sha256: str) -> bool:
        return self.path_of(sha256).exists()

    def delete(self, sha256: str) -> None:
        self.path_of(sha256).unlink(missing_ok=True)

    def digests(self) -> Iterator[str]:
        for path in sorted((self.root / "sha256").glob("*/*")):
            if SHA256_HEX.match(path.name):
                yield path.name

    def put_file(self, path: Path, sha256: str, before_new: BeforeNew | None = None) -> None:
        final = self.path_of(sha256)
        if final.exists():
            # Content-addressed: the same bytes are already stored.
            path.unlink()
            return
        if before_new is not None:
            before_new()
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, final)
        # Make the rename itself durable.
        directory = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


# A chunk is hashed in another thread while it is written (both let go of the GIL).
_HASHING = ThreadPoolExecutor(thread_name_prefix="blob-hash")


class SpooledBlobWriter:
    """Writes into a local temp file, hashing as it goes; commit verifies, then hands the closed
    file to the store's `publish`. With `sealing`, commit seals the file in place once the
    checks have read it: the blob store gets ciphertext only, and no second copy is written."""

    def __init__(self, temp_path: Path, publish: Publish, sealing: Sealing | None = None) -> None:
        self.temp_path = temp_path
        self._publish = publish
        self._file: BinaryIO | None = temp_path.open("x+b")
        self._hash = hashlib.sha256()
        self._size = 0
        self._sealing = sealing
        # write() runs in worker threads; abort() may come from a cancelled caller meanwhile.
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._size

    def write(self, chunk: Chunk) -> None:
        with self._lock:
            if self._file is None:
                raise RuntimeError("write after commit or abort")
            hashed = _HASHING.submit(self._hash.update, chunk)
            try:
                self._file.write(chunk)
            finally:
                hashed.result()
            self._size += len(chunk)

    def commit(self, expected_sha256: str, expected_size: int, check: Check | None = None) -> None:
        with self._lock:
            if self._file is None:
                raise RuntimeError("commit after commit or abort")
            try:
                self._verify(expected_sha256, expected_size)
                self._file.flush()
                if self._sealing is None:
                    # The bytes go to the disk while the check reads them from the page cache.
                    with ThreadPoolExecutor(1) as pool:
                        synced = pool.submit(os.fsync, self._file.fileno())
                        if check:
                            check(self.temp_path)
                        synced.result()
                else:
                    # The checks read the plaintext; then it is sealed where it lies.
                    if check:
                        check(self.temp_path)
                    seal_in_place(self._file.fileno(), self._sealing.data_key, self._size)
                self._file.close()
                self._file = None
                self._publish(self.temp_path, expected_sha256, self._sealing.record_key if self._sealing else None)
            except BaseException:
                self._discard()
                raise

    def abort(self) -> None:
        with self._lock:
            self._discard()

    def _verify(self, expected_sha256: str, expected_size: int) -> None:
        if self._size < expected_size:
            raise DataLoss(
                f"the upload ended after {self._size} of the {expected_size} bytes its header declared; "
                "send the whole file"
            )
        if self._size > expected_size:
            raise DataLoss(f"received {self._size} bytes but the header declared size_bytes {expected_size}")
        digest = self._hash.hexdigest()
        if digest != expected_sha256:
            raise DataLoss(
                f"sha256 mismatch: the header declared {expected_sha256} but the {self._size} bytes "
                f"received hash to {digest}; the bytes were damaged in transit or the header is wrong"
            )

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.temp_path.unlink(missing_ok=True)


def seal_in_place(fd: int, data_key: bytes, size: int) -> None:
    """Rewrite the file open as `fd` (read-write), whose first `size` bytes are the plaintext, as
    its sealed form and make it durable, the disk writing the sealed chunks while later ones are
    made. A sealed chunk is a little longer than its plaintext, so each plaintext chunk is read
    before the chunk ahead of it is written, and nothing is read past `size`: the sealed bytes
    run past the plaintext's end before its last chunk is read."""
    sealer = Sealer(data_key)
    sealed = threading.Event()

    def flush_while_sealing() -> None:
        while not sealed.is_set():
            os.fdatasync(fd)

    with ThreadPoolExecutor(1) as pool:
        flushing = pool.submit(flush_while_sealing)
        try:
            # Two chunk buffers, used in turn: the pass takes no memory per chunk.
            current, ahead = memoryview(bytearray(CHUNK_BYTES)), memoryview(bytearray(CHUNK_BYTES))
            read_at = _pread_into(fd, ahead[: min(CHUNK_BYTES, size)], 0)
            write_at, ahead_size = 0, read_at
            while ahead_size:
                current, ahead, filled = ahead, current, ahead_size
                ahead_size = _pread_into(fd, ahead[: min(CHUNK_BYTES, size - read_at)], read_at)
                read_at += ahead_size
                for piece in sealer.seal(current[:filled]):
                    write_at = _pwrite_all(fd, piece, write_at)
            for piece in sealer.finish():
                write_at = _pwrite_all(fd, piece, write_at)
            if read_at != size or write_at != sealed_size(size):
                raise DataLoss(f"sealing read {read_at} of {size} bytes and wrote {write_at}: refused, not stored")
        finally:
            sealed.set()
            flushing.result()
    os.fsync(fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> int:
    """Write all of `data` at `offset`; the offset after it."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
    return offset


def _pread_into(fd: int, buffer: memoryview, offset: int) -> int:
    """Fill `buffer` from `offset` (less only at the end of the file); how many bytes were read."""
    filled = 0
    while filled < len(buffer) and (read := os.preadv(fd, [buffer[filled:]], offset + filled)):
        filled += read
    return filled
