"""`maas feedback`: true labels of logged predictions, by the request id each was served with."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from maas.cli._shared import AddressOption, ApiKeyOption, client, console, fail
from maas.errors import ApiError

# Unmatched request ids printed; the count says how many there were.
UNMATCHED_SHOWN = 10


def feedback(
    deployment: str,
    labels: Annotated[
        Path,
        typer.Option(
            exists=True,
            dir_okay=False,
            help='CSV of request_id,label rows (a header row is optional), or JSON: {"request id": label} '
            'or [{"request_id": ..., "label": ...}]',
        ),
    ],
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Send the true labels (class indices, or regression targets) of logged predictions; the
    deployment's live accuracy (`maas deploy drift`) counts them."""
    by_id = read_labels(labels)
    try:
        answer = client(api_key, address).feedback(deployment, by_id)
    except ApiError as error:
        raise fail(error) from None
    console.print(f"{answer.matched} of {len(by_id)} labels attached to logged predictions of {deployment}")
    if unmatched := list(answer.unmatched_request_ids):
        shown = ", ".join(unmatched[:UNMATCHED_SHOWN]) + (", ..." if len(unmatched) > UNMATCHED_SHOWN else "")
        console.print(
            f"{len(unmatched)} not found (not sampled, past retention, or a call of several rows): {shown}"
        )


def read_labels(path: Path) -> dict[str, float]:
    """Request id -> label from a CSV or JSON file; a usage error naming the bad entry."""
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise typer.BadParameter(f"{path} is not valid JSON: {error}") from None
        if isinstance(data, dict):
            pairs = list(data.items())
        elif isinstance(data, list) and all(isinstance(item, dict) for item in data):
            pairs = [(item.get("request_id"), item.get("label")) for item in data]
        else:
            raise typer.BadParameter(f'{path}: give {{"request id": label}} or [{{"request_id": ..., "label": ...}}]')
    else:
        rows = [row for row in csv.reader(io.StringIO(text)) if row]
        if rows and [cell.strip().lower() for cell in rows[0]] == ["request_id", "label"]:
            rows = rows[1:]
        if any(len(row) != 2 for row in rows):
            raise typer.BadParameter(f"{path}: every CSV row is request_id,label")
        pairs = [(row[0].strip(), row[1].strip()) for row in rows]
    if not pairs:
        raise typer.BadParameter(f"{path} holds no labels")
    return {_request_id(path, key): _label(path, key, value) for key, value in pairs}


def _request_id(path: Path, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise typer.BadParameter(f"{path}: a request id is missing or not text: {value!r}")
    return value


def _label(path: Path, request_id: str, value: Any) -> float:
    try:
        label = float(value)
    except (TypeError, ValueError):
        raise typer.BadParameter(f"{path}: the label of {request_id!r} is not a number: {value!r}") from None
    if not math.isfinite(label):
        raise typer.BadParameter(f"{path}: the label of {request_id!r} is not a number: {value!r}")
    return label
