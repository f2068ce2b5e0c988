"""The evaluation gate's measurement (retrain_eval.measure and its process): the test split as
training makes it, accuracy and r2 of real TorchScript models, class names numbered otherwise
by another dataset version, and failures that say what went wrong."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from services.trainer import data as datasets
from services.trainer.retrain_eval import CONFIG_FILE, measure
from services.trainer.spec import TrainingSpec, resolve

SPEC = resolve(TrainingSpec(architecture="mlp", dataset="d", builtin=False, seed=7), max_epochs=10, max_workers=1)
NAMES = ["setosa", "versicolor", "virginica"]


class Pick(torch.nn.Module):
    """A 'classifier' whose logits are the first three features: it predicts argmax(x[:3])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :3]


def save(module: torch.nn.Module, path: Path) -> str:
    torch.jit.save(torch.jit.script(module), str(path))
    return path.name


def write_csv(path: Path, x: np.ndarray, labels: list[str]) -> None:
    rows = ["a,b,c,d,label"] + [",".join([*map(str, row), label]) for row, label in zip(x, labels, strict=True)]
    path.write_text("\n".join(rows) + "\n")


def one_hot_data(count: int = 100) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 3, count)
    x = rng.normal(size=(count, 4)).astype(np.float32) * 0.1
    x[np.arange(count), classes] += 5.0
    return x, classes


def config(models: list[dict], metric: str = "accuracy", dataset: str = "data.csv") -> dict:
    return {"dataset_file": dataset, "dataset_format": "CSV", "target_column": "label", "spec": SPEC.to_dict(),
            "metric": metric, "models": models}


def test_accuracy_on_the_test_split_training_makes(tmp_path: Path) -> None:
    x, classes = one_hot_data()
    labels = [NAMES[c] for c in classes]
    write_csv(tmp_path / "data.csv", x, labels)
    perfect = save(Pick(), tmp_path / "perfect.pt")
    result = measure(tmp_path, config([{"version": 1, "path": perfect, "class_names": ",".join(NAMES)}]))
    arrays = datasets.load_file(tmp_path / "data.csv", "CSV", "label", "")
    _, _, test = datasets.split(arrays, SPEC.validation_fraction, SPEC.test_fraction, SPEC.seed, 0)
    assert result == {"metrics": [1.0], "samples": len(test)} and len(test) == 15


def test_labels_are_matched_to_each_models_class_names(tmp_path: Path) -> None:
    x, classes = one_hot_data()
    # This dataset version lacks "setosa": the file numbers versicolor 0 and virginica 1, while
    # the models (trained with all three classes) number them 1 and 2.
    keep = classes > 0
    write_csv(tmp_path / "data.csv", x[keep], [NAMES[c] for c in classes[keep]])
    path = save(Pick(), tmp_path / "model.pt")
    named = measure(tmp_path, config([{"version": 1, "path": path, "class_names": ",".join(NAMES)},
                                      {"version": 2, "path": path, "class_names": ""}]))
    assert named["metrics"][0] == 1.0
    # Without class names the file's own numbering is taken, which this model does not share.
    assert named["metrics"][1] == 0.0


def test_r2_of_a_regressor(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 4)).astype(np.float32)
    y = x @ np.array([1.0, -2.0, 0.5, 0.0], dtype=np.float32)
    write_csv(tmp_path / "data.csv", x, [str(v) for v in y])

    class Exact(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * torch.tensor([1.0, -2.0, 0.5, 0.0])).sum(1, keepdim=True)

    class Mean(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 1)

    spec = resolve(TrainingSpec(architecture="mlp", dataset="d", builtin=False, task="regression"),
                   max_epochs=10, max_workers=1)
    settings = {**config([{"version": 1, "path": save(Exact(), tmp_path / "exact.pt"), "class_names": ""},
                          {"version": 2, "path": save(Mean(), tmp_path / "zero.pt"), "class_names": ""}],
                         metric="r2"), "spec": spec.to_dict()}
    exact, zero = measure(tmp_path, settings)["metrics"]
    assert exact == pytest.approx(1.0, abs=1e-5) and zero < 0.1


def test_a_model_of_another_shape_is_an_error_that_names_its_version(tmp_path: Path) -> None:
    x, classes = one_hot_data()
    write_csv(tmp_path / "data.csv", x, [NAMES[c] for c in classes])

    class Flat(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(1)

    with pytest.raises(ValueError, match="version 4 returns"):
        measure(tmp_path, config([{"version": 4, "path": save(Flat(), tmp_path / "flat.pt"), "class_names": ""}]))


def test_the_process_prints_its_result_or_its_error(tmp_path: Path) -> None:
    x, classes = one_hot_data()
    write_csv(tmp_path / "data.csv", x, [NAMES[c] for c in classes])
    path = save(Pick(), tmp_path / "model.pt")
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config([{"version": 1, "path": path, "class_names": ""}])))
    command = [sys.executable, "-m", "services.trainer.retrain_eval", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"metrics": [1.0], "samples": 15}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config([], dataset="missing.csv")))
    failed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1
    assert "missing.csv" in json.loads(failed.stdout.strip().splitlines()[-1])["error"]
