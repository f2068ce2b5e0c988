"""The sealed-blob format: AES-256-GCM in fixed-size chunks, streamed both ways.

Pure crypto: no gRPC, no storage, no key management. A sealed blob is

    header  MAGIC (8 bytes) | version (1 byte) | chunk size (4 bytes, big-endian)
    chunk*  nonce (12 random bytes) | ciphertext of up to `chunk size` bytes | GCM tag (16)

Every chunk but the last holds exactly `chunk size` plaintext bytes; the last holds the rest,
fewer (none when the plaintext fills its chunks exactly): a chunk is sealed as soon as it is
full, often straight from the caller's buffer. Each chunk's associated data is the header, its
index and whether it is the last, so a chunk moved, swapped, dropped or taken from another blob
fails its tag, and so does a blob cut at a chunk boundary (its new last chunk was sealed as not
last). Readers verify a chunk's tag before handing on any of its bytes.
"""

from __future__ import annotations

import collections
import os
import struct
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"\x89MAASenc"
VERSION = 1
HEADER = struct.Struct(">8sBI")
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
ALGORITHM = "AES-256-GCM"
# Big enough that a 100 MB blob takes only 25 encryptions (each lets go of the GIL and must win it
# back, waiting on a busy event loop); small enough to hold a few in memory.
CHUNK_BYTES = 4 * 1024 * 1024
# A header asking for bigger chunks is refused before anything that size is read.
MAX_CHUNK_BYTES = 16 * 1024 * 1024
Bytes = bytes | bytearray | memoryview


