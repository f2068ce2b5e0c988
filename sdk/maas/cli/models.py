"""`maas models ...`: models and versions in the registry."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated

import click
import typer
from rich import filesize
from rich.table import Column, Table
from rich.text import Text
from typer.core import TyperGroup

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
    parse_specs,
    print_json,
    print_json_list,
    upload_progress,
)
from maas.client import FORMATS
from maas.common.v1 import common_pb2
from maas.errors import ApiError
from maas.gateway.v1 import billing_pb2
from maas.registry.v1 import registry_pb2
from maas.tiers import tier_of_version
from maas.trainer.v1 import trainer_pb2

models_app = typer.Typer(help="Models and their versions in the registry.", no_args_is_help=True)


@models_app.command("create")
def model_create(
    name: str,
    description: str = "",
    no_download: Annotated[
        bool, typer.Option("--no-download", help="Only an admin key may download its versions")
    ] = False,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    try:
        client(api_key, address).create_model(name, description, no_download=no_download)
    except ApiError as error:
        raise fail(error) from None
    console.print(Text.assemble("created model ", (name, "bold"), " (no-download)" if no_download else ""))


@models_app.command("update")
def model_update(
    name: str,
    description: Annotated[str | None, typer.Option(help="A new description")] = None,
    no_download: Annotated[
        bool | None,
        typer.Option(
            "--no-download/--allow-download",
            help="Let only admin keys download its versions (any developer), or developers too (an admin)",
        ),
    ] = None,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Change a model's description or who may download it; what is not given stays."""
    if description is None and no_download is None:
        raise typer.BadParameter("give --description, --no-download or --allow-download")
    try:
        model = client(api_key, address).update_model(name, description=description, no_download=no_download)
    except ApiError as error:
        raise fail(error) from None
    who = "admin keys only" if model.no_download else "developer and admin keys"
    console.print(Text.assemble("updated model ", (name, "bold"), f": downloads by {who}"))


