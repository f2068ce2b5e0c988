"""What a training job asks for, with its defaults and the checks that need no data.

A spec arrives with unset fields as None; `resolve` fills the documented defaults and rejects
what can never run. `check_fits` then compares it with the dataset's description. Both raise
InvalidArgument with a message that says what to change. No torch here: the service imports
this module; only the worker trains.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from services.common.errors import InvalidArgument

ARCHITECTURES = ("linear", "logistic", "mlp", "cnn", "recurrent", "gpt")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
DEVICES = ("auto", "cpu", "cuda")
TASKS = ("", "classification", "regression")
CELLS = ("lstm", "gru", "rnn")

MAX_BATCH_SIZE = 65_536
MAX_WIDTH = 4096
MAX_LAYERS = 16

# Architecture hyperparameters and their defaults.
ARCHITECTURE_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {},
    "logistic": {},
    "mlp": {"hidden_sizes": [128, 64], "dropout": 0.0},
    "cnn": {"channels": [32, 64], "hidden_size": 128, "dropout": 0.0},
    "recurrent": {"cell": "lstm", "hidden_size": 64, "num_layers": 1, "dropout": 0.0},
    "gpt": {"block_size": 64, "embedding_dim": 64, "num_layers": 2, "num_heads": 4, "dropout": 0.0},
}


@dataclass(frozen=True)
class DatasetInfo:
    """What validation needs to know of a dataset, without its samples."""

    name: str
    kind: str  # "tabular", "image", "text"
    task: str  # "classification", "regression" or "language"
    sample_shape: tuple[int, ...]  # per-sample feature shape; () for text
    samples: int  # rows, or characters for text
    classes: int = 0  # classification: number of classes


@dataclass(frozen=True)
class TrainingSpec:
    architecture: str
    dataset: str  # a built-in name, or a registry dataset of the caller's tenant
    builtin: bool = True
    dataset_version: int = 0  # registry datasets: 0 = newest
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    task: str = ""
    max_samples: int = 0
    optimizer: str = "adam"
    learning_rate: float | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    schedule: str = "constant"
    step_epochs: int | None = None
    step_gamma: float | None = None
    batch_size: int | None = None
    epochs: int | None = None
    early_stopping_patience: int | None = None
    seed: int | None = None
    validation_fraction: float | None = None
    test_fraction: float | None = None
    device: str = "auto"
    workers: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingSpec:
        return cls(**data)

    def lineage_hyperparameters(self) -> dict[str, str]:
        """The resolved spec flattened to strings, as the registry's lineage keeps it."""
        flat = {k: v for k, v in self.to_dict().items() if k not in ("hyperparameters", "dataset", "builtin")}
        flat.update({f"{self.architecture}.{k}": v for k, v in self.hyperparameters.items()})
        return {k: str(v) for k, v in flat.items()}


def resolve(spec: TrainingSpec, *, max_epochs: int, max_workers: int) -> TrainingSpec:
    """The spec with every default filled in; InvalidArgument for values that can never work."""
    if spec.architecture not in ARCHITECTURES:
        raise InvalidArgument(
            f"unknown architecture {spec.architecture[:40]!r}; choose one of {', '.join(ARCHITECTURES)}"
        )
    _one_of("optimizer", spec.optimizer, OPTIMIZERS)
    _one_of("schedule", spec.schedule, SCHEDULES)
    _one_of("device", spec.device, DEVICES)
    _one_of("task", spec.task, TASKS)
    adam_like = spec.optimizer in ("adam", "adamw")
    resolved = replace(
        spec,
        hyperparameters=architecture_parameters(spec.architecture, spec.hyperparameters),
        learning_rate=_default(spec.learning_rate, 1e-3 if adam_like else 1e-2),
        weight_decay=_default(spec.weight_decay, 1e-2 if spec.optimizer == "adamw" else 0.0),
        momentum=_default(spec.momentum, 0.9 if spec.optimizer == "momentum" else 0.0),
        step_epochs=_default(spec.step_epochs, 10),
        step_gamma=_default(spec.step_gamma, 0.1),
        batch_size=_default(spec.batch_size, 64),
        epochs=_default(spec.epochs, 10),
        early_stopping_patience=_default(spec.early_stopping_patience, 0),
        seed=_default(spec.seed, 0),
        validation_fraction=_default(spec.validation_fraction, 0.15),
        test_fraction=_default(spec.test_fraction, 0.15),
        workers=_default(spec.workers, 1),
    )
    _check_numbers(resolved, max_epochs=max_epochs, max_workers=max_workers)
    return resolved


