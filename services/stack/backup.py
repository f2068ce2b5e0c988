"""`maas admin backup` / `maas admin restore`: every service's SQL data, the registry's blobs and
the admin key, copied while the stack serves.

Consistency: each database is copied as one snapshot (SQLite's online backup API; pg_dump's
single transaction for PostgreSQL). Snapshots are taken in dependency order: services that
point at registry versions (gateway, trainer, inference) first, the registry after them, and
the blobs last, the trainer's job folders after its database. Versions are immutable and a blob is written before its row, so every version a
snapshot names has its row and its bytes in the backup. (A model deleted during the backup can
leave its row without bytes; restore reports such blobs as missing.) The job folders hold what
a restored trainer resumes an unfinished job from (job.json, the newest checkpoint) and the
workers' logs; a checkpoint being written aside (*.tmp) is left out, its finished predecessor
is what a resume reads.

Supported: SQLite -> SQLite and PostgreSQL -> PostgreSQL per service (pg_dump / pg_restore on
PATH), local or S3 blob stores on either side. Redis holds only caches, rate-limit windows and
counters that the services rebuild, so it is not backed up.

Encryption at rest: blobs are copied as stored, the sealed ones sealed, each checked on the way
against its sha256 (opened with its data key, the plaintext dropped). Their data keys travel in
the registry's database, wrapped; the key-encryption key (MAAS_REGISTRY_KEK_FILE) never goes into
a backup, so that a backup alone opens nothing. The manifest names the KEKs the backup needs, and
restore refuses to start until that KEK is back in place. A sealed blob whose key is not in the
database copy (written after its snapshot, so no version in the backup refers to it) is skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import make_url

from services.common.errors import DataLoss
from services.common.settings import CommonSettings, make_private
from services.gateway.config import GatewaySettings
from services.inference.config import InferenceSettings
from services.registry.blobs import BlobStore, LocalBlobStore
from services.registry.config import RegistrySettings
from services.registry.encryption import NoDataKey, StoredCheck, unwrap_data_key
from services.registry.keys import KekError, Keyring
from services.registry.server import open_blob_store
from services.registry.store import RegistryStore
from services.trainer.config import TrainerSettings

log = logging.getLogger(__name__)

FORMAT = 1
# Snapshot order (see the module docstring): what refers to registry versions before the registry.
SERVICES: tuple[tuple[str, type[CommonSettings]], ...] = (
    ("gateway", GatewaySettings),
    ("trainer", TrainerSettings),
    ("inference", InferenceSettings),
    ("registry", RegistrySettings),
)
# Never the KEK: a backup must not open its own blobs.
SECRET_FILES = ("admin.key", "internal.token")
JOBS_DIR = "trainer-jobs"
# Files written aside and renamed into place: half-written while the backup runs.
PARTIAL_SUFFIXES = (".tmp", ".partial")


class BackupError(Exception):
    """Backup or restore cannot go on; the message says what to do."""


@dataclass(frozen=True)
class Report:
    path: Path
    databases: dict[str, str]  # service -> engine
    blobs: int
    missing_blobs: list[str]
    job_files: int = 0  # files of the trainer's job folders
    # Sealed blobs without a data key in the registry's database copy: no version refers to them.
    skipped_blobs: list[str] = field(default_factory=list)


def database_url(service: str, settings: CommonSettings) -> str:
    """The service's SQLAlchemy URL; empty when the service keeps no SQL data."""
    return getattr(settings, f"{service}_database_url", "") or ""


def engine_of(url: str) -> str:
    backend = make_url(url).get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise BackupError(f"unsupported database {backend!r}: backups handle SQLite and PostgreSQL")
    return backend


def libpq_url(url: str) -> str:
    """postgresql+psycopg://... as the postgresql://... that pg_dump and pg_restore take."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def sqlite_path(url: str) -> Path:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise BackupError(f"{url}: an in-memory SQLite database cannot be backed up")
    return Path(database)


def _copy_sqlite(source: Path, target: Path) -> None:
    """SQLite's online backup: a consistent copy even while the service writes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src, \
            contextlib.closing(sqlite3.connect(target)) as dst:
        src.backup(dst)