def sealed_size(plaintext_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """How long the sealed form of `plaintext_bytes` is: the header, and a nonce and a tag per
    chunk (the last chunk, possibly empty, is always there)."""
    return HEADER.size + (plaintext_bytes // chunk_bytes + 1) * (NONCE_BYTES + TAG_BYTES) + plaintext_bytes


class EnvelopeError(ValueError):
    """The bytes are no sealed blob this key opens: damaged, cut short, reordered, or sealed
    under another key."""


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def _associated_data(header: bytes, index: int, last: bool) -> bytes:
    return header + struct.pack(">Q?", index, last)


def _cipher(key: bytes) -> AESGCM:
    if len(key) != KEY_BYTES:
        raise ValueError(f"a data key is {KEY_BYTES} bytes, not {len(key)}")
    return AESGCM(key)


def _chunk_bytes_of(header: Bytes) -> int:
    """The chunk size a whole header declares; EnvelopeError for a header this code cannot read."""
    if not MAGIC.startswith(bytes(header[: len(MAGIC)])):
        raise EnvelopeError("not a sealed blob: its first bytes are not the envelope's magic")
    if len(header) < HEADER.size:
        raise EnvelopeError(f"{len(header)} bytes: too short to be a sealed blob")
    _, version, chunk_bytes = HEADER.unpack_from(header)
    if version != VERSION:
        raise EnvelopeError(f"sealed with envelope version {version}; this registry reads version {VERSION}")
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise EnvelopeError(f"its header declares {chunk_bytes}-byte chunks, more than any sealer writes")
    return chunk_bytes


def _open_chunk(cipher: AESGCM, header: bytes, index: int, record: Bytes, *, last: bool) -> bytes:
    """A chunk's plaintext, once its tag is verified."""
    if len(record) < NONCE_BYTES + TAG_BYTES:
        raise EnvelopeError(f"chunk {index} is cut short ({len(record)} bytes)")
    nonce, sealed = bytes(record[:NONCE_BYTES]), memoryview(record)[NONCE_BYTES:]
    try:
        return cipher.decrypt(nonce, sealed, _associated_data(header, index, last))
    except InvalidTag:
        raise EnvelopeError(
            f"chunk {index} fails authentication: the bytes were changed, cut short or reordered, or the "
            "data key is not this blob's"
        ) from None


class Sealer:
    """Plaintext in, sealed bytes out, a chunk at a time: memory stays within about one chunk."""

    def __init__(self, key: bytes, chunk_bytes: int = CHUNK_BYTES) -> None:
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be from 1 to {MAX_CHUNK_BYTES}, not {chunk_bytes}")
        self._cipher = _cipher(key)
        self._chunk_bytes = chunk_bytes
        self._header = HEADER.pack(MAGIC, VERSION, chunk_bytes)
        self._pending = bytearray()
        self._index = 0
        self._started = False
        self._finished = False

    def seal(self, data: Bytes) -> list[bytes]:
        """The sealed bytes ready so far, in pieces to write one after another: every chunk
        `data` fills. What is left waits for more plaintext or finish()."""
        if self._finished:
            raise RuntimeError("seal after finish")
        rest = memoryview(data).cast("B")
        out = self._start()
        if self._pending:
            room = self._chunk_bytes - len(self._pending)
            self._pending += rest[:room]
            rest = rest[room:]
            if len(self._pending) < self._chunk_bytes:
                return out
            out += self._seal_chunk(self._pending, last=False)
            self._pending = bytearray()
        # Whole chunks straight from the caller's buffer: nothing is copied before encryption.
        while len(rest) >= self._chunk_bytes:
            out += self._seal_chunk(rest[: self._chunk_bytes], last=False)
            rest = rest[self._chunk_bytes :]
        self._pending += rest
        return out

    def finish(self) -> list[bytes]:
        """The rest, as the last chunk (and the header, if nothing was sealed before)."""
        if self._finished:
            raise RuntimeError("finish after finish")
        self._finished = True
        out = self._start() + self._seal_chunk(self._pending, last=True)
        self._pending = bytearray()
        return out

    def _start(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        return [self._header]

    def _seal_chunk(self, plaintext: Bytes, *, last: bool) -> list[bytes]:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._cipher.encrypt(nonce, plaintext, _associated_data(self._header, self._index, last))
        self._index += 1
        return [nonce, sealed]


class Opener:
    """Sealed bytes in, verified plaintext out: the inverse of Sealer. Raises EnvelopeError at
    the first chunk that fails, before any of its bytes are returned."""

    def __init__(self, key: bytes) -> None:
        self._cipher = _cipher(key)
        self._pending = bytearray()
        self._header = b""
        self._record_bytes = 0  # a whole chunk's sealed size, once the header is read
        self._index = 0
        self._finished = False

    def open(self, data: Bytes) -> list[bytes]:
        """The plaintext of every whole chunk `data` completes, in pieces (a whole chunk is never
        the last: the last one is shorter)."""
        if self._finished:
            raise RuntimeError("open after finish")
        rest = memoryview(data).cast("B")
        if not self._header:
            self._pending += rest
            if not self._read_header():
                return []
            rest, self._pending = memoryview(self._pending).cast("B"), bytearray()
        out = []
        if self._pending:
            room = self._record_bytes - len(self._pending)
            self._pending += rest[:room]
            rest = rest[room:]
            if len(self._pending) < self._record_bytes:
                return out
            out.append(self._open_chunk(self._pending, last=False))
            self._pending = bytearray()
        # Whole records straight from the caller's buffer.
        while len(rest) >= self._record_bytes:
            out.append(self._open_chunk(rest[: self._record_bytes], last=False))
            rest = rest[self._record_bytes :]
        self._pending += rest
        return out

    def finish(self) -> bytes:
        """The last chunk's plaintext; raises if the bytes ended anywhere but after it."""
        if self._finished:
            raise RuntimeError("finish after finish")
        self._finished = True
        if not self._header and not self._read_header():
            _chunk_bytes_of(self._pending)  # raises: too short
        return self._open_chunk(self._pending, last=True)

    def _read_header(self) -> bool:
        """Whether the header is in; EnvelopeError as soon as the bytes cannot begin one."""
        if len(self._pending) < HEADER.size:
            if not MAGIC.startswith(bytes(self._pending[: len(MAGIC)])):
                _chunk_bytes_of(self._pending)  # raises: not the magic
            return False
        chunk_bytes = _chunk_bytes_of(self._pending)
        self._header = bytes(self._pending[: HEADER.size])
        self._record_bytes = NONCE_BYTES + chunk_bytes + TAG_BYTES
        del self._pending[: HEADER.size]
        return True

    def _open_chunk(self, record: Bytes, *, last: bool) -> bytes:
        plaintext = _open_chunk(self._cipher, self._header, self._index, record, last=last)
        self._index += 1
        return plaintext


class OpenedReader:
    """A sealed stream read as its plaintext: read(n) returns only verified bytes (up to n, fewer
    at a chunk's end; b"" at the end), and raises EnvelopeError where the sealed bytes are wrong.
    Closing it closes the sealed stream."""

    def __init__(self, sealed: BinaryIO, key: bytes, read_bytes: int = CHUNK_BYTES) -> None:
        self._sealed = sealed
        self._opener = Opener(key)
        self._read_bytes = read_bytes
        self._pieces: collections.deque[bytes] = collections.deque()
        self._offset = 0  # into the first piece
        self._ended = False

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            return b"".join(iter(lambda: self.read(CHUNK_BYTES), b""))
        while not self._pieces and not self._ended:
            block = self._sealed.read(self._read_bytes)
            if block:
                self._pieces.extend(self._opener.open(block))
            else:
                self._pieces.append(self._opener.finish())
                self._ended = True
        if not self._pieces:
            return b""
        piece, start = self._pieces[0], self._offset
        if len(piece) - start <= size:
            self._pieces.popleft()
            self._offset = 0
            # A whole piece goes out as it is, without a copy.
            return piece if start == 0 else piece[start:]
        self._offset += size
        return piece[start : start + size]

    def close(self) -> None:
        self._sealed.close()

    def __enter__(self) -> OpenedReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

