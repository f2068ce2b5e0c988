"""`maas train ...` and `maas jobs ...`: training jobs and their progress."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from maas.cli._shared import AddressOption, ApiKeyOption, client, console, errors, fail
from maas.client import ARCHITECTURE_FIELDS, Client
from maas.errors import ApiError
from maas.trainer.v1 import trainer_pb2

jobs_app = typer.Typer(help="Training jobs: list, inspect, cancel, watch.", no_args_is_help=True)


def state_name(state: int) -> str:
    return trainer_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def parse_params(values: list[str]) -> dict[str, object]:
    """--param hidden_sizes=[256,128] --param dropout=0.1 --param cell=gru (values are JSON, else text)."""
    params: dict[str, object] = {}
    for value in values:
        key, sep, raw = value.partition("=")
        if not sep:
            raise typer.BadParameter(f"--param {value!r}: write KEY=VALUE, e.g. hidden_sizes=[256,128]")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def train(
    model: Annotated[str, typer.Argument(help="Model to register the result under (created if missing)")],
    architecture: Annotated[str, typer.Option("--arch", help=", ".join(ARCHITECTURE_FIELDS))],
    dataset: Annotated[str, typer.Option(help="digits, iris, wine, breast_cancer, diabetes, shakespeare, "
                                              "or a registry dataset NAME or NAME@VERSION")],
    epochs: Annotated[int | None, typer.Option()] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd, momentum, adam, adamw")] = None,
    schedule: Annotated[str | None, typer.Option(help="constant, step, cosine")] = None,
    weight_decay: Annotated[float | None, typer.Option()] = None,
    patience: Annotated[int | None, typer.Option(help="Early stopping patience in epochs")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    workers: Annotated[int | None, typer.Option(help="Data-parallel processes (torchrun)")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda")] = None,
    max_samples: Annotated[int, typer.Option(help="Use at most this many samples")] = 0,
    param: Annotated[list[str] | None, typer.Option("--param", help="Architecture hyperparameter KEY=VALUE")] = None,
    parent_version: Annotated[int, typer.Option(help="Lineage: the version this one derives from")] = 0,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Show progress until the job ends")] = False,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Train a built-in architecture on a dataset; the result becomes a new model version."""
    options = {k: v for k, v in {
        "epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size, "optimizer": optimizer,
        "schedule": schedule, "weight_decay": weight_decay, "early_stopping_patience": patience, "seed": seed,
        "workers": workers, "device": device, "max_samples": max_samples,
    }.items() if v is not None}
    maas = client(api_key, address)
    try:
        job = maas.train(model, architecture, dataset, parent_version=parent_version,
                         **options, **parse_params(param or []))
    except (ValueError, KeyError) as error:
        raise typer.BadParameter(str(error)) from None
    except ApiError as error:
        raise fail(error) from None
    console.print(f"queued job [bold]{job.id}[/]")
    if follow:
        follow_job(maas, job.id)
    else:
        console.print(f"`maas jobs watch {job.id}` follows it")


def follow_job(maas: Client, job_id: str) -> None:
    """A progress bar over the job's steps, its log lines above it, the outcome at the end."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[status]}"), TimeRemainingColumn())
    finished = None
    try:
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(job_id, total=None, status="queued")
            for event in maas.watch_job(job_id):
                kind = event.WhichOneof("kind")
                if kind == "started":
                    s = event.started
                    resumed = f", resumed from epoch {s.resumed_from_epoch}" if s.resumed_from_epoch else ""
                    bar.console.print(f"started on {s.device} with {s.workers} worker(s){resumed}")
                elif kind == "progress":
                    p = event.progress
                    metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted(p.metrics.items()))
                    bar.update(task, total=p.total_steps or None, completed=p.step,
                               status=f"epoch {p.epoch}/{p.epochs} loss {p.loss:.4f} {metrics}".rstrip())
                elif kind == "log":
                    bar.console.print(f"[dim]{event.log.level}[/] {event.log.message}", markup=True, highlight=False)
                elif kind == "finished":
                    finished = event.finished
    except ApiError as error:
        raise fail(error) from None
    if finished is None:
        return
    if finished.state != trainer_pb2.JOB_STATE_SUCCEEDED:
        errors.print(f"[red]{state_name(finished.state)}[/]: {finished.reason}")
        raise typer.Exit(1)
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted(finished.result.metrics.items()) if k.startswith("test_"))
    console.print(f"[green]SUCCEEDED[/]: {finished.result.model} version {finished.result.version} ({metrics})")


def job_row(job: trainer_pb2.Job) -> list[str]:
    progress = f"{job.progress.epoch}/{job.progress.epochs}" if job.progress.epochs else ""
    result = f"v{job.result.version}" if job.result.version else ""
    if job.kind == trainer_pb2.JOB_KIND_OPTIMIZATION:
        # An optimization job's "architecture" is its method, its data the version it starts from.
        spec = job.optimization
        what, data = spec.WhichOneof("method") or "", f"{spec.model} v{spec.version}"
    else:
        dataset = job.spec.dataset
        what = job.spec.architecture.WhichOneof("kind") or ""
        data = dataset.builtin or f"{dataset.registry.name}@{job.dataset_version}"
    return [job.id, state_name(job.state), job.model, what, data, progress, result, job.message]


def jobs_table(jobs: list[trainer_pb2.Job]) -> Table:
    table = Table("job", "state", "model", "architecture or method", "dataset or source", "epoch", "result", "message")
    for job in jobs:
        table.add_row(*job_row(job))
    return table


@jobs_app.command("list")
def jobs_list(
    state: Annotated[str, typer.Option(help="queued, running, succeeded, failed, cancelled")] = "",
    api_key: ApiKeyOption = None, address: AddressOption = None,
) -> None:
    try:
        jobs = client(api_key, address).list_jobs(state)
    except ValueError:
        raise typer.BadParameter(f"unknown state {state!r}") from None
    except ApiError as error:
        raise fail(error) from None
    console.print(jobs_table(jobs))


@jobs_app.command("get")
def jobs_get(job_id: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        job = client(api_key, address).get_job(job_id)
    except ApiError as error:
        raise fail(error) from None
    console.print(jobs_table([job]))
    for name, value in sorted(job.result.metrics.items()):
        console.print(f"  {name}: {value:.4f}")


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        job = client(api_key, address).cancel_job(job_id)
    except ApiError as error:
        raise fail(error) from None
    console.print(f"job {job.id} is {state_name(job.state)}")


@jobs_app.command("watch")
def jobs_watch(job_id: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """Follow a job's progress (its history first) until it ends."""
    follow_job(client(api_key, address), job_id)
