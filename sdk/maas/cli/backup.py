"""`maas admin backup PATH` / `maas admin restore PATH`: run on the host (or pod) of the services,
with the same MAAS_* settings, since they read the databases and blob store directly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from maas.cli._shared import console, errors


def _backup_module():  # type: ignore[no-untyped-def]
    try:
        from services.stack import backup as module
    except ImportError:  # the SDK installed on its own, without the services
        errors.print("backup and restore need the MaaS services installed beside the CLI", style="red")
        raise typer.Exit(2) from None
    return module


def backup(path: Annotated[Path, typer.Argument(help="A new or empty directory")]) -> None:
    """Copy every service's SQL data, the registry's blobs (encrypted ones as they are), the trainer's job
    folders and the admin key, while the stack serves. Never the key-encryption key: keep a copy of
    $MAAS_HOME/kek apart from the backups, a restore needs it."""
    module = _backup_module()
    try:
        report = module.backup(path)
    except module.BackupError as error:
        errors.print(Text.assemble(("backup failed", "red"), f": {error}"))
        raise typer.Exit(1) from None
    engines = ", ".join(f"{service} ({engine})" for service, engine in report.databases.items())
    console.print(
        f"backed up {engines}, {report.blobs} blob(s) and {report.job_files} training job file(s) "
        f"to {report.path}"
    )
    if report.missing_blobs:
        errors.print(
            f"{len(report.missing_blobs)} blob(s) vanished during the backup (deleted meanwhile)", style="yellow"
        )
    if report.skipped_blobs:
        errors.print(f"{len(report.skipped_blobs)} encrypted blob(s) without a data key were skipped", style="yellow")
    errors.print(
        "the backup does not hold the key-encryption key: keep a copy of it (MAAS_REGISTRY_KEK_FILE, by default "
        "$MAAS_HOME/kek) apart from the backups; restoring needs it"
    )


def restore(path: Annotated[Path, typer.Argument(help="A directory `maas admin backup` wrote")]) -> None:
    """Restore a backup into an empty MAAS_HOME (and empty databases); the stack must be stopped."""
    module = _backup_module()
    try:
        report = module.restore(path)
    except module.BackupError as error:
        errors.print(Text.assemble(("restore failed", "red"), f": {error}"))
        raise typer.Exit(1) from None
    console.print(
        f"restored {', '.join(report.databases)}, {report.blobs} blob(s) and {report.job_files} training job "
        f"file(s) into {report.path}; "
        "start the stack with `maas up`"
    )
    if report.missing_blobs:
        errors.print(f"{len(report.missing_blobs)} blob(s) are missing from the backup", style="yellow")
    if report.skipped_blobs:
        errors.print(
            f"{len(report.skipped_blobs)} encrypted blob(s) written after the database snapshot were skipped "
            "(no restored version refers to them)",
            style="yellow",
        )
