"""LocalBlobStore: atomic, verified commits and no stray temp files."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.errors import DataLoss, InvalidArgument
from services.registry.blobs import LocalBlobStore
from tests.unit.registry.conftest import sha256_of

DATA = b"hello, blob store" * 1000


@pytest.fixture
def blobs(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


def write(blobs: LocalBlobStore, data: bytes, pieces: int = 4):
    writer = blobs.begin_write()
    step = max(1, len(data) // pieces)
    for start in range(0, len(data), step):
        writer.write(data[start : start + step])
    return writer


def test_commit_publishes_under_the_content_address(blobs: LocalBlobStore) -> None:
    digest = sha256_of(DATA)
    write(blobs, DATA).commit(digest, len(DATA))
    assert blobs.path_of(digest) == blobs.root / "sha256" / digest[:2] / digest
    with blobs.open(digest) as stream:
        assert stream.read() == DATA
    assert list(blobs.temp_dir.iterdir()) == []


def test_same_bytes_twice_keep_one_blob(blobs: LocalBlobStore) -> None:
    digest = sha256_of(DATA)
    write(blobs, DATA).commit(digest, len(DATA))
    write(blobs, DATA).commit(digest, len(DATA))
    assert [p.name for p in (blobs.root / "sha256").rglob("*") if p.is_file()] == [digest]
    assert list(blobs.temp_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("sent", "declared_size", "message"),
    [
        (DATA[:-5], len(DATA), "ended after"),
        (DATA + b"x", len(DATA), "declared size_bytes"),
        (DATA[:-1] + b"?", len(DATA), "sha256 mismatch"),
    ],
)
def test_mismatches_raise_data_loss_and_leave_nothing(
    blobs: LocalBlobStore, sent: bytes, declared_size: int, message: str
) -> None:
    writer = write(blobs, sent)
    with pytest.raises(DataLoss, match=message):
        writer.commit(sha256_of(DATA), declared_size)
    assert not blobs.path_of(sha256_of(DATA)).exists()
    assert list(blobs.temp_dir.iterdir()) == []


def test_a_failing_check_discards_the_bytes(blobs: LocalBlobStore) -> None:
    def refuse(path: Path) -> None:
        assert path.read_bytes() == DATA
        raise InvalidArgument("not today")

    with pytest.raises(InvalidArgument):
        write(blobs, DATA).commit(sha256_of(DATA), len(DATA), refuse)
    assert not blobs.path_of(sha256_of(DATA)).exists()
    assert list(blobs.temp_dir.iterdir()) == []


def test_abort_removes_the_temp_and_is_idempotent(blobs: LocalBlobStore) -> None:
    writer = write(blobs, DATA)
    assert len(list(blobs.temp_dir.iterdir())) == 1
    writer.abort()
    writer.abort()
    assert list(blobs.temp_dir.iterdir()) == []
    with pytest.raises(RuntimeError):
        writer.write(b"more")


def test_abort_after_commit_keeps_the_blob(blobs: LocalBlobStore) -> None:
    writer = write(blobs, DATA)
    writer.commit(sha256_of(DATA), len(DATA))
    writer.abort()
    assert blobs.path_of(sha256_of(DATA)).exists()


def test_start_up_sweeps_temps_a_crash_left(blobs: LocalBlobStore) -> None:
    write(blobs, DATA)  # never committed nor aborted: a crash
    LocalBlobStore(blobs.root).sweep_temps()
    assert list(blobs.temp_dir.iterdir()) == []


def test_delete_and_missing_blobs(blobs: LocalBlobStore) -> None:
    digest = sha256_of(DATA)
    write(blobs, DATA).commit(digest, len(DATA))
    blobs.delete(digest)
    blobs.delete(digest)
    with pytest.raises(FileNotFoundError):
        blobs.open(digest)


def test_only_hex_digests_name_blobs(blobs: LocalBlobStore) -> None:
    with pytest.raises(ValueError):
        blobs.path_of("../../etc/passwd")
