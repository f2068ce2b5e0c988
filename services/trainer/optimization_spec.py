"""What an optimization job asks for, with its defaults and the checks that need no data.

Like spec.py for training: unset fields arrive as None, `resolve_optimization` fills the
documented defaults and raises InvalidArgument for what can never run. `check_source` then
compares the request with the version to optimize, as the registry describes it, and
`check_uploaded_data` the dataset named for a version the trainer did not produce. No torch here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from services.common.errors import FailedPrecondition, InvalidArgument
from services.trainer.spec import ARCHITECTURES, TASKS, DatasetInfo, TrainingSpec, architecture_parameters

METHODS = ("quantize", "prune", "distill", "export")
PRECISIONS = ("int8", "fp16")
# Architectures a distilled student may have: they all end in one logit per class.
STUDENTS = ("linear", "logistic", "mlp", "cnn", "recurrent")
# The metadata key under which training registers its resolved spec: what an optimization job
# needs to rebuild the network and the exact data split of the version it starts from.
TRAINING_SPEC_KEY = "training_spec"
# The metadata key of an optimized version holding its parent's measurements (JSON), taken in its job.
PARENT_METRICS_KEY = "parent_metrics"
SOURCE_FORMATS = ("TORCHSCRIPT", "ONNX")
# A dataset named for a version without a training spec is split like training's defaults.
DATA_FRACTION = 0.15
DATA_BATCH_SIZE = 64


@dataclass(frozen=True)
class OptimizationSpec:
    model: str
    version: int
    method: str  # one of METHODS
    precision: str = ""  # quantize: int8 or fp16
    target_sparsity: float | None = None  # prune
    finetune_epochs: int | None = None  # prune
    learning_rate: float | None = None  # prune fine-tuning, distill
    student: str = ""  # distill: the student's architecture ...
    student_hyperparameters: dict[str, Any] = field(default_factory=dict)  # ... and its parameters
    temperature: float | None = None
    alpha: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    # Another dataset for fine-tuning, distillation and measuring; "" uses the source's own.
    dataset: str = ""
    builtin: bool = True
    dataset_version: int = 0
    task: str = ""
    max_samples: int = 0
    seed: int | None = None
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimizationSpec:
        return cls(**data)

    @property
    def summary(self) -> str:
        """One line naming the method, for the version's metadata and log lines."""
        if self.method == "quantize":
            return f"quantize {self.precision}"
        if self.method == "prune":
            return f"prune to {self.target_sparsity:g} sparsity, {self.finetune_epochs} fine-tuning epochs"
        if self.method == "distill":
            return f"distill into {self.student}, temperature {self.temperature:g}, alpha {self.alpha:g}"
        return "export onnx"

    def lineage_hyperparameters(self) -> dict[str, str]:
        flat = {k: v for k, v in self.to_dict().items() if k != "student_hyperparameters" and v not in (None, "")}
        flat.update({f"student.{k}": v for k, v in self.student_hyperparameters.items()})
        return {k: str(v) for k, v in flat.items()}


def resolve_optimization(spec: OptimizationSpec, *, max_epochs: int) -> OptimizationSpec:
    """The spec with its method's defaults; InvalidArgument for values that can never work."""
    if spec.version < 1:
        raise InvalidArgument("version must name the version to optimize (1 or more)")
    if spec.method not in METHODS:
        raise InvalidArgument(f"choose a method: one of {', '.join(METHODS)}")
    if spec.seed is not None and not 0 <= spec.seed < 2**63:
        raise InvalidArgument(f"seed must be between 0 and 2^63-1, got {spec.seed}")
    if spec.max_samples < 0:
        raise InvalidArgument(f"max_samples must not be negative, got {spec.max_samples}")
    if spec.task not in TASKS:
        raise InvalidArgument(f"unknown dataset task {spec.task[:40]!r}; choose classification or regression")
    if spec.device not in ("auto", "cpu", "cuda"):
        raise InvalidArgument(f"unknown device {spec.device[:40]!r}; choose one of auto, cpu, cuda")
    resolved = replace(spec, seed=0 if spec.seed is None else spec.seed)
    if spec.method == "quantize":
        if spec.precision not in PRECISIONS:
            raise InvalidArgument(f"quantize needs a precision: one of {', '.join(PRECISIONS)}")
        return resolved
    if spec.method == "prune":
        sparsity = spec.target_sparsity
        if sparsity is None or not math.isfinite(sparsity) or not 0 < sparsity < 1:
            raise InvalidArgument(f"target_sparsity must be between 0 and 1 (exclusive), e.g. 0.5; got {sparsity}")
        resolved = replace(resolved, finetune_epochs=_default(spec.finetune_epochs, 0),
                           learning_rate=_default(spec.learning_rate, 1e-3))
        _check_epochs("finetune_epochs", resolved.finetune_epochs, max_epochs, minimum=0)
        _check_learning_rate(resolved.learning_rate)
        return resolved
    if spec.method == "distill":
        return _resolve_distill(resolved, max_epochs)
    return resolved


