"""`maas admin backup` carries the trainer's database and job folders (what a restored trainer
resumes unfinished jobs from), leaving out checkpoints half-written at the time."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from services.common.database import make_engine, upgrade
from services.stack.backup import BackupError, backup, restore
from services.trainer.server import MIGRATIONS


def make_trainer_home(home: Path) -> Path:
    engine = make_engine(f"sqlite:///{home / 'trainer' / 'trainer.db'}")
    upgrade(engine, MIGRATIONS)
    engine.dispose()
    job = home / "trainer" / "jobs" / "job-1"
    job.mkdir(parents=True)
    (job / "job.json").write_text('{"id": "job-1"}')
    (job / "checkpoint.pt").write_bytes(b"epoch 3")
    (job / "checkpoint.tmp").write_bytes(b"epoch 4, half written")
    (job / "worker.log").write_text("epoch 1\nepoch 2\nepoch 3\n")
    return job


def test_job_folders_are_backed_up_and_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAAS_HOME", str(tmp_path / "before"))
    make_trainer_home(tmp_path / "before")
    report = backup(tmp_path / "backup")
    assert report.databases["trainer"] == "sqlite" and report.job_files == 3

    monkeypatch.setenv("MAAS_HOME", str(tmp_path / "after"))
    restored = restore(tmp_path / "backup")
    assert restored.job_files == 3
    job = tmp_path / "after" / "trainer" / "jobs" / "job-1"
    assert (job / "checkpoint.pt").read_bytes() == b"epoch 3"
    assert (job / "job.json").read_text() == '{"id": "job-1"}'
    assert not (job / "checkpoint.tmp").exists()
    with sqlite3.connect(tmp_path / "after" / "trainer" / "trainer.db") as db:
        assert db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0] > 0


def test_restore_refuses_a_home_with_job_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAAS_HOME", str(tmp_path / "before"))
    make_trainer_home(tmp_path / "before")
    backup(tmp_path / "backup")
    monkeypatch.setenv("MAAS_HOME", str(tmp_path / "after"))
    (tmp_path / "after" / "trainer" / "jobs" / "stray").mkdir(parents=True)
    with pytest.raises(BackupError, match="job folders"):
        restore(tmp_path / "backup")


def modes_open_to_others(root: Path) -> list[str]:
    return [f"{oct(p.stat().st_mode & 0o777)} {p}" for p in [root, *root.rglob("*")] if p.stat().st_mode & 0o077]


def test_backups_and_restored_homes_are_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup holds every key and database, and a restore must not bring back the 0644 files
    of a home made before homes were private."""
    monkeypatch.setenv("MAAS_HOME", str(tmp_path / "before"))
    make_trainer_home(tmp_path / "before")
    for path in (tmp_path / "before").rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    backup(tmp_path / "backup")
    assert not modes_open_to_others(tmp_path / "backup")
    for path in (tmp_path / "backup").rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)

    monkeypatch.setenv("MAAS_HOME", str(tmp_path / "after"))
    restore(tmp_path / "backup")
    assert not modes_open_to_others(tmp_path / "after")