def _run(tool: str, *args: str) -> None:
    if not shutil.which(tool):
        raise BackupError(f"{tool} is not on PATH: install the PostgreSQL client tools (postgresql-client)")
    result = subprocess.run([tool, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BackupError(f"{tool} failed: {result.stderr.strip()[-2000:]}")


def _settings() -> tuple[dict[str, CommonSettings], RegistrySettings]:
    """Each service's settings from the environment, as the services themselves read them."""
    settings = {service: cls() for service, cls in SERVICES}
    registry = settings["registry"]
    assert isinstance(registry, RegistrySettings)
    return settings, registry


def backup(destination: Path) -> Report:
    """Copy every service's data under `destination`, a new or empty directory."""
    destination = destination.expanduser().resolve()
    if destination.exists() and any(destination.iterdir()):
        raise BackupError(f"{destination} is not empty: back up into a new directory")
    make_private(destination)  # it holds the keys, the databases and the blobs of every tenant
    settings, registry = _settings()
    (destination / "databases").mkdir(parents=True, exist_ok=True)
    databases: dict[str, dict[str, str]] = {}
    for service, _ in SERVICES:
        url = database_url(service, settings[service])
        if not url:
            continue
        engine = engine_of(url)
        if engine == "sqlite":
            source = sqlite_path(url)
            if not source.exists():
                log.info("no database yet", extra={"service": service})
                continue
            file_name = f"{service}.sqlite"
            _copy_sqlite(source, destination / "databases" / file_name)
        else:
            file_name = f"{service}.pgdump"
            _run("pg_dump", "--format=custom", "--no-owner", "--no-privileges",
                 f"--file={destination / 'databases' / file_name}", libpq_url(url))
        databases[service] = {"engine": engine, "file": file_name}
        log.info("database copied", extra={"service": service, "engine": engine})

    trainer = settings["trainer"]
    assert isinstance(trainer, TrainerSettings)
    job_files = _copy_tree(trainer.trainer_jobs_dir, destination / JOBS_DIR)

    target_blobs = LocalBlobStore(destination / "blobs")
    keys = _BlobKeys(registry.registry_database_url, registry.registry_kek_file)
    try:
        copied, missing, skipped = _copy_blobs(open_blob_store(registry), target_blobs, keys)
        kek_ids = _kek_ids_in_backup(destination, databases.get("registry"), keys)
    finally:
        keys.close()
    shutil.rmtree(target_blobs.temp_dir, ignore_errors=True)

    home = registry.home
    for name in SECRET_FILES:
        if (home / name).exists():
            _copy_secret(home / name, destination / name)
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "databases": databases, "blobs": copied, "missing_blobs": missing, "job_files": job_files,
                "kek_ids": kek_ids}
    (destination / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return Report(destination, {s: d["engine"] for s, d in databases.items()}, copied, missing, job_files, skipped)


def restore(source: Path) -> Report:
    """Restore a backup into this MAAS_HOME and these databases, which must hold no data yet.
    The stack must be stopped."""
    source = source.expanduser().resolve()
    try:
        manifest = json.loads((source / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BackupError(f"{source} is not a MaaS backup (manifest.json: {error})") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"backup format {manifest.get('format')!r} is not the supported {FORMAT}")
    settings, registry = _settings()
    _refuse_if_running(registry.home)
    make_private(registry.home)
    _require_kek(registry.registry_kek_file, set(manifest.get("kek_ids", [])))

    plan = []
    for service, entry in manifest["databases"].items():
        url = database_url(service, settings[service])
        if not url:
            raise BackupError(f"this installation has no database for {service}")
        if engine_of(url) != entry["engine"]:
            raise BackupError(
                f"{service}: the backup holds a {entry['engine']} database but {service} is configured for "
                f"{engine_of(url)}; restore into the same kind of database"
            )
        _require_empty(service, url)
        plan.append((service, url, entry))
    jobs_dir = settings["trainer"].trainer_jobs_dir  # type: ignore[attr-defined]
    if jobs_dir.exists() and any(jobs_dir.iterdir()):
        raise BackupError(f"trainer: {jobs_dir} holds job folders; restore into an empty MAAS_HOME")

    for service, url, entry in plan:
        dump = source / "databases" / entry["file"]
        if entry["engine"] == "sqlite":
            _copy_sqlite(dump, sqlite_path(url))
        else:
            _run("pg_restore", "--no-owner", "--no-privileges", "--exit-on-error", f"--dbname={libpq_url(url)}",
                 str(dump))
        log.info("database restored", extra={"service": service})

    job_files = _copy_tree(source / JOBS_DIR, jobs_dir)
    keys = _BlobKeys(registry.registry_database_url, registry.registry_kek_file)
    try:
        copied, missing, skipped = _copy_blobs(LocalBlobStore(source / "blobs"), open_blob_store(registry), keys)
    finally:
        keys.close()
    shutil.rmtree(source / "blobs" / "tmp", ignore_errors=True)

    home = registry.home
    for name in SECRET_FILES:
        if (source / name).exists():
            _copy_secret(source / name, home / name)
    return Report(home, {s: e["engine"] for s, e in manifest["databases"].items()}, copied,
                  [*manifest.get("missing_blobs", []), *missing], job_files, skipped)


class _BlobKeys:
    """The blob data keys of a registry database and the KEK that unwraps them: what checks a
    copied blob against its digest."""

    def __init__(self, url: str, kek_file: Path) -> None:
        self.kek_file = kek_file
        self._engine = None
        self._store: RegistryStore | None = None
        if engine_of(url) != "sqlite" or sqlite_path(url).exists():
            self._engine = create_engine(url)
            # A database from before encryption at rest has no keys (nor their table).
            if inspect(self._engine).has_table("blob_keys"):
                self._store = RegistryStore(self._engine)
        self._keyring: Keyring | None = None

    def check(self, digest: str) -> StoredCheck:
        record = self._store.blob_key(digest) if self._store is not None else None
        if record is None:
            return StoredCheck(digest, None)
        return StoredCheck(digest, unwrap_data_key(self._kek(), record, f"blob {digest}"))

    def kek_ids(self) -> list[str]:
        return sorted(self._store.kek_ids()) if self._store is not None else []

    def _kek(self) -> Keyring:
        if self._keyring is None:
            try:
                self._keyring = Keyring(self.kek_file)
            except KekError as error:
                raise BackupError(f"{error}: the registry's encrypted blobs cannot be checked without it") from None
        return self._keyring

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def _copy_blobs(source: BlobStore, target: BlobStore, keys: _BlobKeys) -> tuple[int, list[str], list[str]]:
    """Every blob's bytes as stored (sealed ones stay sealed), each checked against its digest on
    the way. Returns how many were copied, the ones gone since they were listed, and the sealed
    ones without a data key (skipped)."""
    copied, missing, skipped = 0, [], []
    for digest in list(source.digests()):
        try:
            stream = source.open(digest)
        except FileNotFoundError:
            missing.append(digest)  # deleted since it was listed
            continue
        temp = target.temp_dir / f"{uuid.uuid4().hex}.part"
        try:
            with stream, temp.open("xb") as copy:
                check = keys.check(digest)
                while block := stream.read(1 << 20):
                    check.update(block)
                    copy.write(block)
                check.finish()
                copy.flush()
                os.fsync(copy.fileno())
        except NoDataKey:
            temp.unlink(missing_ok=True)
            skipped.append(digest)
            continue
        except DataLoss as error:
            temp.unlink(missing_ok=True)
            raise BackupError(f"{error}; nothing after it was copied") from None
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        target.put_file(temp, digest)
        copied += 1
    return copied, missing, skipped


def _kek_ids_in_backup(destination: Path, registry_database: dict[str, str] | None, keys: _BlobKeys) -> list[str]:
    """The KEKs the backup's blob data keys are wrapped by: read from the SQLite copy itself; of
    PostgreSQL, from the live database just after pg_dump."""
    if registry_database is None:
        return []
    if registry_database["engine"] != "sqlite":
        return keys.kek_ids()
    copy = destination / "databases" / registry_database["file"]
    with contextlib.closing(sqlite3.connect(f"file:{copy}?mode=ro", uri=True)) as database:
        if not database.execute("SELECT 1 FROM sqlite_master WHERE name = 'blob_keys'").fetchone():
            return []
        return sorted(row[0] for row in database.execute("SELECT DISTINCT kek_id FROM blob_keys"))


def _require_kek(kek_file: Path, needed: set[str]) -> None:
    """Refuse a restore whose blobs could not be read: the KEK they need must be in place first."""
    if not needed:
        return
    wanted = ", ".join(sorted(needed))
    try:
        keyring = Keyring(kek_file)
    except KekError as error:
        raise BackupError(
            f"{error}. This backup's blob data keys are wrapped by {wanted}, and backups never hold the KEK: put "
            f"back the KEK file that was in use when the backup was taken (you keep it apart from the backups) "
            f"at {kek_file}, mode 0600, then run restore again"
        ) from None
    held = {kek.id for kek in (keyring.current, keyring.next) if kek is not None}
    if not needed <= held:
        raise BackupError(
            f"this backup's blob data keys are wrapped by {wanted}, but the KEK at {kek_file} is "
            f"{keyring.current.id}: put the KEK that was in use when the backup was taken there (after a "
            "rotate-kek, the previous one), then run restore again"
        )


def _copy_tree(source: Path, target: Path) -> int:
    """Every finished file under `source` into `target`; returns how many were copied."""
    if not source.is_dir():
        return 0
    copied = 0
    for path in sorted(source.rglob("*")):
        if path.suffix in PARTIAL_SUFFIXES or not path.is_file():
            continue
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Not copy2: the backup's modes (0644 before homes were private) must not come back.
            shutil.copyfile(path, destination)
        except FileNotFoundError:
            continue  # the trainer removed it since it was listed (a job that failed to start)
        copied += 1
    return copied


def _copy_secret(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(source.read_bytes())


def _require_empty(service: str, url: str) -> None:
    if engine_of(url) == "sqlite":
        if sqlite_path(url).exists():
            raise BackupError(f"{service}: {sqlite_path(url)} exists; restore into an empty MAAS_HOME")
        return
    engine = create_engine(url)
    try:
        tables = inspect(engine).get_table_names()
    finally:
        engine.dispose()
    if tables:
        raise BackupError(f"{service}: the database at {make_url(url).render_as_string()} already has tables; "
                          "restore into an empty database")


def _refuse_if_running(home: Path) -> None:
    try:
        state = json.loads((home / "run" / "stack.json").read_text())
    except (OSError, json.JSONDecodeError):
        return
    pid = state.get("supervisor_pid")
    if pid and Path(f"/proc/{pid}").exists():
        raise BackupError(f"the stack in {home} is running (supervisor pid {pid}): `maas down` first")