@models_app.command("list")
def model_list(as_json: JsonOption = False, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        models = client(api_key, address).list_models()
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json_list(models)
        return
    table = new_table(
        id_column("model", (m.name for m in models)),
        id_column("latest version", (str(m.latest_version) for m in models)),
        Column("aliases", overflow="fold"),  # alias→version pairs fold rather than lose their end
        Column("download", no_wrap=True),  # who may: a no-download model's admins only
        "description",
    )
    for model in models:
        aliases = ", ".join(f"{k}→{v}" for k, v in sorted(model.aliases.items()))
        download = "admins" if model.no_download else "yes"
        table.add_row(model.name, str(model.latest_version or "-"), aliases, download, model.description)
    console.print(table)


@models_app.command("upload")
def model_upload(
    model: str,
    artifact: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    format: Annotated[str, typer.Option(help="torchscript, onnx or safetensors (see import-hf)")] = "torchscript",
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
    created = False
    try:
        if create:
            try:
                maas.create_model(model)
                created = True
            except ApiError as error:
                if error.code.name != "ALREADY_EXISTS":
                    raise
        try:
            with upload_progress() as progress:
                task = progress.add_task(f"uploading {artifact.name}", total=artifact.stat().st_size)
                version = maas.upload_version(
                    model,
                    artifact,
                    format=format,
                    signature=signature,
                    progress=lambda n: progress.advance(task, n),
                )
        except ApiError as error:
            refused = fail(error)
            if created and maas.delete_model_if_empty(model):
                errors.print(f"deleted model {model} again: this command created it for the refused upload")
            raise refused from None
        if alias:
            maas.set_alias(model, alias, version.version)
    except ApiError as error:
        raise fail(error) from None
    console.print(
        f"{model} version {version.version} ready (sha256 {version.sha256[:12]}…, "
        f"{version.size_bytes} bytes){f', alias {alias}' if alias else ''}"
    )


@models_app.command("import-hf")
def model_import_hf(
    path: Annotated[Path, typer.Argument(help="A local Hugging Face model directory (config.json, *.safetensors, "
                                         "tokenizer.json, ...)")],
    model: Annotated[str, typer.Option("--model", help="Registry model to add the version to")],
    alias: Annotated[str, typer.Option(help="Point this alias at the new version")] = "",
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Import a Hugging Face model directory as a new version: a GPT-2, Llama or Qwen2 language
    model (one safetensors file with its tokenizer and chat template), or a BERT encoder for
    embeddings (exported to ONNX, checked against sentence-transformers). Pickled weights and
    custom code are refused; nothing is downloaded."""
    # Only the upload's bar shows: the Hugging Face libraries' tqdm bars would interleave with it.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from maas.hf_import import LANGUAGE, prepare, upload

    maas = client(api_key, address)
    try:
        with tempfile.TemporaryDirectory(prefix="maas-import-hf-") as scratch:
            prepared = prepare(path, Path(scratch), errors.print)
            with upload_progress() as progress:
                task = progress.add_task(f"uploading {prepared.path.name}", total=prepared.path.stat().st_size)
                version = upload(maas, prepared, model, alias=alias, progress=lambda n: progress.advance(task, n))
    except ApiError as error:
        raise fail(error) from None
    except (ValueError, RuntimeError, OSError) as error:
        errors.print(Text.assemble(("import failed:", "red"), f" {error}"))
        raise typer.Exit(1) from None
    meta = version.metadata
    if prepared.kind == LANGUAGE:
        what = (f"{meta['architecture']}, {int(meta['parameters']):,} parameters, context {meta['context_length']}, "
                f"{meta['dtype']}")
        then = "`maas generate NAME 'Once upon a time'`"
    else:
        what = f"{meta['dimensions']}-dim embeddings"
        then = "`maas embed NAME 'some text'`"
    console.print(
        f"{model} version {version.version} ready: {what}{f', alias {alias}' if alias else ''}\n"
        f"deploy it with `maas deploy create NAME --model {model} --version {version.version}`, then {then}"
    )


@models_app.command("versions")
def model_versions(
    model: str, as_json: JsonOption = False, api_key: ApiKeyOption = None, address: AddressOption = None
) -> None:
    try:
        versions = client(api_key, address).list_versions(model)
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json_list(versions)
        return
    formats = {v: k for k, v in FORMATS.items()}
    # Fits 80 columns: a header rule but no column borders, short sizes, sha256 and dates.
    table = new_table(
        "version",
        Column("format", no_wrap=True),
        "precision",
        "size",
        "state",
        "sha256",
        Column("created (UTC)", no_wrap=True),
    )
    for v in versions:
        table.add_row(
            str(v.version),
            formats.get(v.format, "?"),
            v.precision,
            filesize.decimal(v.size_bytes),
            registry_pb2.VersionState.Name(v.state).removeprefix("VERSION_STATE_").lower(),
            v.sha256[:7],
            v.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M"),  # naive UTC
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


def compare_table(
    versions: list[registry_pb2.Version], prices: billing_pb2.ListPricesResponse | None = None
) -> Table:
    """Versions side by side: price tier (its precision, or distilled; "onnx" after it for an ONNX
    version), size, parameters, accuracy, latency and, given the price book, the price per 1,000
    requests of each tier. A parent's measurements that its own version lacks come from its
    optimized children, whose jobs took them."""
    measured = {v.version: dict(v.metrics) for v in versions}
    for child in versions:
        model, _, parent = child.metadata.get("parent", "").rpartition(":")
        if model == child.model and parent.isdigit() and int(parent) in measured and "parent_metrics" in child.metadata:
            for name, value in json.loads(child.metadata["parent_metrics"]).items():
                measured[int(parent)].setdefault(name, value)
    formats = {v: k for k, v in FORMATS.items()}
    parents = {
        v.version: v.metadata.get("parent") or (str(v.lineage.parent_version) if v.lineage.parent_version else "-")
        for v in versions
    }
    # Short headers, the format beside the tier, so that the whole table fits 80 columns; `--json` on
    # `models versions` has every field.
    whole = {"no_wrap": True}
    columns = [id_column("ver", (str(v) for v in parents)), id_column("parent", parents.values()),
               Column("tier", **whole), Column("size", **whole), Column("params", **whole),
               Column("nonzero", **whole), Column("acc", **whole), Column("ms", **whole)]
    if prices is not None:
        columns.append(Column(prices.currency, **whole))
    caption = f"{prices.currency}: price per 1,000 requests of the tier" if prices is not None else None
    table = new_table(*columns, caption=caption, caption_justify="left")
    for v in versions:
        metrics = measured[v.version]
        if "test_accuracy" in metrics:
            quality = f"{metrics['test_accuracy']:.2%}"
        else:
            quality = f"r2 {metrics['test_r2']:.3f}" if "test_r2" in metrics else "-"
        latency = metrics.get("latency_ms_per_sample")
        tier = tier_of_version(v)
        onnx = v.format != registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT
        cells = [str(v.version), parents[v.version], f"{tier} {formats.get(v.format, '?')}" if onnx else tier,
                 filesize.decimal(v.size_bytes),
                 _count(metrics, "parameters"), _count(metrics, "nonzero_parameters"), quality,
                 f"{latency:.4f}" if latency is not None else "-"]
        if prices is not None:
            cells.append(request_price(prices, tier))
        table.add_row(*cells)
    return table


def request_price(prices: billing_pb2.ListPricesResponse, tier: str) -> str:
    """The price per 1,000 requests in force for `tier`: its own, else the tier-less one; "-" when
    requests of that tier are not priced."""
    in_force = {p.tier: p.amount for p in prices.prices if p.resource == "requests" and not p.scheduled}
    return in_force.get(tier) or in_force.get("") or "-"


def _count(metrics: dict[str, float], name: str) -> str:
    return f"{int(metrics[name]):,}" if name in metrics else "-"


@models_app.command("compare")
def model_compare(model: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """Compare a model's versions (e.g. its fp32 and int8 tiers): size, accuracy, latency and price."""
    maas = client(api_key, address)
    try:
        versions = maas.list_versions(model)
        prices = maas.list_prices()
    except ApiError as error:
        raise fail(error) from None
    console.print(compare_table(versions, prices))


class RetrainGroup(TyperGroup):
    """`maas models retrain MODEL --on ...` is `retrain set MODEL --on ...`: a first word that
    names no subcommand is the model of a policy to set (`status`, `now` and `delete` stay
    subcommands, so a model cannot be named after them here)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["set", *args]
        return super().parse_args(ctx, args)


retrain_app = typer.Typer(
    cls=RetrainGroup,
    help="Retraining policies: retrain on new data, measure against the serving version, roll out winners. "
    "`maas models retrain MODEL --on ...` sets a policy (as `retrain set`).",
    no_args_is_help=True,
)
models_app.add_typer(retrain_app, name="retrain")

TRIGGERS = ("new-dataset-version", "schedule", "drift")
ACTIONS = ("register", "alias", "canary")


@retrain_app.command("set")
def retrain_set(
    model: str,
    on: Annotated[str, typer.Option("--on", help="What starts a run: " + ", ".join(TRIGGERS))],
    dataset: Annotated[str, typer.Option(help="The registry dataset each run trains on (its newest version)")],
    from_version: Annotated[int, typer.Option(help="The version whose training spec is reused; 0: the newest "
                                                   "version training made")] = 0,
    metric: Annotated[str, typer.Option(help="accuracy (classifiers) or r2 (regressors); default by the task")] = "",
    min_gain: Annotated[float, typer.Option(help="What a candidate must gain over the serving version")] = 0.0,
    action: Annotated[str, typer.Option(help="What a winner gets: " + ", ".join(ACTIONS))] = "register",
    alias: Annotated[str, typer.Option(help="alias: the alias moved to a winner")] = "",
    deployment: Annotated[str, typer.Option(help="The deployment serving the model: its version is the one to "
                                                 "beat, drift is watched and canaries start on it")] = "",
    canary_weight: Annotated[int, typer.Option(help="canary: percent of requests (default 10)")] = 0,
    canary_window: Annotated[int, typer.Option(help="canary: seconds it must hold before promotion "
                                                    "(default 60)")] = 0,
    interval: Annotated[int, typer.Option(help="schedule: seconds between runs (at least 60)")] = 0,
    drift_threshold: Annotated[float, typer.Option(help="drift: the PSI that starts a run (default 0.2)")] = 0.0,
    cooldown: Annotated[int, typer.Option(help="Least seconds between automatic runs (default 600)")] = 0,
    as_json: JsonOption = False,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Store (or replace) MODEL's retraining policy."""
    if on not in TRIGGERS:
        raise typer.BadParameter(f"--on must be one of {', '.join(TRIGGERS)}")
    if action not in ACTIONS:
        raise typer.BadParameter(f"--action must be one of {', '.join(ACTIONS)}")
    try:
        policy = client(api_key, address).set_retrain_policy(
            model, on=on, dataset=dataset, from_version=from_version, metric=metric, min_gain=min_gain,
            action=action, alias=alias, deployment=deployment, canary_weight=canary_weight,
            canary_window=canary_window, interval=interval, drift_threshold=drift_threshold, cooldown=cooldown,
        )
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json(policy)
        return
    console.print(Text.assemble("retraining policy of ", (model, "bold"), " set: ", describe_policy(policy)))


def describe_policy(policy: trainer_pb2.RetrainPolicy) -> str:
    """One paragraph: what starts a run, what it trains, the gate, what a winner gets."""
    trigger = {
        trainer_pb2.RETRAIN_TRIGGER_NEW_DATASET_VERSION:
            f"each new version of dataset {policy.dataset} (after version {policy.last_dataset_version})",
        trainer_pb2.RETRAIN_TRIGGER_SCHEDULE: f"every {policy.interval_seconds} s on dataset {policy.dataset}",
        trainer_pb2.RETRAIN_TRIGGER_DRIFT:
            f"drift of {policy.deployment} reaching PSI {policy.drift_threshold:g}, on dataset {policy.dataset}",
    }.get(policy.trigger, "?")
    if policy.action == trainer_pb2.RETRAIN_ACTION_ALIAS:
        winner = f"alias {policy.alias} moves to it"
    elif policy.action == trainer_pb2.RETRAIN_ACTION_CANARY:
        winner = (f"a {policy.canary_weight_percent}% canary on {policy.deployment}, promoted after "
                  f"{policy.canary_window_seconds} s (rolled back above {policy.canary_max_error_rate:g} errors)")
    else:
        winner = "it is registered"
    return (f"retrains with the spec of version {policy.from_version} on {trigger}, at most every "
            f"{policy.cooldown_seconds} s; a candidate must gain {policy.min_gain:g} {policy.metric} over the "
            f"serving version on the same test split; a winner: {winner}")


def run_state_name(state: int) -> str:
    return trainer_pb2.RetrainRunState.Name(state).removeprefix("RETRAIN_RUN_STATE_")


@retrain_app.command("status")
def retrain_status(
    model: str, as_json: JsonOption = False, api_key: ApiKeyOption = None, address: AddressOption = None
) -> None:
    """MODEL's policy, its latest runs (newest first) and their events."""
    try:
        status = client(api_key, address).get_retrain_policy(model)
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json(status)
        return
    console.print(Text.assemble((model, "bold"), ": ", describe_policy(status.policy)))
    if not status.runs:
        console.print("no runs yet")
        return
    # What started each run and how it ended are in its events (triggered, ..., promoted or rejected).
    rows = [(run.id, run_state_name(run.state), str(run.dataset_version), run.job_id or "-", _result(run))
            for run in status.runs]
    runs = new_table(
        id_column("run", (r[0] for r in rows)), id_column("state", (r[1] for r in rows)),
        id_column("data", (r[2] for r in rows)), id_column("job", (r[3] for r in rows)),
        Column(status.policy.metric or "metric", overflow="fold"), title="runs", title_justify="left",
    )
    for row in rows:
        runs.add_row(*row)
    console.print(runs)
    console.print(Text("events", style="italic"))
    # One line each, never broken: messages are long, ids must stay whole.
    for event in status.events:
        console.print(f"{event.time.ToDatetime().strftime('%Y-%m-%d %H:%M:%S')}  {event.run_id}  "
                      f"{event.step}: {event.message}")


def _result(run: trainer_pb2.RetrainRun) -> str:
    """v3 0.9565 vs v2 0.9130, once measured (a run that failed before its evaluation has neither)."""
    unmeasured = (trainer_pb2.RETRAIN_RUN_STATE_TRAINING, trainer_pb2.RETRAIN_RUN_STATE_EVALUATING)
    if run.state in unmeasured or not (run.candidate_metric or run.serving_metric):
        return f"v{run.candidate_version}" if run.candidate_version else "-"
    serving = f"v{run.serving_version} {run.serving_metric:.4f}" if run.serving_version else "none"
    return f"v{run.candidate_version} {run.candidate_metric:.4f} vs {serving}"


@retrain_app.command("now")
def retrain_now(model: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """Start a run of MODEL's policy now, whatever its trigger and cooldown."""
    try:
        run = client(api_key, address).trigger_retrain(model)
    except ApiError as error:
        raise fail(error) from None
    if run.state == trainer_pb2.RETRAIN_RUN_STATE_FAILED:
        errors.print(Text.assemble(("run failed: ", "red"), f"{run.id}: {run.message}"))
        raise typer.Exit(1)
    console.print(f"run {run.id} started: training job {run.job_id} on dataset version {run.dataset_version}; "
                  f"follow it with `maas models retrain status {model}`")


@retrain_app.command("delete")
def retrain_delete(model: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """Delete MODEL's policy and its history; a run in progress stops and its canary is rolled back."""
    try:
        client(api_key, address).delete_retrain_policy(model)
    except ApiError as error:
        raise fail(error) from None
    console.print(f"deleted the retraining policy of {model}")
