"""Optimization jobs on a version the trainer cannot rebuild: a TorchScript file uploaded without
training_spec metadata, or any ONNX version. The methods work on the artifact itself.

TorchScript: int8 is graph-mode dynamic quantization of its linear layers (quantize_dynamic_jit,
which also freezes the module), fp16 halves a copy behind a wrapper that keeps the FP32
signature, pruning zeroes a copy's weights in place, export goes through torch.onnx's TorchScript
exporter. ONNX: int8 is onnxruntime's dynamic quantization, fp16 onnxruntime's float16 converter
(inputs and outputs stay FP32), pruning zeroes initializers. Distillation trains a student on the
teacher's logits as for trained versions.

The inputs come from the version's signature: without a dataset, seeded random samples of its
input (for latency and the ONNX parity check; no accuracy); with one, its samples reshaped to the
input and split as training splits data (seed and fractions), measured on the test split.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from services.common.errors import FailedPrecondition
from services.trainer.optimization import (
    ONNX_ARTIFACT,
    SOURCE,
    HalfPrecision,
    Model,
    OnnxModel,
    check_parity,
    count_parameters,
    distill,
    fit,
    latency_ms,
    save_torchscript,
)
from services.trainer.optimization_spec import OptimizationSpec, student_spec
from services.trainer.spec import TrainingSpec
from services.trainer.training import Emit, Job, Splits, evaluate, load_splits, loss_of

log = logging.getLogger(__name__)

RANDOM_SAMPLES = 64
# What quantize_dynamic_jit leaves of each nn.Linear / F.linear: an int8 packed weight.
PACKED_LINEAR = "quantized::linear_dynamic"


def optimize(folder: Path, config: dict[str, Any], emit: Emit, device: torch.device) -> dict[str, Any]:
    """Run the job's method on the source artifact; returns the result event, as optimization.optimize."""
    spec = OptimizationSpec.from_dict(config["optimization"])
    signature, onnx_source = config["source"]["signature"], config["source"]["format"] == "ONNX"
    torch.manual_seed(spec.seed or 0)
    shape = tuple(signature["inputs"][0]["shape"])
    data = TrainingSpec.from_dict(config["spec"]) if config["spec"] else None
    splits = load_reshaped(folder, config, data, shape) if data else None
    samples = splits.test[0] if splits else torch.randn((RANDOM_SAMPLES, *shape),
                                                        generator=torch.Generator().manual_seed(spec.seed or 0))
    source_path = folder / SOURCE
    source: Model = (OnnxModel(source_path, torch.get_num_threads()) if onnx_source
                     else torch.jit.load(str(source_path), map_location="cpu").eval())
    emit({"type": "started", "device": str(device), "workers": 1, "resumed_from_epoch": 0})
    parent_metrics = measure(source, source_path, samples, splits, count_artifact(source_path, onnx_source))

    metadata: dict[str, str] = {}
    counts = None
    if spec.method == "distill":
        assert data is not None and splits is not None
        student = distill(spec, student_spec(spec, data), source, splits, emit, device)
        metadata = {"architecture": spec.student}
        result, artifact = save_torchscript(student, folder)
        counts = count_parameters(student)  # its parameters, as for a student of a trained version
    elif onnx_source:
        artifact = optimize_onnx(spec, source_path, folder / ONNX_ARTIFACT)
        result = OnnxModel(artifact, torch.get_num_threads())
    elif spec.method == "export":
        artifact = folder / ONNX_ARTIFACT
        export_scripted(source, signature, samples, artifact)
        result = OnnxModel(artifact, torch.get_num_threads())
        check_parity(result, source, samples, "the test split" if splits else f"{len(samples)} random inputs")
    else:
        assert isinstance(source, torch.jit.ScriptModule)
        result, artifact = save_torchscript(
            optimize_scripted(spec, source, source_path, samples, data, splits, emit, device), folder)
    onnx_result = artifact.suffix == ".onnx"
    metrics = measure(result, artifact, samples, splits, counts or count_artifact(artifact, onnx_result))
    log.info("%s: %s", spec.summary, ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return {"type": "result", "artifact": artifact.name, "format": "ONNX" if onnx_result else "TORCHSCRIPT",
            "precision": spec.precision if spec.method == "quantize" else "fp32", "signature": signature,
            "metrics": metrics, "parent_metrics": parent_metrics, "metadata": metadata}


def load_reshaped(folder: Path, config: dict[str, Any], data: TrainingSpec, shape: tuple[int, ...]) -> Splits:
    """The dataset's splits, every sample reshaped to the version's input (the service checked the sizes)."""
    splits = load_splits(Job(
        folder=folder, spec=data, dataset_file=folder / config["dataset_file"] if config.get("dataset_file") else None,
        dataset_format=config.get("dataset_format", ""), target_column=config.get("target_column", ""),
    ))

    def fit_input(part: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return part[0].reshape(len(part[0]), *shape), part[1]

    return replace(splits, train=fit_input(splits.train), val=fit_input(splits.val), test=fit_input(splits.test),
                   sample_shape=shape)


# TorchScript


def optimize_scripted(spec: OptimizationSpec, source: torch.jit.ScriptModule, source_path: Path,
                      samples: torch.Tensor, data: TrainingSpec | None, splits: Splits | None, emit: Emit,
                      device: torch.device) -> nn.Module:
    # fp16 and pruning change a copy, loaded again: deepcopy would clone the weights as non-leaf
    # tensors that no optimizer can train.
    if spec.method == "prune":
        return prune_scripted(spec, torch.jit.load(str(source_path), map_location="cpu"), data, splits, emit, device)
    if spec.precision == "fp16":
        half = HalfPrecision(torch.jit.load(str(source_path), map_location="cpu")).eval()
        try:
            with torch.inference_mode():
                half(samples[:2])
        except RuntimeError as exc:
            raise FailedPrecondition(
                f"the model does not run in half precision ({exc}); quantize it to int8 instead") from None
        return half
    quantized = torch.ao.quantization.quantize_dynamic_jit(source, {"": torch.ao.quantization.default_dynamic_qconfig})
    if not quantized.graph.findAllNodes(PACKED_LINEAR):
        raise FailedPrecondition("the model has no linear layers: dynamic int8 quantization would change nothing")
    return quantized


def prune_scripted(spec: OptimizationSpec, model: torch.jit.ScriptModule, data: TrainingSpec | None,
                   splits: Splits | None, emit: Emit, device: torch.device) -> torch.jit.ScriptModule:
    """Zero the smallest-magnitude `target_sparsity` of every weight of two or more dimensions, in
    place; fine-tuning (with a dataset) masks the gradients, so the zeros stay zeros."""
    assert spec.target_sparsity is not None
    # On the training device before the gradient hooks are set: moving it later would drop them.
    model = model.to(device if spec.finetune_epochs else torch.device("cpu"))
    weights = [weight for weight in model.parameters() if weight.dim() >= 2 and weight.is_floating_point()]
    if not weights:
        raise FailedPrecondition("the model has no weights of two or more dimensions to prune")
    with torch.no_grad():
        masks = [magnitude_mask(weight, spec.target_sparsity) for weight in weights]
        for weight, mask in zip(weights, masks, strict=True):
            weight.mul_(mask)
    if spec.finetune_epochs:
        assert data is not None and splits is not None and spec.learning_rate is not None
        for weight, mask in zip(weights, masks, strict=True):
            weight.register_hook(lambda grad, mask=mask: grad * mask)
        schedule = replace(data, epochs=spec.finetune_epochs)
        model = fit(model, schedule, splits, spec.learning_rate, emit, device,
                    lambda net, _, inputs, targets: loss_of(splits.task, net(inputs), targets))
    return model.cpu().eval()


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """1 everywhere but at the round(sparsity * n) smallest magnitudes, as torch's l1_unstructured."""
    mask = torch.ones(weight.shape, dtype=weight.dtype, device=weight.device)
    count = round(sparsity * weight.numel())
    if count:
        mask.view(-1)[torch.topk(weight.abs().reshape(-1), count, largest=False).indices] = 0
    return mask


def export_scripted(source: torch.jit.ScriptModule, signature: dict[str, Any], samples: torch.Tensor,
                    path: Path) -> None:
    """One self-contained .onnx file with the version's tensor names and a dynamic batch dimension.
    torch.export cannot trace a ScriptModule; the TorchScript exporter can."""
    (given,), (returned,) = signature["inputs"], signature["outputs"]
    names = [given["name"], returned["name"]]
    torch.onnx.export(source, (samples[:2],), str(path), input_names=names[:1], output_names=names[1:],
                      dynamic_axes={name: {0: "batch"} for name in names}, dynamo=False)


# ONNX


def optimize_onnx(spec: OptimizationSpec, source: Path, path: Path) -> Path:
    import onnx
    from onnx import numpy_helper

    if spec.method == "quantize" and spec.precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with warnings_muted():
            quantize_dynamic(source, path, weight_type=QuantType.QInt8)
        if not any(t.data_type == onnx.TensorProto.INT8 for t in onnx.load(str(path)).graph.initializer):
            raise FailedPrecondition("the model has no MatMul or Gemm weights: dynamic int8 quantization would "
                                     "change nothing")
        return path
    model = onnx.load(str(source))
    if spec.method == "quantize":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(model, keep_io_types=True), str(path))
        return path
    assert spec.method == "prune" and spec.target_sparsity is not None
    pruned = 0
    for initializer in model.graph.initializer:
        weight = numpy_helper.to_array(initializer)
        if weight.ndim >= 2 and weight.dtype.kind == "f":
            mask = magnitude_mask(torch.tensor(weight), spec.target_sparsity).numpy()
            initializer.CopyFrom(numpy_helper.from_array(weight * mask, initializer.name))
            pruned += 1
    if not pruned:
        raise FailedPrecondition("the model has no weight initializers of two or more dimensions to prune")
    onnx.save(model, str(path))
    return path


@contextmanager
def warnings_muted() -> Iterator[None]:
    """onnxruntime's quantizer warns on the root logger, which the job's events carry: its advice
    (pre-process the model first) is for hand-tuning, not something the caller can act on."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


# Measuring


def measure(model: Model, artifact: Path, samples: torch.Tensor, splits: Splits | None,
            counts: tuple[int, int]) -> dict[str, float]:
    """As optimization.measure, with test metrics only when there is a dataset."""
    metrics = evaluate(model, splits.test, splits.task, torch.device("cpu"), "test") if splits else {}
    parameters, nonzero = counts
    metrics.update(artifact_bytes=float(artifact.stat().st_size), parameters=float(parameters),
                   nonzero_parameters=float(nonzero), latency_ms_per_sample=latency_ms(model, samples[:1]))
    return metrics


def count_artifact(artifact: Path, onnx_artifact: bool) -> tuple[int, int]:
    return count_onnx(artifact) if onnx_artifact else count_scripted(artifact)


def count_scripted(artifact: Path) -> tuple[int, int]:
    """(values, non-zero values) of the floating tensors a TorchScript file holds: parameters and
    buffers, or in a quantized (so frozen) one the packed linear weights and the constants the
    other tensors were folded into. Parameters and buffers alike, since freezing tells them apart no more."""
    model = torch.jit.load(str(artifact), map_location="cpu")
    tensors = [tensor for tensor in model.state_dict().values() if tensor.is_floating_point()]
    for node in model.graph.findAllNodes("prim::GetAttr", False):
        if node.output().type().str().endswith("LinearPackedParamsBase"):
            tensors += torch.ops.quantized.linear_unpack(model._c.getattr(node.s("name")))
    for node in model.graph.findAllNodes("prim::Constant", False):
        if node.output().type().kind() == "TensorType":
            tensors.append(node.output().toIValue())
    values = [tensor.dequantize() if tensor.is_quantized else tensor for tensor in tensors if tensor is not None]
    return sum(v.numel() for v in values), sum(int(torch.count_nonzero(v)) for v in values)


def count_onnx(artifact: Path) -> tuple[int, int]:
    """(values, non-zero values) of an ONNX file's weights: its floating and 8-bit initializers of
    one or more dimensions (not the scalar scales and zero points quantization adds)."""
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in onnx.load(str(artifact)).graph.initializer]
    weights = [w for w in weights if w.ndim >= 1 and (w.dtype.kind == "f" or w.dtype in (np.int8, np.uint8))]
    return sum(w.size for w in weights), sum(int(np.count_nonzero(w)) for w in weights)