def check_fits(spec: TrainingSpec, data: DatasetInfo) -> str:
    """Whether the architecture can learn this dataset; returns the task it will learn."""
    arch = spec.architecture
    if data.kind == "text":
        if arch != "gpt":
            raise InvalidArgument(f"{data.name} is a text corpus: train the gpt architecture on it")
        block = spec.hyperparameters["block_size"]
        if data.samples < 20 * (block + 1):
            raise InvalidArgument(
                f"{data.name} has {data.samples} characters: too few for block_size {block}; "
                "lower block_size or raise max_samples"
            )
        return "language"
    if arch == "gpt":
        raise InvalidArgument(f"gpt trains on text corpora such as shakespeare; {data.name} is {data.kind} data")
    task = spec.task or data.task
    if arch == "linear" and task != "regression":
        raise InvalidArgument(
            f"linear regression needs a numeric target; {data.name} is a classification dataset: "
            "use logistic (or mlp), or set task to regression"
        )
    if arch == "logistic" and task != "classification":
        raise InvalidArgument(
            f"logistic regression predicts classes; {data.name} has a numeric target: use linear or mlp"
        )
    if task == "classification" and data.classes < 2:
        raise InvalidArgument(
            f"{data.name} needs integer class labels 0..K-1 (K >= 2) in its target for classification; "
            "set task to regression for a numeric target"
        )
    shape = data.sample_shape
    if arch == "cnn":
        if len(shape) not in (2, 3):
            raise InvalidArgument(
                f"cnn needs images, [H, W] or [C, H, W] per sample; {data.name} has samples of shape "
                f"{list(shape)}: use mlp, or upload X shaped as images"
            )
        blocks = len(spec.hyperparameters["channels"])
        if min(shape[-2:]) < 2**blocks:
            raise InvalidArgument(
                f"{blocks} convolution blocks halve {shape[-2]}x{shape[-1]} images {blocks} times: "
                f"use at most {int(math.log2(min(shape[-2:])))} channels entries"
            )
    if arch == "recurrent" and len(shape) not in (1, 2):
        raise InvalidArgument(
            f"recurrent needs sequences, [T, F] or [T] per sample; {data.name} has samples of shape {list(shape)}"
        )
    _check_split(spec, data.samples)
    return task


def _check_split(spec: TrainingSpec, samples: int) -> None:
    used = min(samples, spec.max_samples) if spec.max_samples else samples
    val, test = spec.validation_fraction or 0, spec.test_fraction or 0
    train = used - math.ceil(used * val) - math.ceil(used * test)
    if min(int(used * val), int(used * test)) < 1 or train < max(2, spec.workers or 1):
        raise InvalidArgument(
            f"{used} samples are too few for validation_fraction {val} and test_fraction {test}: "
            "each split needs samples"
        )


