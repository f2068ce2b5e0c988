"""`maas datasets ...`: datasets in the registry, the data a training job names as "NAME" or "NAME@VERSION"."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich import filesize
from rich.table import Column, Table
from rich.text import Text

from maas.cli._shared import (
    AddressOption,
    ApiKeyOption,
    JsonOption,
    client,
    console,
    errors,
    fail,
    id_column,
    new_table,
    print_json,
    print_json_list,
    upload_progress,
)
from maas.client import DATASET_FORMATS, Client
from maas.errors import ApiError, NotFound
from maas.registry.v1 import registry_pb2

datasets_app = typer.Typer(
    help="Datasets in the registry: CSV or NPZ files in numbered versions, for training jobs.", no_args_is_help=True
)

FORMAT_HELP = "csv (a header row, numeric features and a target column) or npz (numpy.savez arrays X and y)"
TargetColumnOption = Annotated[
    str, typer.Option("--target-column", help="For CSV: the header column to predict")
]
DescriptionOption = Annotated[str, typer.Option(help="What the data is")]


def format_name(dataset: registry_pb2.Dataset) -> str:
    return registry_pb2.DatasetFormat.Name(dataset.format).removeprefix("DATASET_FORMAT_").lower()


def _kind(dataset: registry_pb2.Dataset) -> str:
    """ "csv, target column 'species'" or "npz"."""
    if dataset.target_column:
        return f"{format_name(dataset)}, target column {dataset.target_column!r}"
    return format_name(dataset)


def _check_format(format: str | None) -> str:
    """`format` in lower case, "" when not given; refuses one the registry does not know."""
    if format is None:
        return ""
    if format.lower() not in DATASET_FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(DATASET_FORMATS)}, not {format!r}")
    return format.lower()


def datasets_table(datasets: Sequence[registry_pb2.Dataset]) -> Table:
    """Names, target columns and versions whole; the description wraps. No creation time, so that a
    long name fits 80 columns (`--json` has it)."""
    latest = [str(d.latest_version or "-") for d in datasets]
    table = new_table(
        id_column("dataset", (d.name for d in datasets)),
        "format",
        id_column("target", (d.target_column for d in datasets)),
        id_column("latest", latest),
        Column("description", overflow="fold"),  # a long word breaks rather than loses its end
    )
    for dataset, version in zip(datasets, latest, strict=True):
        table.add_row(dataset.name, format_name(dataset), dataset.target_column or "-", version, dataset.description)
    return table


@datasets_app.command("create")
def dataset_create(
    name: str,
    format: Annotated[str, typer.Option(help=FORMAT_HELP)] = "csv",
    target_column: TargetColumnOption = "",
    description: DescriptionOption = "",
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Create a dataset without versions; `maas datasets upload` adds them."""
    kind = _check_format(format)
    if kind == "csv" and not target_column:
        raise typer.BadParameter("a CSV dataset needs --target-column: the header column to predict")
    try:
        dataset = client(api_key, address).create_dataset(
            name, description, format=kind, target_column=target_column
        )
    except ApiError as error:
        raise fail(error) from None
    console.print(Text.assemble("created dataset ", (name, "bold"), f" ({_kind(dataset)})"))


