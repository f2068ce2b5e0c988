"""Optimizing versions the trainer cannot rebuild, in-process on a small digits MLP scripted as a
user would upload it (no training spec): the creation-time checks, then every method on the
TorchScript and on its ONNX export, with and without a dataset."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import numpy_helper
from sklearn.datasets import load_digits

from services.common.errors import FailedPrecondition, InvalidArgument
from services.trainer.optimization import SOURCE
from services.trainer.optimization_spec import (
    TRAINING_SPEC_KEY,
    OptimizationSpec,
    SourceVersion,
    check_source,
    check_uploaded_data,
    resolve_optimization,
)
from services.trainer.optimization_uploaded import count_scripted, magnitude_mask, optimize
from services.trainer.spec import DatasetInfo

SIGNATURE = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [64]}],
             "outputs": [{"name": "scores", "datatype": "FP32", "shape": [10]}]}
DIGITS = DatasetInfo("digits", "image", "classification", (8, 8), 1797, 10)


def method(name: str, **fields: Any) -> OptimizationSpec:
    return resolve_optimization(OptimizationSpec("digits", 1, name, **fields), max_epochs=100)


def uploaded(format: str = "TORCHSCRIPT", signature: dict | None = None, metadata: dict | None = None) -> SourceVersion:
    return SourceVersion("digits", 1, format, "fp32", metadata or {}, signature=signature or SIGNATURE)


# What is refused at creation


@pytest.mark.parametrize(
    ("spec", "source", "match"),
    [
        (method("export"), uploaded("ONNX"), "digits version 1 is already ONNX: export starts from a TorchScript"),
        (method("distill", student="mlp"), uploaded(), "distillation needs a dataset: pass --dataset NAME"),
        (method("prune", target_sparsity=0.5, finetune_epochs=2), uploaded(), "fine-tuning after pruning needs a dataset"),
        (method("prune", target_sparsity=0.5, finetune_epochs=2, dataset="digits"), uploaded("ONNX"),
         "which the trainer cannot fine-tune"),
        (method("quantize", precision="int8"), uploaded(signature={"inputs": SIGNATURE["inputs"] * 2,
                                                                   "outputs": SIGNATURE["outputs"]}),
         "needs one FP32 input of fixed shape and one FP32 output, and its signature has pixels FP32 \\[64\\]; pixels"),
        (method("quantize", precision="int8"), uploaded(signature={
            "inputs": [{"name": "tokens", "datatype": "INT64", "shape": [-1]}], "outputs": SIGNATURE["outputs"]}),
         "one FP32 input of fixed shape"),
    ],
)
def test_refused_at_creation(spec: OptimizationSpec, source: SourceVersion, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        check_source(spec, source)


def test_the_data_a_job_uses() -> None:
    assert check_source(method("quantize", precision="int8"), uploaded()) is None  # random inputs
    named = check_source(method("distill", student="mlp", dataset="digits", seed=4), uploaded())
    assert named is not None and (named.dataset, named.seed, named.test_fraction) == ("digits", 4, 0.15)
    # An ONNX export of a trained version measures on its parent's split; TorchScript with one is rebuilt.
    training = '{"architecture": "mlp", "dataset": "iris", "seed": 3, "test_fraction": 0.2}'
    onnx_export = uploaded("ONNX", metadata={TRAINING_SPEC_KEY: training})
    assert not onnx_export.trained and check_source(method("quantize", precision="int8"), onnx_export).seed == 3
    assert uploaded(metadata={TRAINING_SPEC_KEY: training}).trained


def test_the_dataset_must_fit_the_signature() -> None:
    spec = method("distill", student="mlp", dataset="digits")
    data = check_source(spec, uploaded())
    assert data is not None
    # digits' 8x8 images feed an input of 64, and the student learns from them so.
    assert check_uploaded_data(spec, uploaded(), data, DIGITS).sample_shape == (64,)
    narrow = {**SIGNATURE, "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [32]}]}
    with pytest.raises(InvalidArgument, match=r"digits has samples of shape \[8, 8\]; .* pass a dataset with 32"):
        check_uploaded_data(spec, uploaded(signature=narrow), data, DIGITS)
    three = {**SIGNATURE, "outputs": [{"name": "scores", "datatype": "FP32", "shape": [3]}]}
    with pytest.raises(InvalidArgument, match="digits has 10 classes; digits version 1 returns 3 values per sample"):
        check_uploaded_data(spec, uploaded(signature=three), data, DIGITS)
    with pytest.raises(InvalidArgument, match="distillation needs a classification dataset"):
        check_uploaded_data(spec, uploaded(signature={**SIGNATURE, "outputs": [{**three["outputs"][0], "shape": [1]}]}),
                            data, DatasetInfo("sugar", "tabular", "regression", (64,), 400))
    with pytest.raises(InvalidArgument, match="shakespeare is a text corpus"):
        check_uploaded_data(spec, uploaded(), data, DatasetInfo("shakespeare", "text", "language", (), 10_000))


# The methods, run as the worker runs them


@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README tour's model, smaller: trained on pixels / 16, scripted, no metadata at all."""
    torch.manual_seed(0)
    digits = load_digits()
    x, y = torch.tensor(digits.data / 16, dtype=torch.float32), torch.tensor(digits.target)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 10))
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("upload") / "digits.pt"
    torch.jit.save(torch.jit.script(model.eval()), str(path))
    return path


