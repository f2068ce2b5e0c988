"""What every command group shares: consoles, the key and address options, the client."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich import box
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Column, Table
from rich.text import Text

from maas.client import Client
from maas.common.v1 import common_pb2
from maas.errors import ApiError
from maas.tensors import datatype

# Markup off: server text (error details, messages, names) is printed as it is, never read as
# rich tags ("[batch, 64]" would vanish). Styles are applied with Text, never with markup.
# Soft wrap: a line is never broken by the CLI (ids and shapes stay whole for copy and grep);
# tables still fit the terminal.
console = Console(markup=False, soft_wrap=True)
errors = Console(stderr=True, markup=False, soft_wrap=True)


def upload_progress() -> Progress:
    """A bar of bytes sent and their rate, on stderr (stdout stays for results)."""
    return Progress(
        TextColumn("{task.description}", style="progress.description", markup=False),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=errors,
    )

ApiKeyOption = Annotated[
    str | None, typer.Option("--api-key", envvar="MAAS_API_KEY", help="Defaults to $MAAS_HOME/admin.key")
]
AddressOption = Annotated[
    str | None, typer.Option("--address", envvar="MAAS_GATEWAY_ADDR", help="Gateway host:port")
]
TlsCaOption = Annotated[
    Path | None,
    typer.Option(
        "--tls-ca",
        envvar="MAAS_TLS_CA",
        exists=True,
        dir_okay=False,
        help="CA certificate (PEM) that signed the gateway's TLS certificate; unset: plaintext",
    ),
]

# Set once by the top-level `--tls-ca` option before any command runs.
tls_ca: Path | None = None


def maas_home() -> Path:
    """$MAAS_HOME, else .maas/ in the repository this CLI was installed from (else the current folder)."""
    if home := os.environ.get("MAAS_HOME"):
        return Path(home).expanduser().resolve()
    try:
        from services.common.settings import default_home
    except ImportError:  # the SDK installed on its own, without the services
        return Path.cwd() / ".maas"
    return default_home()


# Whether this command's key came from $MAAS_API_KEY: a refusal then says how to act as admin.
key_from_environment = False


def client(api_key: str | None, address: str | None) -> Client:
    global key_from_environment
    key_from_environment = bool(api_key) and api_key == os.environ.get("MAAS_API_KEY")
    if not api_key:
        key_file = maas_home() / "admin.key"
        if key_file.exists():
            api_key = key_file.read_text().strip()
    if not api_key:
        errors.print(
            Text.assemble(("no API key:", "red"), " pass --api-key, set MAAS_API_KEY, or run `maas up` to create the admin key")
        )
        raise typer.Exit(2)
    root_certificates = tls_ca.read_bytes() if tls_ca else None
    return Client(address, api_key, root_certificates=root_certificates)


JsonOption = Annotated[bool, typer.Option("--json", help="Print the full records as JSON (the proto3 JSON mapping)")]


def _as_dict(message: Message) -> dict:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def print_json(message: Message) -> None:
    """A message in the proto3 JSON mapping (camelCase keys, enum names), fields at their zero
    value included: a 0 that means something (minReplicas 0, an empty replica list) shows."""
    print(json.dumps(_as_dict(message), indent=2))


def print_json_list(messages: Iterable[Message]) -> None:
    """A JSON array of messages, each as print_json prints one."""
    print(json.dumps([_as_dict(message) for message in messages], indent=2))


def new_table(*columns: Column | str, **options: object) -> Table:
    """The CLI's one table style: a rule under the header and no borders, so that 80 columns
    hold whole ids and more of everything else."""
    return Table(*columns, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True, **options)


def id_column(header: str, values: Iterable[str]) -> Column:
    """A table column of identifiers (ids, names, versions): never wrapped nor cut short, as wide
    as its longest value, so that on a narrow terminal the other columns wrap instead and an id
    copied from the table is whole."""
    return Column(header, no_wrap=True, min_width=max((len(value) for value in values), default=0))


def ago(stamp: Timestamp) -> str:
    """ "12s ago", "3m ago", "never" for an unset time."""
    if not stamp.seconds and not stamp.nanos:
        return "never"
    seconds = max(0.0, time.time() - stamp.ToNanoseconds() / 1e9)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def fail(error: ApiError) -> typer.Exit:
    errors.print(Text.assemble((error.code.name, "red"), f": {error.details}"))
    if error.code.name == "PERMISSION_DENIED" and key_from_environment:
        admin_key = maas_home() / "admin.key"
        errors.print(
            f"This command used the key in $MAAS_API_KEY. To act as the platform admin, pass "
            f'--api-key "$(cat {admin_key})", or `unset MAAS_API_KEY` so that the CLI uses {admin_key}.'
        )
    return typer.Exit(1)


def parse_specs(values: list[str], role: str) -> list[common_pb2.TensorSpec]:
    """ "x:FP32:64" or "image:FP32:1,8,8" (shape without the batch dim; -1 for any size)."""
    specs = []
    for value in values:
        parts = value.split(":")
        if len(parts) != 3:
            raise typer.BadParameter(f"{role} {value!r}: write NAME:DATATYPE:DIM[,DIM...], e.g. x:FP32:64")
        name, dtype, dims = parts
        try:
            shape = [int(d) for d in dims.split(",") if d]
            specs.append(common_pb2.TensorSpec(name=name, datatype=datatype(dtype), shape=shape))
        except ValueError as error:
            raise typer.BadParameter(f"{role} {value!r}: {error}") from None
    return specs