def _resolve_distill(spec: OptimizationSpec, max_epochs: int) -> OptimizationSpec:
    if spec.student not in STUDENTS:
        shown = spec.student or "(unset)"
        if spec.student in ARCHITECTURES:
            raise InvalidArgument(f"the student must be a classifier ({', '.join(STUDENTS)}); {shown} is not one")
        raise InvalidArgument(f"distill needs a student architecture: one of {', '.join(STUDENTS)}; got {shown[:40]}")
    resolved = replace(
        spec,
        student_hyperparameters=architecture_parameters(spec.student, spec.student_hyperparameters),
        temperature=_default(spec.temperature, 4.0),
        alpha=_default(spec.alpha, 0.7),
        epochs=_default(spec.epochs, 30),
        learning_rate=_default(spec.learning_rate, 1e-3),
        batch_size=_default(spec.batch_size, 64),
    )
    assert resolved.temperature is not None and resolved.alpha is not None and resolved.batch_size is not None
    if not math.isfinite(resolved.temperature) or resolved.temperature <= 0:
        raise InvalidArgument(f"temperature must be positive, e.g. 4; got {resolved.temperature}")
    if not 0 <= resolved.alpha <= 1:
        raise InvalidArgument(f"alpha weighs the teacher against the labels and must be in [0, 1]; got {resolved.alpha}")
    _check_epochs("epochs", resolved.epochs, max_epochs, minimum=1)
    _check_learning_rate(resolved.learning_rate)
    if not 1 <= resolved.batch_size <= 65_536:
        raise InvalidArgument(f"batch_size must be between 1 and 65536, got {resolved.batch_size}")
    return resolved


@dataclass(frozen=True)
class SourceVersion:
    """The registry's description of the version to optimize."""

    model: str
    version: int
    format: str  # TORCHSCRIPT, ONNX, ...
    precision: str
    metadata: dict[str, str]
    dataset_version: int = 0  # lineage: the registry dataset version it was trained on
    signature: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # {"inputs": [{name, datatype, shape}], ...}

    @property
    def name(self) -> str:
        return f"{self.model} version {self.version}"

    @property
    def trained(self) -> bool:
        """Whether its eager network can be rebuilt: TorchScript with the training spec it was made with.
        Any other version is optimized as the artifact it is (see optimization_uploaded.py)."""
        return self.format == "TORCHSCRIPT" and bool(self.metadata.get(TRAINING_SPEC_KEY))


def check_source(spec: OptimizationSpec, source: SourceVersion) -> TrainingSpec | None:
    """Whether this version can be optimized so. Returns the spec of the data the job uses: for a
    trained version, the training spec it was made with (data source replaced when the request
    names another dataset); for any other, the dataset named or the training data its metadata
    records, or None when there is none (it is then measured on random inputs, without accuracy)."""
    name = source.name
    if source.format not in SOURCE_FORMATS:
        raise InvalidArgument(f"{name} is {source.format}: optimization starts from a TorchScript or ONNX version")
    precision = source.precision or "fp32"
    # Every method rebuilds or measures the float network; a quantized teacher would be counted wrong.
    if precision != "fp32":
        raise InvalidArgument(
            f"{name} is already {precision}: {spec.method} starts from an fp32 version (its parent, for example)"
        )
    if not source.trained:
        return _check_uploaded(spec, source)
    training = _training_spec(source)
    task = source.metadata.get("task", "")
    if spec.method == "distill" and task != "classification":
        raise InvalidArgument(f"distillation needs a classifier teacher; {name} is a {task or 'unknown'} model")
    if spec.method == "export" and training.architecture == "gpt":
        raise InvalidArgument(f"{name} is a gpt text model: ONNX export covers models with one fixed-shape input")
    return _data_of(spec, source, training)


