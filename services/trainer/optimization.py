"""Optimization jobs as the worker runs them: quantize, prune, distil or export a version.

The source version's TorchScript (downloaded by the service; loaded with torch.jit.load, never
unpickled) is rebuilt as the eager network its training spec describes, with its own weights,
and the data split is rebuilt exactly as training made it (same dataset, seed and fractions).
Then one method runs, and the parent and the result are measured in this same process with the
same thread count: artifact size, parameter and non-zero counts, test metrics and the median
latency of one sample. The service registers the result as a new version with lineage.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import dynamic as quantized
from torch.ao.nn.quantized.dynamic.modules.rnn import RNNBase as QuantizedRNN
from torch.nn.utils import prune as torch_prune

from services.common.errors import FailedPrecondition
from services.trainer.optimization_spec import TRAINING_SPEC_KEY, OptimizationSpec, student_spec
from services.trainer.spec import TrainingSpec
from services.trainer.training import (
    EVAL_BATCH,
    Emit,
    Job,
    Splits,
    evaluate,
    load_splits,
    make_model,
    progress,
    signature,
    training_loss,
)

log = logging.getLogger(__name__)

SOURCE = "source.pt"
TORCHSCRIPT_ARTIFACT = "model.pt"
ONNX_ARTIFACT = "model.onnx"
LATENCY_WARMUP = 20
LATENCY_RUNS = 200
# ONNX parity: the largest difference allowed, relative to the outputs' own scale.
ONNX_TOLERANCE = 1e-4
QUANTIZABLE = {nn.Linear, nn.LSTM, nn.GRU}
PRUNABLE = (nn.Linear, nn.Conv2d)
Model = Callable[[torch.Tensor], torch.Tensor]


class HalfPrecision(nn.Module):
    """fp16 weights behind the fp32 signature: inputs are cast down and outputs back up inside."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(torch.float16)).float()


class OnnxModel:
    """An onnxruntime session that evaluate() and the latency probe can call like a module."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), sess_options=options,
                                                    providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def eval(self) -> OnnxModel:
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: x.cpu().numpy()})[0])


def optimize(folder: Path, config: dict[str, Any], emit: Emit, device: torch.device) -> dict[str, Any]:
    """Run the job's method; returns the result event (artifact, format, precision, metrics of
    the result and of the parent, metadata for the new version)."""
    spec = OptimizationSpec.from_dict(config["optimization"])
    training = TrainingSpec.from_dict(config["spec"])
    torch.manual_seed(spec.seed or 0)
    job = Job(folder=folder, spec=training,
              dataset_file=folder / config["dataset_file"] if config.get("dataset_file") else None,
              dataset_format=config.get("dataset_format", ""), target_column=config.get("target_column", ""))
    splits = load_splits(job)
    source_path = folder / SOURCE
    source = torch.jit.load(str(source_path), map_location="cpu").eval()
    emit({"type": "started", "device": str(device), "workers": 1, "resumed_from_epoch": 0})
    parent_metrics = measure(source, source_path, splits, count_parameters(source))
    log.info("parent: %s", _line(parent_metrics))

    metadata: dict[str, str] = {}
    precision, format = "fp32", "TORCHSCRIPT"
    if spec.method == "distill":
        student_training = student_spec(spec, training)
        optimized = distill(spec, student_training, source, splits, emit, device)
        metadata = {"architecture": spec.student, TRAINING_SPEC_KEY: json.dumps(student_training.to_dict())}
    else:
        optimized = rebuild(training, splits, source)
        if spec.method == "quantize":
            precision = spec.precision
            optimized = quantize(optimized, spec.precision)
        elif spec.method == "prune":
            optimized = prune(spec, training, optimized, splits, emit, device)
    if spec.method == "export":
        format = "ONNX"
        result, artifact = export_onnx(optimized, source, splits, folder)
    else:
        result, artifact = save_torchscript(optimized, folder)
    # Counted on the eager module: a scripted quantized layer hides its packed weights.
    metrics = measure(result, artifact, splits, count_parameters(optimized))
    log.info("%s: %s", spec.summary, _line(metrics))
    return {"type": "result", "artifact": artifact.name, "format": format, "precision": precision,
            "signature": signature(splits), "metrics": metrics, "parent_metrics": parent_metrics,
            "metadata": metadata}


def rebuild(training: TrainingSpec, splits: Splits, source: torch.jit.ScriptModule) -> nn.Module:
    """The eager network of the training spec, holding the source's weights."""
    model = make_model(training, splits)
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as exc:
        raise FailedPrecondition(
            f"the version's weights do not fit the {training.architecture} its {TRAINING_SPEC_KEY} describes: {exc}"
        ) from None
    return model.eval()


