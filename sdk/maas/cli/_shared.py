"""What every command group shares: consoles, the key and address options, the client."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from maas.client import Client
from maas.common.v1 import common_pb2
from maas.errors import ApiError
from maas.tensors import datatype

console = Console()
errors = Console(stderr=True)


def upload_progress() -> Progress:
    """A bar of bytes sent and their rate, on stderr (stdout stays for results)."""
    return Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=errors
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


def client(api_key: str | None, address: str | None) -> Client:
    if not api_key:
        key_file = maas_home() / "admin.key"
        if key_file.exists():
            api_key = key_file.read_text().strip()
    if not api_key:
        errors.print(
            "[red]no API key:[/] pass --api-key, set MAAS_API_KEY, or run `maas up` to create the admin key"
        )
        raise typer.Exit(2)
    root_certificates = tls_ca.read_bytes() if tls_ca else None
    return Client(address, api_key, root_certificates=root_certificates)


JsonOption = Annotated[bool, typer.Option("--json", help="Print the full record as JSON")]


def print_json(message: Message) -> None:
    """A message in the proto3 JSON mapping (camelCase keys, enum names), fields at their zero
    value included: a 0 that means something (minReplicas 0, an empty replica list) shows."""
    print(json.dumps(json_format.MessageToDict(message, always_print_fields_with_no_presence=True), indent=2))


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
    errors.print(f"[red]{error.code.name}[/]: {error.details}")
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