def _check_uploaded(spec: OptimizationSpec, source: SourceVersion) -> TrainingSpec | None:
    """A version the trainer cannot rebuild is fed tensors of its signature: random ones, or the
    samples of a dataset reshaped to its input."""
    name = source.name
    inputs, outputs = source.signature.get("inputs", []), source.signature.get("outputs", [])
    if not (len(inputs) == 1 and len(outputs) == 1 and all(t["datatype"] == "FP32" for t in inputs + outputs)
            and all(d > 0 for d in inputs[0]["shape"])):
        shown = "; ".join(f"{t['name']} {t['datatype']} {t['shape']}" for t in inputs + outputs)
        raise InvalidArgument(
            f"{name} has no {TRAINING_SPEC_KEY} metadata, so it is optimized as the artifact it is: that needs one "
            f"FP32 input of fixed shape and one FP32 output, and its signature has {shown or 'no tensors'}"
        )
    if spec.method == "export" and source.format == "ONNX":
        raise InvalidArgument(f"{name} is already ONNX: export starts from a TorchScript version")
    if spec.method == "prune" and spec.finetune_epochs and source.format == "ONNX":
        raise InvalidArgument(f"{name} is ONNX, which the trainer cannot fine-tune: prune it with finetune_epochs 0")
    # An ONNX export of a trained version keeps its parent's metadata, training data included.
    if source.metadata.get(TRAINING_SPEC_KEY):
        return _data_of(spec, source, _training_spec(source))
    if spec.dataset:
        return TrainingSpec(
            architecture="",  # no network: the data only, split as training would split it
            dataset=spec.dataset, builtin=spec.builtin, dataset_version=spec.dataset_version, task=spec.task,
            max_samples=spec.max_samples, seed=spec.seed, batch_size=spec.batch_size or DATA_BATCH_SIZE,
            validation_fraction=DATA_FRACTION, test_fraction=DATA_FRACTION, workers=1,
        )
    if spec.method == "distill":
        raise InvalidArgument(
            f"distillation needs a dataset: pass --dataset NAME ({name} has no {TRAINING_SPEC_KEY} metadata naming "
            "the data it was trained on)"
        )
    if spec.method == "prune" and spec.finetune_epochs:
        raise InvalidArgument("fine-tuning after pruning needs a dataset: pass --dataset NAME, or finetune_epochs 0")
    return None


def check_uploaded_data(spec: OptimizationSpec, source: SourceVersion, data: TrainingSpec,
                        info: DatasetInfo) -> DatasetInfo:
    """Whether the dataset fits a version optimized as the artifact it is; returns it as the job
    feeds it, every sample reshaped to the version's input (digits' 8x8 images to an input of 64)."""
    name = source.name
    (tensor,) = source.signature["inputs"]
    shape = tuple(tensor["shape"])
    if info.kind == "text":
        raise InvalidArgument(f"{info.name} is a text corpus; {name} takes {tensor['name']} of shape {list(shape)}")
    if math.prod(info.sample_shape) != math.prod(shape):
        raise InvalidArgument(
            f"{info.name} has samples of shape {list(info.sample_shape)}; {name} takes {tensor['name']} of shape "
            f"{list(shape)}: pass a dataset with {math.prod(shape)} features per sample"
        )
    task = data.task or info.task
    outputs = math.prod(source.signature["outputs"][0]["shape"])
    if task == "classification" and outputs != info.classes:
        raise InvalidArgument(
            f"{info.name} has {info.classes} classes; {name} returns {outputs} values per sample: "
            "pass a dataset with one class per output"
        )
    if spec.method == "distill" and task != "classification":
        raise InvalidArgument(f"distillation needs a classification dataset; {info.name} is a {task} dataset")
    return replace(info, sample_shape=shape)


def _training_spec(source: SourceVersion) -> TrainingSpec:
    try:
        return TrainingSpec.from_dict(json.loads(source.metadata[TRAINING_SPEC_KEY]))
    except (ValueError, TypeError) as exc:
        raise FailedPrecondition(f"{source.name} has unreadable {TRAINING_SPEC_KEY} metadata: {exc}") from None


def _data_of(spec: OptimizationSpec, source: SourceVersion, training: TrainingSpec) -> TrainingSpec:
    if not training.builtin:
        training = replace(training, dataset_version=source.dataset_version)
    if spec.dataset:
        training = replace(training, dataset=spec.dataset, builtin=spec.builtin, dataset_version=spec.dataset_version,
                           task=spec.task or training.task, max_samples=spec.max_samples)
    return training


def student_spec(spec: OptimizationSpec, teacher: TrainingSpec) -> TrainingSpec:
    """The student trains on the teacher's data split; linear and logistic are the same affine
    map here, checked as the classifier it is."""
    architecture = "logistic" if spec.student == "linear" else spec.student
    return replace(teacher, architecture=architecture, hyperparameters=spec.student_hyperparameters,
                   task="classification", epochs=spec.epochs, batch_size=spec.batch_size,
                   learning_rate=spec.learning_rate, workers=1)


def _check_epochs(name: str, value: int | None, max_epochs: int, minimum: int) -> None:
    if value is None or not minimum <= value <= max_epochs:
        raise InvalidArgument(f"{name} must be between {minimum} and {max_epochs}, got {value}")


def _check_learning_rate(value: float | None) -> None:
    if value is None or not math.isfinite(value) or not 0 < value <= 10:
        raise InvalidArgument(f"learning_rate must be positive and at most 10, got {value}")


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value
