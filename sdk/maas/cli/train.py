"""`maas train ...` and `maas jobs ...`: training jobs and their progress."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
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
)
from maas.client import ARCHITECTURE_FIELDS, Client
from maas.errors import ApiError
from maas.trainer.v1 import trainer_pb2

jobs_app = typer.Typer(help="Training jobs: list, inspect, cancel, watch.", no_args_is_help=True)

JobIdArgument = Annotated[
    str, typer.Argument(help="A job id, or a unique prefix of one: job- and at least 4 more characters")
]


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
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the job id: JOB=$(maas train ... -q)")] = False,
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
    if quiet:
        print(job.id)
        return
    console.print(f"queued job {job.id}")
    if follow:
        follow_job(maas, job.id)
    else:
        console.print(f"`maas jobs watch {job.id}` follows it")


def follow_job(maas: Client, job_id: str) -> None:
    """A progress bar over the job's steps, its log lines above it, the outcome at the end."""
    # The job id whole; the status (epoch, loss, metrics) takes what is left of the line.
    whole_id = Column(no_wrap=True, min_width=len(job_id))
    columns = (TextColumn("{task.description}", style="bold", markup=False, table_column=whole_id),
               BarColumn(bar_width=16), TaskProgressColumn(), TextColumn("{task.fields[status]}", markup=False),
               TimeRemainingColumn())
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
                    bar.console.print(Text.assemble((event.log.level, "dim"), f" {event.log.message}"), highlight=False)
                elif kind == "finished":
                    finished = event.finished
    except ApiError as error:
        raise fail(error) from None
    if finished is None:
        return
    if finished.state != trainer_pb2.JOB_STATE_SUCCEEDED:
        errors.print(Text.assemble((state_name(finished.state), "red"), f": {finished.reason}"))
        raise typer.Exit(1)
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted(finished.result.metrics.items()) if k.startswith("test_"))
    measured = f" ({metrics})" if metrics else ""
    console.print(
        Text.assemble(("SUCCEEDED", "green"), f": {finished.result.model} version {finished.result.version}{measured}")
    )


def job_row(job: trainer_pb2.Job) -> list[str]:
    state = state_name(job.state)
    if job.progress.epochs and job.state == trainer_pb2.JOB_STATE_RUNNING:
        state += f" {job.progress.epoch}/{job.progress.epochs}"
    result = f"v{job.result.version}" if job.result.version else ""
    if job.kind == trainer_pb2.JOB_KIND_OPTIMIZATION:
        # An optimization job's "architecture" is its method, its data the version it starts from.
        spec = job.optimization
        what, data = spec.WhichOneof("method") or "", f"{spec.model} v{spec.version}"
    else:
        dataset = job.spec.dataset
        what = job.spec.architecture.WhichOneof("kind") or ""
        data = dataset.builtin or f"{dataset.registry.name}@{job.dataset_version}"
    return [job.id, state, job.model, what, data, result]


def jobs_table(jobs: list[trainer_pb2.Job]) -> Table:
    """Whole ids at 80 columns: short headers, no column borders, the epoch inside a running
    job's state, and the message left to `maas jobs get`. A data name folds rather than losing its end."""
    rows = [job_row(job) for job in jobs]
    table = new_table(
        id_column("job", (row[0] for row in rows)), id_column("state", (row[1] for row in rows)),
        id_column("model", (row[2] for row in rows)), Column("method", overflow="fold"),
        Column("data", overflow="fold"), id_column("result", (row[5] for row in rows)),
    )
    for row in rows:
        table.add_row(*row)
    return table


@jobs_app.command("list")
def jobs_list(
    state: Annotated[str, typer.Option(help="queued, running, succeeded, failed, cancelled")] = "",
    as_json: JsonOption = False, api_key: ApiKeyOption = None, address: AddressOption = None,
) -> None:
    try:
        jobs = client(api_key, address).list_jobs(state)
    except ValueError:
        raise typer.BadParameter(f"unknown state {state!r}") from None
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json_list(jobs)
        return
    console.print(jobs_table(jobs))


@jobs_app.command("get")
def jobs_get(
    job_id: JobIdArgument, as_json: JsonOption = False, api_key: ApiKeyOption = None, address: AddressOption = None
) -> None:
    try:
        job = client(api_key, address).get_job(job_id)
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json(job)
        return
    console.print(jobs_table([job]))
    if job.message:
        console.print(f"message: {job.message}", soft_wrap=False)  # prose: wrapped to the terminal
    for name, value in sorted(job.result.metrics.items()):
        console.print(f"  {name}: {value:.4f}")


@jobs_app.command("cancel")
def jobs_cancel(job_id: JobIdArgument, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        job = client(api_key, address).cancel_job(job_id)
    except ApiError as error:
        raise fail(error) from None
    console.print(f"job {job.id} is {state_name(job.state)}")


@jobs_app.command("watch")
def jobs_watch(job_id: JobIdArgument, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """Follow a job's progress (its history first) until it ends."""
    follow_job(client(api_key, address), job_id)