@pytest.fixture(scope="module")
def digits_onnx(digits_mlp: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    run(folder, digits_mlp, method("export"))
    return folder / "model.onnx"


def run(folder: Path, artifact: Path, spec: OptimizationSpec, format: str = "TORCHSCRIPT",
        events: list | None = None) -> dict[str, Any]:
    """What the worker does with the job folder the service prepared."""
    shutil.copy(artifact, folder / SOURCE)
    data = check_source(spec, uploaded(format))
    config = {"optimization": spec.to_dict(), "spec": data.to_dict() if data else None, "uploaded": True,
              "source": {"model": "digits", "version": 1, "metadata": {}, "format": format, "signature": SIGNATURE}}
    return optimize(folder, config, (events if events is not None else []).append, torch.device("cpu"))


def inputs() -> torch.Tensor:
    return torch.tensor(load_digits().data[:100] / 16, dtype=torch.float32)


def test_int8_without_a_dataset(digits_mlp: Path, tmp_path: Path) -> None:
    events: list[dict] = []
    result = run(tmp_path, digits_mlp, method("quantize", precision="int8"), events=events)
    assert events[0]["type"] == "started"
    assert (result["format"], result["precision"], result["signature"]) == ("TORCHSCRIPT", "int8", SIGNATURE)
    parent, ours = result["parent_metrics"], result["metrics"]
    assert "test_accuracy" not in ours and ours["latency_ms_per_sample"] > 0  # no dataset, no accuracy
    assert ours["artifact_bytes"] == (tmp_path / "model.pt").stat().st_size < 0.5 * parent["artifact_bytes"]
    # Every weight is still there, packed: a few round to zero.
    assert ours["parameters"] == parent["parameters"] == 64 * 96 + 96 + 96 * 10 + 10
    assert 0.95 * parent["nonzero_parameters"] < ours["nonzero_parameters"] <= parent["nonzero_parameters"]
    int8, fp32 = torch.jit.load(str(tmp_path / "model.pt")), torch.jit.load(str(digits_mlp))
    assert int8.graph.findAllNodes("quantized::linear_dynamic")
    with torch.inference_mode():
        assert (int8(inputs()).argmax(1) == fp32(inputs()).argmax(1)).float().mean() >= 0.97


def test_int8_with_a_dataset_measures_accuracy_on_its_test_split(digits_mlp: Path, tmp_path: Path) -> None:
    result = run(tmp_path, digits_mlp, method("quantize", precision="int8", dataset="digits"))
    parent, ours = result["parent_metrics"], result["metrics"]
    # Raw pixels (0-16) although it learned on pixels / 16: a ReLU network's argmax mostly survives.
    assert parent["test_accuracy"] > 0.9 and abs(ours["test_accuracy"] - parent["test_accuracy"]) <= 0.02


def test_fp16_keeps_the_fp32_signature(digits_mlp: Path, tmp_path: Path) -> None:
    result = run(tmp_path, digits_mlp, method("quantize", precision="fp16"))
    assert result["precision"] == "fp16" and result["metrics"]["artifact_bytes"] < result["parent_metrics"]["artifact_bytes"]
    half, fp32 = torch.jit.load(str(tmp_path / "model.pt")), torch.jit.load(str(digits_mlp))
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    with torch.inference_mode():
        out = half(inputs())
        assert out.dtype == torch.float32 and (out - fp32(inputs())).abs().max() < 0.05


def test_pruning_zeroes_each_weight_matrix_in_place(digits_mlp: Path, tmp_path: Path) -> None:
    result = run(tmp_path, digits_mlp, method("prune", target_sparsity=0.5))
    pruned = torch.jit.load(str(tmp_path / "model.pt"))
    weights = [p for p in pruned.parameters() if p.dim() == 2]
    assert [float((w == 0).float().mean()) for w in weights] == [0.5, 0.5]
    assert all(int(torch.count_nonzero(p)) == p.numel() for p in pruned.parameters() if p.dim() == 1)  # biases kept
    assert result["metrics"]["nonzero_parameters"] == result["parent_metrics"]["nonzero_parameters"] - 64 * 48 - 96 * 5
    # The source file was not touched: pruning worked on its own copy.
    assert all(int(torch.count_nonzero(p)) == p.numel() for p in torch.jit.load(str(digits_mlp)).parameters())


def test_pruning_fine_tunes_with_a_dataset_and_keeps_the_zeros(digits_mlp: Path, tmp_path: Path) -> None:
    events: list[dict] = []
    result = run(tmp_path, digits_mlp, method("prune", target_sparsity=0.7, finetune_epochs=2, dataset="digits"),
                 events=events)
    assert [e["epoch"] for e in events if e["type"] == "progress"] == [1, 2]
    pruned = torch.jit.load(str(tmp_path / "model.pt"))
    assert [round(float((p == 0).float().mean()), 3) for p in pruned.parameters() if p.dim() == 2] == [0.7, 0.7]
    assert result["metrics"]["test_accuracy"] >= 0.85  # 0.70 pruned alone: fine-tuning recovers most of it


def test_export_keeps_the_signature_and_matches(digits_mlp: Path, digits_onnx: Path) -> None:
    session = onnxruntime.InferenceSession(str(digits_onnx), providers=["CPUExecutionProvider"])
    (given,), (returned,) = session.get_inputs(), session.get_outputs()
    assert (given.name, given.shape, returned.name) == ("pixels", ["batch", 64], "scores")
    with torch.inference_mode():
        expected = torch.jit.load(str(digits_mlp))(inputs()).numpy()
    np.testing.assert_allclose(session.run(None, {"pixels": inputs().numpy()})[0], expected, rtol=1e-4, atol=1e-4)


def test_distillation_with_a_dataset(digits_mlp: Path, tmp_path: Path) -> None:
    spec = method("distill", student="mlp", student_hyperparameters={"hidden_sizes": [24]}, epochs=15,
                  dataset="digits")
    result = run(tmp_path, digits_mlp, spec)
    assert result["metadata"] == {"architecture": "mlp"} and result["signature"] == SIGNATURE
    assert result["metrics"]["parameters"] == 64 * 24 + 24 + 24 * 10 + 10
    assert result["metrics"]["test_accuracy"] >= 0.85, result["metrics"]
    student = torch.jit.load(str(tmp_path / "model.pt"))
    with torch.inference_mode():
        assert student(inputs() * 16).shape == (100, 10)  # fed like its teacher: 64 values a sample


def test_onnx_int8_fp16_and_pruning(digits_onnx: Path, tmp_path: Path) -> None:
    outputs = {}
    for name, spec in {"int8": method("quantize", precision="int8"), "fp16": method("quantize", precision="fp16"),
                       "pruned": method("prune", target_sparsity=0.5)}.items():
        folder = tmp_path / name
        folder.mkdir()
        result = run(folder, digits_onnx, spec, "ONNX")
        assert result["format"] == "ONNX" and result["artifact"] == "model.onnx"
        assert result["metrics"]["parameters"] == result["parent_metrics"]["parameters"] == 64 * 96 + 96 + 96 * 10 + 10
        outputs[name] = result
        session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].type == session.get_outputs()[0].type == "tensor(float)"
    parent_bytes = outputs["int8"]["parent_metrics"]["artifact_bytes"]
    assert outputs["int8"]["precision"] == "int8" and outputs["int8"]["metrics"]["artifact_bytes"] < 0.5 * parent_bytes
    assert outputs["fp16"]["precision"] == "fp16" and outputs["fp16"]["metrics"]["artifact_bytes"] < 0.6 * parent_bytes
    pruned = [numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "pruned" / "model.onnx")).graph.initializer]
    assert sorted(float((w == 0).mean()) for w in pruned if w.ndim == 2) == [0.5, 0.5]


