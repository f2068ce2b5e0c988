"""`maas models ...`: models and versions in the registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from maas.cli._shared import (
    AddressOption,
    ApiKeyOption,
    client,
    console,
    fail,
    parse_specs,
    upload_progress,
)
from maas.client import FORMATS
from maas.common.v1 import common_pb2
from maas.errors import ApiError
from maas.registry.v1 import registry_pb2

models_app = typer.Typer(help="Models and their versions in the registry.", no_args_is_help=True)


@models_app.command("create")
def model_create(
    name: str, description: str = "", api_key: ApiKeyOption = None, address: AddressOption = None
) -> None:
    try:
        client(api_key, address).create_model(name, description)
    except ApiError as error:
        raise fail(error) from None
    console.print(f"created model [bold]{name}[/]")


@models_app.command("list")
def model_list(api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        models = client(api_key, address).list_models()
    except ApiError as error:
        raise fail(error) from None
    table = Table("model", "latest version", "aliases", "description")
    for model in models:
        aliases = ", ".join(f"{k}→{v}" for k, v in sorted(model.aliases.items()))
        table.add_row(model.name, str(model.latest_version or "-"), aliases, model.description)
    console.print(table)


@models_app.command("upload")
def model_upload(
    model: str,
    artifact: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    format: Annotated[str, typer.Option(help="torchscript or onnx")] = "torchscript",
    input: Annotated[
        list[str] | None, typer.Option("--input", help="NAME:DATATYPE:DIMS, e.g. x:FP32:64")
    ] = None,
    output: Annotated[
        list[str] | None, typer.Option("--output", help="NAME:DATATYPE:DIMS, e.g. logits:FP32:10")
    ] = None,
    alias: Annotated[str, typer.Option(help="Point this alias at the new version")] = "",
    create: Annotated[bool, typer.Option(help="Create the model if it does not exist")] = True,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Upload a TorchScript or ONNX artifact as a new version (streamed, checked by sha256)."""
    if format.lower() not in FORMATS:
        raise typer.BadParameter(f"format must be one of {', '.join(FORMATS)}")
    signature = common_pb2.Signature(
        inputs=parse_specs(input or [], "input"), outputs=parse_specs(output or [], "output")
    )
    maas = client(api_key, address)
    try:
        if create:
            try:
                maas.create_model(model)
            except ApiError as error:
                if error.code.name != "ALREADY_EXISTS":
                    raise
        with upload_progress() as progress:
            task = progress.add_task(f"uploading {artifact.name}", total=artifact.stat().st_size)
            version = maas.upload_version(
                model,
                artifact,
                format=format,
                signature=signature,
                progress=lambda n: progress.advance(task, n),
            )
        if alias:
            maas.set_alias(model, alias, version.version)
    except ApiError as error:
        raise fail(error) from None
    console.print(
        f"{model} version [bold]{version.version}[/] ready (sha256 {version.sha256[:12]}…, "
        f"{version.size_bytes} bytes){f', alias {alias}' if alias else ''}"
    )


@models_app.command("versions")
def model_versions(model: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        versions = client(api_key, address).list_versions(model)
    except ApiError as error:
        raise fail(error) from None
    formats = {v: k for k, v in FORMATS.items()}
    table = Table("version", "format", "precision", "size", "state", "sha256", "created")
    for v in versions:
        table.add_row(
            str(v.version),
            formats.get(v.format, "?"),
            v.precision,
            f"{v.size_bytes:,}",
            registry_pb2.VersionState.Name(v.state).removeprefix("VERSION_STATE_").lower(),
            v.sha256[:12],
            v.create_time.ToJsonString(),
        )
    console.print(table)


@models_app.command("alias")
def model_alias(
    model: str, alias: str, version: int, api_key: ApiKeyOption = None, address: AddressOption = None
) -> None:
    """Point ALIAS (e.g. production) at VERSION."""
    try:
        client(api_key, address).set_alias(model, alias, version)
    except ApiError as error:
        raise fail(error) from None
    console.print(f"{model}@{alias} → {version}")


@models_app.command("download")
def model_download(
    model: str,
    version: int,
    output: Annotated[Path, typer.Option("-o", "--output")],
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    try:
        record = client(api_key, address).download_version(model, version, output)
    except ApiError as error:
        raise fail(error) from None
    console.print(f"wrote {output} ({record.size_bytes} bytes)")


@models_app.command("delete")
def model_delete(model: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        client(api_key, address).delete_model(model)
    except ApiError as error:
        raise fail(error) from None
    console.print(f"deleted {model}")


def compare_table(versions: list[registry_pb2.Version]) -> Table:
    """Versions side by side: precision, format, size, parameters, accuracy and latency. A parent's
    measurements that its own version lacks come from its optimized children, whose jobs took them."""
    measured = {v.version: dict(v.metrics) for v in versions}
    for child in versions:
        model, _, parent = child.metadata.get("parent", "").rpartition(":")
        if model == child.model and parent.isdigit() and int(parent) in measured and "parent_metrics" in child.metadata:
            for name, value in json.loads(child.metadata["parent_metrics"]).items():
                measured[int(parent)].setdefault(name, value)
    formats = {v: k for k, v in FORMATS.items()}
    table = Table("version", "parent", "precision", "format", "size", "parameters", "non-zero", "accuracy",
                  "latency ms")
    for v in versions:
        metrics = measured[v.version]
        if "test_accuracy" in metrics:
            quality = f"{metrics['test_accuracy']:.2%}"
        else:
            quality = f"r2 {metrics['test_r2']:.3f}" if "test_r2" in metrics else "-"
        latency = metrics.get("latency_ms_per_sample")
        parent = v.metadata.get("parent") or (str(v.lineage.parent_version) if v.lineage.parent_version else "-")
        table.add_row(str(v.version), parent, v.precision or "-", formats.get(v.format, "?"), f"{v.size_bytes:,}",
                      _count(metrics, "parameters"), _count(metrics, "nonzero_parameters"), quality,
                      f"{latency:.4f}" if latency is not None else "-")
    return table


def _count(metrics: dict[str, float], name: str) -> str:
    return f"{int(metrics[name]):,}" if name in metrics else "-"


@models_app.command("compare")
def model_compare(model: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """Compare a model's versions (e.g. its fp32 and int8 tiers): size, accuracy and latency."""
    try:
        versions = client(api_key, address).list_versions(model)
    except ApiError as error:
        raise fail(error) from None
    console.print(compare_table(versions))
