"""The optimization methods in-process on a small iris MLP: quantized is smaller and close,
pruning reaches its sparsity and keeps it through fine-tuning, the distillation loss, ONNX
parity (and its failure), and a whole optimize() run measuring parent and result."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from services.common.errors import FailedPrecondition
from services.trainer.optimization import (
    SOURCE,
    HalfPrecision,
    count_parameters,
    distillation_loss,
    export_onnx,
    optimize,
    prune,
    quantize,
    rebuild,
    save_torchscript,
)
from services.trainer.optimization_spec import OptimizationSpec, resolve_optimization
from services.trainer.spec import TrainingSpec, resolve
from services.trainer.training import Job, load_splits, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """An iris MLP trained by the real training loop, its spec, splits and artifact; wide enough
    (18k weights) that int8 saves more than the TorchScript archive adds."""
    folder = tmp_path_factory.mktemp("iris")
    spec = resolve(TrainingSpec(architecture="mlp", dataset="iris", hyperparameters={"hidden_sizes": [256, 64]},
                                epochs=30, batch_size=16, learning_rate=0.01, device="cpu"),
                   max_epochs=100, max_workers=1)
    job = Job(folder, spec, None, "", "")
    result = train(job, lambda event: None, torch.device("cpu"))
    assert result is not None
    return spec, load_splits(job), folder / result["artifact"], result["metrics"]


def loaded(trained):
    spec, splits, artifact, _ = trained
    source = torch.jit.load(str(artifact)).eval()
    return spec, splits, source, rebuild(spec, splits, source)


def test_rebuild_holds_the_source_weights(trained) -> None:
    _, splits, source, model = loaded(trained)
    x = splits.test[0]
    with torch.inference_mode():
        assert torch.equal(model(x), source(x))


def test_int8_is_smaller_and_close(trained, tmp_path: Path) -> None:
    _, splits, source, model = loaded(trained)
    int8 = quantize(model, "int8")
    scripted, path = save_torchscript(int8, tmp_path)
    assert path.stat().st_size < 0.75 * Path(trained[2]).stat().st_size
    assert count_parameters(int8)[0] == count_parameters(source)[0] == sum(p.numel() for p in model.parameters())
    x = splits.test[0]
    with torch.inference_mode():
        assert (scripted(x) - source(x)).abs().max() < 0.02 * source(x).abs().max()
        assert (scripted(x).argmax(1) == source(x).argmax(1)).float().mean() >= 0.95


def test_fp16_keeps_the_fp32_signature(trained, tmp_path: Path) -> None:
    _, splits, source, model = loaded(trained)
    half = quantize(model, "fp16")
    assert isinstance(half, HalfPrecision)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    scripted, _ = save_torchscript(half, tmp_path)
    x = splits.test[0]
    with torch.inference_mode():
        out = scripted(x)
        assert out.dtype == torch.float32 and (out - source(x)).abs().max() < 0.05
    # The original module is untouched: the copy went to half precision.
    assert all(p.dtype == torch.float32 for p in model.parameters())


def linear_sparsity(model: torch.nn.Module) -> list[float]:
    return [float((m.weight == 0).float().mean()) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_pruning_reaches_the_sparsity_and_fine_tuning_keeps_the_mask(trained) -> None:
    spec, splits, _, model = loaded(trained)
    events: list[dict] = []
    method = resolve_optimization(OptimizationSpec("m", 1, "prune", target_sparsity=0.6, finetune_epochs=2),
                                  max_epochs=10)
    pruned = prune(method, spec, model, splits, events.append, torch.device("cpu"))
    assert all(abs(s - 0.6) < 0.02 for s in linear_sparsity(pruned)), linear_sparsity(pruned)
    # Permanent: no masks or hooks left, plain weights that script.
    assert not any(name.endswith("_mask") for name, _ in pruned.named_buffers())
    total, nonzero = count_parameters(pruned)
    assert nonzero < 0.5 * total
    assert [e["epoch"] for e in events if e["type"] == "progress"] == [1, 2]


def test_distillation_loss() -> None:
    torch.manual_seed(0)
    student, teacher, targets = torch.randn(8, 3), torch.randn(8, 3), torch.randint(0, 3, (8,))
    assert distillation_loss(student, teacher, targets, 4.0, 0.0) == pytest.approx(
        float(F.cross_entropy(student, targets)))
    # A student that matches the teacher has no soft loss left, whatever the temperature.
    assert distillation_loss(teacher, teacher, targets, 2.0, 1.0) == pytest.approx(0.0, abs=1e-6)
    soft = F.kl_div(F.log_softmax(student / 2, 1), F.softmax(teacher / 2, 1), reduction="batchmean")
    assert distillation_loss(student, teacher, targets, 2.0, 1.0) == pytest.approx(4 * float(soft), rel=1e-5)


def test_onnx_export_matches_and_a_mismatch_fails(trained, tmp_path: Path) -> None:
    spec, splits, source, model = loaded(trained)
    exported, path = export_onnx(model, source, splits, tmp_path)
    assert path.name == "model.onnx" and not list(tmp_path.glob("*.data"))  # one self-contained file
    assert (exported(splits.test[0]) - source(splits.test[0])).abs().max() < 1e-4
    with torch.no_grad():
        next(model.parameters()).add_(0.5)
    again = tmp_path / "again"
    again.mkdir()
    with pytest.raises(FailedPrecondition, match="differs from the TorchScript source by up to"):
        export_onnx(model, source, splits, again)


def test_optimize_measures_parent_and_result(trained, tmp_path: Path) -> None:
    spec, _, artifact, metrics = trained
    shutil.copy(artifact, tmp_path / SOURCE)
    method = resolve_optimization(OptimizationSpec("m", 1, "quantize", precision="int8"), max_epochs=10)
    events: list[dict] = []
    result = optimize(tmp_path, {"spec": spec.to_dict(), "optimization": method.to_dict()}, events.append,
                      torch.device("cpu"))
    assert events[0]["type"] == "started"
    assert result["precision"] == "int8" and result["format"] == "TORCHSCRIPT"
    parent, ours = result["parent_metrics"], result["metrics"]
    # The same split as training: the parent measures exactly what training registered.
    assert parent["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert ours["artifact_bytes"] == (tmp_path / result["artifact"]).stat().st_size < parent["artifact_bytes"]
    assert ours["parameters"] == parent["parameters"] and ours["latency_ms_per_sample"] > 0
    assert abs(ours["test_accuracy"] - parent["test_accuracy"]) <= 0.05
