"""The sealed-blob format (services/registry/envelope.py), fuzzed: any plaintext round-trips
whatever the pieces it is sealed and opened in, and any change to the sealed bytes (a flipped
byte, a cut, an extra byte, chunks swapped, another key) is refused before its chunk's bytes are
handed on. Small chunks put the boundaries where the fuzzing reaches them."""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.registry.blobs import seal_in_place
from services.registry.envelope import (
    CHUNK_BYTES,
    HEADER,
    MAX_CHUNK_BYTES,
    NONCE_BYTES,
    TAG_BYTES,
    EnvelopeError,
    OpenedReader,
    Opener,
    Sealer,
    new_data_key,
    sealed_size,
)

KEY = new_data_key()
CHUNK = 16
RECORD = NONCE_BYTES + CHUNK + TAG_BYTES
# Sizes around every boundary of the first few chunks, and some way past them.
SIZES = st.one_of(
    st.sampled_from([0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 2 * CHUNK, 2 * CHUNK + 1, 3 * CHUNK]),
    st.integers(0, 10 * CHUNK),
)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[start:end] for start, end in zip(points, points[1:], strict=False)]


def seal(data: bytes, cuts: list[int] = (), key: bytes = KEY, chunk: int = CHUNK) -> bytes:
    sealer = Sealer(key, chunk)
    sealed = [part for piece in pieces(data, list(cuts)) for part in sealer.seal(piece)]
    return b"".join([*sealed, *sealer.finish()])


def unseal(sealed: bytes, cuts: list[int] = (), key: bytes = KEY) -> bytes:
    opener = Opener(key)
    opened = [part for piece in pieces(sealed, list(cuts)) for part in opener.open(piece)]
    return b"".join([*opened, opener.finish()])


@settings(max_examples=300, deadline=None)
@given(size=SIZES, seal_cuts=st.lists(st.integers(0, 10**6), max_size=6), open_cuts=st.lists(st.integers(0, 10**6), max_size=6))
def test_any_plaintext_round_trips_in_any_pieces(size: int, seal_cuts: list[int], open_cuts: list[int]) -> None:
    data = os.urandom(size)
    sealed = seal(data, seal_cuts)
    chunks = size // CHUNK + 1  # whole chunks, and the last one (empty when the whole ones hold it all)
    assert len(sealed) == HEADER.size + chunks * (NONCE_BYTES + TAG_BYTES) + size
    assert unseal(sealed, open_cuts) == data


@settings(max_examples=300, deadline=None)
@given(size=SIZES, data=st.data())
def test_any_single_byte_change_is_refused(size: int, data: st.DataObject) -> None:
    sealed = bytearray(seal(os.urandom(size)))
    at = data.draw(st.integers(0, len(sealed) - 1), label="at")
    sealed[at] ^= data.draw(st.integers(1, 255), label="xor")
    with pytest.raises(EnvelopeError):
        unseal(bytes(sealed))


@settings(max_examples=200, deadline=None)
@given(size=SIZES, data=st.data())
def test_a_cut_or_an_extra_byte_anywhere_is_refused(size: int, data: st.DataObject) -> None:
    sealed = seal(os.urandom(size))
    cut = data.draw(st.integers(0, len(sealed) - 1), label="cut")
    with pytest.raises(EnvelopeError):
        unseal(sealed[:cut])
    with pytest.raises(EnvelopeError):
        unseal(sealed + data.draw(st.binary(min_size=1, max_size=RECORD + 1), label="extra"))


