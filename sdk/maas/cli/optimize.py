"""`maas optimize MODEL --version N ...`: quantize, prune, distil or export a version."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from maas.cli._shared import AddressOption, ApiKeyOption, client, console, fail, new_table
from maas.cli.train import follow_job, parse_params
from maas.client import ARCHITECTURE_FIELDS
from maas.errors import ApiError
from maas.trainer.v1 import trainer_pb2

# What the numbers after the colon of --distill-into mean, per student architecture.
STUDENT_SIZES = {"mlp": "hidden_sizes", "cnn": "channels", "recurrent": "hidden_size"}
# The measurements shown side by side when a followed job ends, in this order.
COMPARED = ("test_accuracy", "test_r2", "test_loss", "artifact_bytes", "parameters", "nonzero_parameters",
            "latency_ms_per_sample")


def student_options(value: str) -> dict[str, object]:
    """mlp:64,32 -> student mlp with hidden_sizes [64, 32]; cnn:16,32 -> channels; recurrent:32 -> hidden_size."""
    architecture, _, sizes = value.partition(":")
    if architecture not in ARCHITECTURE_FIELDS or architecture == "gpt":
        raise typer.BadParameter(f"--distill-into {value!r}: the student is one of linear, logistic, mlp, cnn, recurrent")
    options: dict[str, object] = {"student": architecture}
    if sizes:
        if architecture not in STUDENT_SIZES:
            raise typer.BadParameter(f"--distill-into {value!r}: {architecture} takes no sizes")
        try:
            numbers = [int(n) for n in sizes.split(",")]
        except ValueError:
            raise typer.BadParameter(f"--distill-into {value!r}: sizes are integers, e.g. mlp:64,32") from None
        field = STUDENT_SIZES[architecture]
        options[field] = numbers[0] if field == "hidden_size" else numbers
    return options


def optimize(
    model: Annotated[str, typer.Argument(help="The model whose version is optimized")],
    version: Annotated[int, typer.Option("--version", "-v", help="The version to optimize (the teacher)")],
    quantize: Annotated[str | None, typer.Option(help="int8 (dynamic quantization) or fp16")] = None,
    prune: Annotated[float | None, typer.Option(help="Target sparsity in (0, 1), e.g. 0.5")] = None,
    finetune_epochs: Annotated[int | None, typer.Option(help="Pruning: fine-tuning epochs with the mask held")] = None,
    distill_into: Annotated[str | None, typer.Option(help="Student, e.g. mlp:32, cnn:8,16, logistic")] = None,
    temperature: Annotated[float | None, typer.Option(help="Distillation temperature (default 4)")] = None,
    alpha: Annotated[float | None, typer.Option(help="Distillation: weight of the teacher, in [0, 1]")] = None,
    epochs: Annotated[int | None, typer.Option(help="Distillation epochs (default 30)")] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="Student hyperparameter KEY=VALUE")] = None,
    export: Annotated[str | None, typer.Option(help="onnx")] = None,
    into: Annotated[str, typer.Option(help="Register under this model instead (default: MODEL)")] = "",
    dataset: Annotated[str, typer.Option(help=(
        "Built-in or registry dataset (NAME or NAME@VERSION) to measure accuracy on, fine-tune and distil with; "
        "default: the data the version was trained on. Needed to distil a version uploaded without a "
        "training spec, which is otherwise measured on random inputs (no accuracy)"))] = "",
    seed: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Show progress, then parent vs result")] = False,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Quantize, prune, distil or export a version; the result becomes a new version with lineage."""
    chosen = [name for name, value in (("quantize", quantize), ("prune", prune), ("distill", distill_into),
                                       ("export", export)) if value is not None]
    if len(chosen) != 1:
        raise typer.BadParameter("choose exactly one of --quantize, --prune, --distill-into, --export")
    method = chosen[0]
    options: dict[str, object] = {"seed": seed, "device": device, "dataset": dataset}
    if method == "quantize":
        options["precision"] = quantize
    elif method == "prune":
        options.update(target_sparsity=prune, finetune_epochs=finetune_epochs, learning_rate=learning_rate)
    elif method == "distill":
        assert distill_into is not None
        options.update(student_options(distill_into), **parse_params(param or []), temperature=temperature,
                       alpha=alpha, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size)
    elif (export or "").lower() != "onnx":
        raise typer.BadParameter(f"--export {export!r}: the export format is onnx")
    maas = client(api_key, address)
    try:
        job = maas.optimize(model, version, method, into=into,
                            **{k: v for k, v in options.items() if v not in (None, "")})
    except (ValueError, KeyError) as error:
        raise typer.BadParameter(str(error)) from None
    except ApiError as error:
        raise fail(error) from None
    console.print(f"queued job {job.id}")
    if not follow:
        console.print(f"`maas jobs watch {job.id}` follows it")
        return
    follow_job(maas, job.id)
    try:
        console.print(comparison(maas.get_job(job.id)))
    except ApiError as error:
        raise fail(error) from None


def comparison(job: trainer_pb2.Job) -> Table:
    """The parent's and the result's measurements side by side, with the ratio."""
    result = job.result
    table = new_table("", f"parent v{job.optimization.version}", f"{result.model} v{result.version}", "ratio")
    for name in COMPARED:
        if name in result.metrics and name in result.parent_metrics:
            parent, ours = result.parent_metrics[name], result.metrics[name]
            ratio = f"{ours / parent:.2f}x" if parent else ""
            table.add_row(name, _measure(parent), _measure(ours), ratio)
    return table


def _measure(value: float) -> str:
    """Counts and bytes whole (26,962, not 2.696e+04); times and scores to 4 significant digits."""
    return f"{value:,.0f}" if value >= 1000 and value.is_integer() else f"{value:.4g}"