# The methods


def quantize(model: nn.Module, precision: str) -> nn.Module:
    if precision == "fp16":
        return HalfPrecision(copy.deepcopy(model)).eval()
    return torch.ao.quantization.quantize_dynamic(model, QUANTIZABLE, dtype=torch.qint8).eval()


def prune(spec: OptimizationSpec, training: TrainingSpec, model: nn.Module, splits: Splits, emit: Emit,
          device: torch.device) -> nn.Module:
    """Zero the smallest-magnitude `target_sparsity` of every linear and convolution weight;
    fine-tuning keeps the mask (pruned weights get no gradient), then the zeros are made permanent."""
    assert spec.target_sparsity is not None and spec.finetune_epochs is not None
    layers = [module for module in model.modules() if isinstance(module, PRUNABLE)]
    if not layers:
        raise FailedPrecondition(f"a {training.architecture} has no linear or convolution layers to prune")
    for layer in layers:
        torch_prune.l1_unstructured(layer, "weight", amount=spec.target_sparsity)
    if spec.finetune_epochs:
        schedule = TrainingSpec.from_dict({**training.to_dict(), "epochs": spec.finetune_epochs})
        model = fit(model, schedule, splits, spec.learning_rate or 1e-3, emit, device,
                    lambda net, _, inputs, targets: training_loss(model, splits.task, net(inputs), targets))
    for layer in layers:
        torch_prune.remove(layer, "weight")
    return model.cpu().eval()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float,
                      alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross entropy on the labels; T^2
    keeps the soft term's gradients on the scale of the hard one's (Hinton et al.)."""
    soft = F.kl_div(F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    return alpha * soft * temperature**2 + (1 - alpha) * F.cross_entropy(student, targets)


def distill(spec: OptimizationSpec, student_training: TrainingSpec, teacher: Model, splits: Splits,
            emit: Emit, device: torch.device) -> nn.Module:
    assert spec.temperature is not None and spec.alpha is not None and spec.learning_rate is not None
    x_train = splits.train[0]
    with torch.inference_mode():
        teacher_logits = torch.cat([teacher(x_train[i : i + EVAL_BATCH]) for i in range(0, len(x_train), EVAL_BATCH)])
    teacher_logits = teacher_logits.clone().to(device)
    student = make_model(student_training, splits)
    temperature, alpha = spec.temperature, spec.alpha

    def loss(net: nn.Module, indices: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return distillation_loss(net(inputs), teacher_logits[indices.to(device)], targets, temperature, alpha)

    return fit(student, student_training, splits, spec.learning_rate, emit, device, loss).cpu().eval()


def fit(model: nn.Module, schedule: TrainingSpec, splits: Splits, learning_rate: float, emit: Emit,
        device: torch.device, loss_of: Callable[..., torch.Tensor]) -> nn.Module:
    """Adam for `schedule.epochs` epochs over the training split (seeded order), reporting
    progress; keeps the weights of the epoch with the best validation loss."""
    assert schedule.epochs is not None and schedule.batch_size is not None
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    x_train, y_train = splits.train
    batch = min(schedule.batch_size, len(x_train))
    steps_per_epoch = max(1, len(x_train) // batch)
    total_steps, step, started = steps_per_epoch * schedule.epochs, 0, time.monotonic()
    best_loss, best_weights = float("inf"), copy.deepcopy(model.state_dict())
    for epoch in range(schedule.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed((schedule.seed or 0) + epoch))
        running = 0.0
        for index in range(steps_per_epoch):
            indices = order[index * batch : (index + 1) * batch]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(model, indices, x_train[indices].to(device), y_train[indices].to(device))
            loss.backward()
            optimizer.step()
            running = loss.item() if index == 0 else 0.9 * running + 0.1 * loss.item()
            step += 1
        metrics = evaluate(model, splits.val, splits.task, device, "val")
        emit(progress(schedule, epoch + 1, step, total_steps, running, step * batch, time.monotonic() - started,
                      metrics))
        if metrics["val_loss"] < best_loss - 1e-6:
            best_loss, best_weights = metrics["val_loss"], copy.deepcopy(model.state_dict())
    model.load_state_dict(best_weights)
    return model


def save_torchscript(model: nn.Module, folder: Path) -> tuple[torch.jit.ScriptModule, Path]:
    """Script and save; the reloaded file is what gets measured and registered."""
    path = folder / TORCHSCRIPT_ARTIFACT
    torch.jit.save(torch.jit.script(model.eval()), str(path))
    return torch.jit.load(str(path)).eval(), path


def export_onnx(model: nn.Module, source: torch.jit.ScriptModule, splits: Splits, folder: Path
                ) -> tuple[OnnxModel, Path]:
    """One self-contained .onnx file (the registry stores one artifact) with a dynamic batch
    dimension, checked against the source TorchScript on the test split with onnxruntime."""
    path = folder / ONNX_ARTIFACT
    names = signature(splits)
    example = splits.test[0][:2].clone()
    torch.onnx.export(
        model, (example,), str(path), input_names=[names["inputs"][0]["name"]],
        output_names=[names["outputs"][0]["name"]], dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True, external_data=False,
    )
    exported = OnnxModel(path, torch.get_num_threads())
    check_parity(exported, source, splits.test[0], "the test split")
    return exported, path


def check_parity(exported: OnnxModel, source: Model, x: torch.Tensor, inputs: str) -> None:
    """FailedPrecondition unless onnxruntime answers like the TorchScript source on `x`."""
    with torch.inference_mode():
        expected = source(x)
    difference = float((exported(x) - expected).abs().max())
    tolerance = ONNX_TOLERANCE * max(1.0, float(expected.abs().max()))
    if not difference <= tolerance:
        raise FailedPrecondition(
            f"the ONNX export differs from the TorchScript source by up to {difference:.3g} on {inputs} "
            f"(tolerance {tolerance:.3g}); it was not registered"
        )
    log.info("ONNX export matches the source within %.3g (largest difference %.3g)", tolerance, difference)


# Measuring


def measure(model: Model, artifact: Path, splits: Splits, counts: tuple[int, int]) -> dict[str, float]:
    metrics = evaluate(model, splits.test, splits.task, torch.device("cpu"), "test")
    parameters, nonzero = counts
    metrics.update(artifact_bytes=float(artifact.stat().st_size), parameters=float(parameters),
                   nonzero_parameters=float(nonzero), latency_ms_per_sample=latency_ms(model, splits.test[0][:1]))
    return metrics


def latency_ms(model: Model, sample: torch.Tensor) -> float:
    """Median wall time of one single-sample call, after a warm-up."""
    times = []
    with torch.inference_mode():
        for run in range(LATENCY_WARMUP + LATENCY_RUNS):
            started = time.perf_counter()
            model(sample)
            if run >= LATENCY_WARMUP:
                times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000.0


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), reading the packed weights of quantized layers too."""
    total = nonzero = 0
    for module in model.modules():
        tensors: list[torch.Tensor | None] = list(module.parameters(recurse=False))
        if isinstance(module, quantized.Linear):
            tensors += [module.weight(), module.bias()]
        elif isinstance(module, QuantizedRNN):
            tensors += [*module.get_weight().values(), *module.get_bias().values()]
        for tensor in tensors:
            if tensor is not None:
                values = tensor.dequantize() if tensor.is_quantized else tensor
                total += values.numel()
                nonzero += int(torch.count_nonzero(values))
    return total, nonzero


def _line(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if math.isfinite(v))