@settings(max_examples=100, deadline=None)
@given(size=st.integers(2 * CHUNK + 1, 8 * CHUNK), data=st.data())
def test_swapped_dropped_repeated_or_missing_last_chunks_are_refused(size: int, data: st.DataObject) -> None:
    sealed = seal(os.urandom(size))
    header, body = sealed[: HEADER.size], sealed[HEADER.size :]
    records = [body[start : start + RECORD] for start in range(0, len(body), RECORD)]
    first, second = sorted(data.draw(st.lists(st.integers(0, len(records) - 1), min_size=2, max_size=2, unique=True)))
    swapped = list(records)
    swapped[first], swapped[second] = swapped[second], swapped[first]
    dropped = records[:first] + records[first + 1 :]
    repeated = records[: first + 1] + records[first:]
    cut_at_a_boundary = records[: second]
    for reordered in (swapped, dropped, repeated, cut_at_a_boundary):
        with pytest.raises(EnvelopeError):
            unseal(header + b"".join(reordered))


def test_another_blobs_chunk_or_another_key_is_refused() -> None:
    data = os.urandom(3 * CHUNK)
    one, other = seal(data), seal(data)  # same key, same plaintext, different nonces
    spliced = one[: HEADER.size + RECORD] + other[HEADER.size + RECORD :]
    assert unseal(spliced) == data  # same key and bytes: what a chunk holds is the same
    with pytest.raises(EnvelopeError, match="fails authentication"):
        unseal(seal(data, key=new_data_key()))
    stranger = seal(os.urandom(3 * CHUNK), key=new_data_key())
    with pytest.raises(EnvelopeError):
        unseal(one[: HEADER.size + RECORD] + stranger[HEADER.size + RECORD :])


def test_no_byte_of_a_failing_chunk_is_handed_on() -> None:
    data = os.urandom(5 * CHUNK)
    sealed = bytearray(seal(data))
    sealed[HEADER.size + 2 * RECORD + NONCE_BYTES + 3] ^= 1  # inside chunk 2's ciphertext
    reader = OpenedReader(io.BytesIO(bytes(sealed)), KEY, read_bytes=7)
    received = b""
    with pytest.raises(EnvelopeError, match="chunk 2"):
        while block := reader.read(5):
            received += block
    assert data.startswith(received) and len(received) <= 2 * CHUNK


def test_headers_it_cannot_read_are_refused_by_name() -> None:
    with pytest.raises(EnvelopeError, match="magic"):
        unseal(b"PK\x03\x04 a zip file, not a sealed blob")
    with pytest.raises(EnvelopeError, match="too short"):
        unseal(b"\x89MAAS")
    sealed = bytearray(seal(b"x"))
    sealed[8] = 9
    with pytest.raises(EnvelopeError, match="version 9"):
        unseal(bytes(sealed))
    huge = HEADER.pack(b"\x89MAASenc", 1, MAX_CHUNK_BYTES + 1)
    with pytest.raises(EnvelopeError, match="chunks"):
        unseal(huge + b"\x00" * 64)


def test_a_reader_returns_what_was_sealed_in_any_read_sizes() -> None:
    data = os.urandom(10 * CHUNK + 3)
    reader = OpenedReader(io.BytesIO(seal(data)), KEY, read_bytes=RECORD - 1)
    assert reader.read(1) + reader.read(CHUNK * 3) + reader.read() == data
    assert reader.read(10) == b""



@pytest.mark.parametrize(
    "size",
    [
        0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1,
        # The last chunk shorter than what the sealed chunks before it outgrew the plaintext by:
        # the sealed bytes already run past the plaintext's end when it is read.
        CHUNK_BYTES + 10, 2 * CHUNK_BYTES + 60,
    ],
)
def test_a_file_sealed_in_place_opens_to_exactly_its_plaintext(tmp_path, size: int) -> None:
    plaintext = os.urandom(size)
    path = tmp_path / "spool.part"
    path.write_bytes(plaintext)
    key = new_data_key()
    with path.open("r+b") as file:
        seal_in_place(file.fileno(), key, size)
    sealed = path.read_bytes()
    assert len(sealed) == sealed_size(size)
    with OpenedReader(io.BytesIO(sealed), key) as reader:
        assert reader.read() == plaintext