def architecture_parameters(arch: str, given: dict[str, Any]) -> dict[str, Any]:
    defaults = ARCHITECTURE_DEFAULTS[arch]
    params = {**defaults, **{k: v for k, v in given.items() if v not in (None, [], 0, "")}}
    # Dropout 0 is meaningful and equals the default, so the filter above loses nothing.
    if not 0.0 <= float(params.get("dropout", 0.0)) < 1.0:
        raise InvalidArgument(f"dropout must be in [0, 1), got {params['dropout']}")
    for key in ("hidden_sizes", "channels"):
        if key in params:
            sizes = [int(v) for v in params[key]]
            if not 1 <= len(sizes) <= MAX_LAYERS or any(not 1 <= v <= MAX_WIDTH for v in sizes):
                raise InvalidArgument(
                    f"{arch} {key} must be 1 to {MAX_LAYERS} sizes between 1 and {MAX_WIDTH}, got {sizes[:20]}"
                )
            params[key] = sizes
    for key in ("hidden_size", "embedding_dim", "block_size"):
        if key in params and not 1 <= int(params[key]) <= MAX_WIDTH:
            raise InvalidArgument(f"{arch} {key} must be between 1 and {MAX_WIDTH}, got {params[key]}")
    for key in ("num_layers", "num_heads"):
        if key in params and not 1 <= int(params[key]) <= MAX_LAYERS:
            raise InvalidArgument(f"{arch} {key} must be between 1 and {MAX_LAYERS}, got {params[key]}")
    if arch == "recurrent":
        _one_of("recurrent cell", params["cell"], CELLS)
    if arch == "gpt" and params["embedding_dim"] % params["num_heads"]:
        raise InvalidArgument(
            f"gpt embedding_dim {params['embedding_dim']} must be a multiple of num_heads {params['num_heads']}"
        )
    return params


def _check_numbers(spec: TrainingSpec, *, max_epochs: int, max_workers: int) -> None:
    checks = [
        (spec.learning_rate is not None and math.isfinite(spec.learning_rate) and 0 < spec.learning_rate <= 10,
         f"learning_rate must be positive and at most 10, got {spec.learning_rate}"),
        (spec.weight_decay is not None and 0 <= spec.weight_decay <= 1,
         f"weight_decay must be in [0, 1], got {spec.weight_decay}"),
        (spec.momentum is not None and 0 <= spec.momentum < 1, f"momentum must be in [0, 1), got {spec.momentum}"),
        (spec.step_epochs is not None and spec.step_epochs >= 1, f"step_epochs must be at least 1, got {spec.step_epochs}"),
        (spec.step_gamma is not None and 0 < spec.step_gamma <= 1, f"step_gamma must be in (0, 1], got {spec.step_gamma}"),
        (spec.batch_size is not None and 1 <= spec.batch_size <= MAX_BATCH_SIZE,
         f"batch_size must be between 1 and {MAX_BATCH_SIZE}, got {spec.batch_size}"),
        (spec.epochs is not None and 1 <= spec.epochs <= max_epochs,
         f"epochs must be between 1 and {max_epochs}, got {spec.epochs}"),
        (spec.early_stopping_patience is not None and 0 <= spec.early_stopping_patience <= max_epochs,
         f"early_stopping_patience must be between 0 and {max_epochs}, got {spec.early_stopping_patience}"),
        (spec.seed is not None and 0 <= spec.seed < 2**63, f"seed must be between 0 and 2^63-1, got {spec.seed}"),
        (spec.max_samples >= 0, f"max_samples must not be negative, got {spec.max_samples}"),
        (spec.workers is not None and 1 <= spec.workers <= max_workers,
         f"workers must be between 1 and {max_workers} on this trainer, got {spec.workers}"),
        (spec.workers is not None and spec.batch_size is not None and spec.batch_size >= spec.workers,
         f"batch_size {spec.batch_size} must be at least workers {spec.workers}: each worker takes a share"),
    ]
    for ok, message in checks:
        if not ok:
            raise InvalidArgument(message)
    for name in ("validation_fraction", "test_fraction"):
        value = getattr(spec, name)
        if not 0 < value < 0.5:
            raise InvalidArgument(f"{name} must be between 0 and 0.5 (exclusive), got {value}")


def _one_of(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        shown = ", ".join(a or "(unset)" for a in allowed)
        raise InvalidArgument(f"unknown {what} {value[:40]!r}; choose one of {shown}")


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value