def test_what_cannot_be_quantized_fails_with_a_reason(tmp_path: Path) -> None:
    convolution = tmp_path / "conv.pt"
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Unflatten(1, (1, 8, 8)), torch.nn.Conv2d(1, 1, 8),
                                                        torch.nn.Flatten()).eval()), str(convolution))
    signature = {**SIGNATURE, "outputs": [{"name": "scores", "datatype": "FP32", "shape": [1]}]}
    config = {"optimization": method("quantize", precision="int8").to_dict(), "spec": None, "uploaded": True,
              "source": {"format": "TORCHSCRIPT", "signature": signature}}
    shutil.copy(convolution, tmp_path / SOURCE)
    with pytest.raises(FailedPrecondition, match="no linear layers"):
        optimize(tmp_path, config, lambda event: None, torch.device("cpu"))


def test_magnitude_mask_zeroes_the_smallest() -> None:
    weight = torch.tensor([[0.3, -0.1], [2.0, -0.05]])
    assert magnitude_mask(weight, 0.5).tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert magnitude_mask(weight, 0.1).tolist() == [[1.0, 1.0], [1.0, 1.0]]  # round(0.4) weights: none


def test_count_scripted_reads_packed_weights(digits_mlp: Path, tmp_path: Path) -> None:
    frozen = torch.ao.quantization.quantize_dynamic_jit(torch.jit.load(str(digits_mlp)),
                                                        {"": torch.ao.quantization.default_dynamic_qconfig})
    torch.jit.save(frozen, str(tmp_path / "int8.pt"))
    assert not list(frozen.parameters())  # nothing left to count the usual way
    assert count_scripted(tmp_path / "int8.pt")[0] == count_scripted(digits_mlp)[0] == 64 * 96 + 96 + 96 * 10 + 10
