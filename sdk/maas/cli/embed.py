"""`maas embed` (sentence embeddings from a deployment) and `maas models import-pretrained` (a
pretrained embedding model that ships in a Python package, exported and uploaded as a version)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from maas.cli._shared import (
    AddressOption,
    ApiKeyOption,
    client,
    console,
    errors,
    fail,
    new_table,
    upload_progress,
)
from maas.errors import ApiError

# Columns of a vector the table shows; --json prints all of them.
PREVIEW_DIMS = 4


def embed(
    deployment: str,
    texts: Annotated[list[str], typer.Argument(help="1 to 256 texts, each one argument")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the full vectors as JSON")] = False,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Embed TEXTs with an embedding deployment: one L2-normalised vector per text."""
    try:
        vectors = client(api_key, address).embed(deployment, texts)
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print(json.dumps(vectors.tolist()))
        return
    table = new_table("text", f"vector ({vectors.shape[1]} dims)")
    for text, vector in zip(texts, vectors, strict=True):
        preview = ", ".join(f"{value:+.4f}" for value in vector[:PREVIEW_DIMS])
        table.add_row(text if len(text) <= 60 else text[:59] + "…", f"[{preview}, …]")
    console.print(table)
    if len(texts) > 1:
        console.print("cosine similarity (rows are unit vectors, so this is their dot product):")
        similarity = new_table("", *(str(i) for i in range(len(texts))))
        for i, row in enumerate(vectors @ vectors.T):
            similarity.add_row(str(i), *(f"{value:.3f}" for value in row))
        console.print(similarity)


def import_pretrained(
    name: Annotated[str, typer.Argument(help="The packaged model: all-minilm-l6-v2")],
    model: Annotated[str, typer.Option("--model", help="Registry model to add the version to")],
    alias: Annotated[str, typer.Option(help="Point this alias at the new version")] = "",
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Export a pretrained embedding model shipped in a Python package to ONNX (checked against
    sentence-transformers with onnxruntime) and upload it as a new version. Nothing is downloaded."""
    # Only the upload's rich bar shows: the Hugging Face libraries' tqdm bars ("Loading weights")
    # would interleave with it. tqdm and transformers read these when first imported.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    # Heavy imports (torch, sentence-transformers) wait until the export runs.
    from maas.pretrained import export_embedding, upload_embedding

    maas = client(api_key, address)
    try:
        with tempfile.TemporaryDirectory(prefix="maas-pretrained-") as scratch:
            exported = export_embedding(name, Path(scratch), errors.print)
            errors.print(f"export matches sentence-transformers (max abs diff {exported.max_abs_diff:.1e})")
            with upload_progress() as progress:
                task = progress.add_task("uploading model.onnx", total=exported.path.stat().st_size)
                version = upload_embedding(
                    maas, exported, model, alias=alias, progress=lambda size: progress.advance(task, size)
                )
    except ApiError as error:
        raise fail(error) from None
    except (ValueError, RuntimeError) as error:
        errors.print(Text.assemble(("import failed:", "red"), f" {error}"))
        raise typer.Exit(1) from None
    console.print(
        f"{model} version {version.version} ready: {version.metadata['dimensions']}-dim embeddings, "
        f"from {version.metadata['source']}{f', alias {alias}' if alias else ''}\n"
        f"deploy it with `maas deploy create NAME --model {model} --version {version.version}`, "
        "then `maas embed NAME 'some text'`"
    )