@datasets_app.command("list")
def dataset_list(as_json: JsonOption = False, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """Your tenant's datasets: format, target column, latest version."""
    try:
        datasets = client(api_key, address).list_datasets()
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json_list(datasets)
        return
    console.print(datasets_table(datasets))


@datasets_app.command("get")
def dataset_get(
    name: str, as_json: JsonOption = False, api_key: ApiKeyOption = None, address: AddressOption = None
) -> None:
    """One dataset: format, target column, latest version."""
    try:
        dataset = client(api_key, address).get_dataset(name)
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json(dataset)
        return
    console.print(datasets_table([dataset]))


@datasets_app.command("delete")
def dataset_delete(name: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """Delete a dataset and every version of it (developer role)."""
    try:
        client(api_key, address).delete_dataset(name)
    except ApiError as error:
        raise fail(error) from None
    console.print(f"deleted dataset {name}")


def _prepare_dataset(
    maas: Client, name: str, file: Path, kind: str, target_column: str, description: str, create: bool
) -> bool:
    """Makes sure the upload has a dataset to go to; True when this created it. A missing one is
    created (with `create`) in the format given or that the file's suffix names; an existing one
    must agree with the format and target column given."""
    suffix = file.suffix.lower().removeprefix(".")
    kind = kind or (suffix if suffix in DATASET_FORMATS else "")
    try:
        maas.get_dataset(name)
    except NotFound:
        if not create:
            raise
        if not kind:
            raise typer.BadParameter(
                f"dataset {name} does not exist yet, and the suffix of {file.name} names no format: give --format "
                f"({', '.join(DATASET_FORMATS)})"
            ) from None
        if kind == "csv" and not target_column:
            raise typer.BadParameter(
                f"dataset {name} does not exist yet: to create it, give --target-column, the CSV header column "
                "to predict"
            ) from None
    if not kind:
        return False
    dataset, created = maas.ensure_dataset(name, format=kind, target_column=target_column, description=description)
    if created:
        console.print(Text.assemble("created dataset ", (name, "bold"), f" ({_kind(dataset)})"))
    return created


@datasets_app.command("upload")
def dataset_upload(
    name: str,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    format: Annotated[str | None, typer.Option(help=f"{FORMAT_HELP}; default: the file's suffix")] = None,
    target_column: TargetColumnOption = "",
    description: Annotated[str, typer.Option(help="What the data is, when the dataset is created")] = "",
    create: Annotated[bool, typer.Option(help="Create the dataset if it does not exist")] = True,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Upload a CSV or NPZ file as the dataset's next version; a missing dataset is created first.

    The file is streamed and checked by sha256; the version counts only once the registry has read it
    as the dataset's format."""
    kind = _check_format(format)
    maas = client(api_key, address)
    created = False
    try:
        created = _prepare_dataset(maas, name, file, kind, target_column, description, create)
        with upload_progress() as progress:
            task = progress.add_task(f"uploading {file.name}", total=file.stat().st_size)
            version = maas.upload_dataset_version(name, file, progress=lambda n: progress.advance(task, n))
    except ValueError as error:  # the dataset exists in another format or with another target column
        errors.print(Text.assemble(("upload refused:", "red"), f" {error}"))
        raise typer.Exit(1) from None
    except ApiError as error:
        refused = fail(error)
        if created:
            errors.print(
                f"dataset {name} was created for this upload and stays, without versions: "
                "the registry has no delete for datasets"
            )
        raise refused from None
    console.print(
        f"{name} version {version.version} ready (sha256 {version.sha256[:12]}…, "
        f"{filesize.decimal(version.size_bytes)})"
    )


@datasets_app.command("versions")
def dataset_versions(
    name: str, as_json: JsonOption = False, api_key: ApiKeyOption = None, address: AddressOption = None
) -> None:
    """A dataset's versions: size, sha256, when each was uploaded."""
    try:
        versions = client(api_key, address).list_dataset_versions(name)
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json_list(versions)
        return
    table = new_table(
        id_column("version", (str(v.version) for v in versions)),
        Column("size", no_wrap=True),
        id_column("sha256", (v.sha256[:12] for v in versions)),
        Column("created (UTC)", no_wrap=True),
    )
    for v in versions:
        table.add_row(
            str(v.version),
            filesize.decimal(v.size_bytes),
            v.sha256[:12],
            v.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M"),  # naive UTC
        )
    console.print(table)


@datasets_app.command("download")
def dataset_download(
    name: str,
    version: int,
    output: Annotated[Path, typer.Option("-o", "--output", dir_okay=False, help="The file to write")],
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Download a dataset version's file; it is written only whole and checked against its sha256."""
    maas = client(api_key, address)
    try:
        with upload_progress() as progress:
            task = progress.add_task(f"downloading {name} version {version}", total=None)
            record = maas.download_dataset_version(
                name, version, output, progress=lambda n, total: progress.update(task, advance=n, total=total)
            )
    except ApiError as error:
        raise fail(error) from None
    except OSError as error:  # e.g. a folder that does not exist, or one not writable
        errors.print(Text.assemble(("cannot write", "red"), f" {output}: {error.strerror or error}"))
        raise typer.Exit(1) from None
    console.print(f"wrote {output} ({filesize.decimal(record.size_bytes)}, sha256 {record.sha256[:12]}… checked)")
