"""The baseline a trained version carries (summaries.BASELINE_KEY in its metadata): the training
split summarized, small enough for version metadata; none for a text model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.common import summaries
from services.registry.service import MAX_BASELINE_CHARS
from services.trainer import data as datasets
from services.trainer.spec import TrainingSpec, resolve
from services.trainer.training import Job, Splits, baseline_metadata, load_splits, train


def job(folder: Path, architecture: str, dataset: str, **fields) -> Job:
    spec = resolve(TrainingSpec(architecture=architecture, dataset=dataset, epochs=1, **fields),
                   max_epochs=10, max_workers=1)
    return Job(folder=folder, spec=spec, dataset_file=None, dataset_format="", target_column="")


@pytest.mark.parametrize(
    ("architecture", "dataset", "features", "classes"),
    [("logistic", "iris", 4, 3), ("mlp", "digits", 64, 10), ("linear", "diabetes", 10, 0)],
)
def test_a_trained_version_carries_the_baseline_of_its_training_split(
    tmp_path: Path, architecture: str, dataset: str, features: int, classes: int
) -> None:
    result = train(job(tmp_path, architecture, dataset), lambda _: None, torch.device("cpu"))
    assert result is not None
    text = result["metadata"][summaries.BASELINE_KEY]
    baseline = summaries.Summary.from_json(text)
    splits = load_splits(job(tmp_path, architecture, dataset))
    x_train, y_train = splits.train
    assert baseline.samples == len(x_train)
    assert len(baseline.features) == features
    # Every training sample is counted in every feature's histogram.
    assert {sum(h.counts) for h in baseline.features.values()} == {len(x_train)}
    if classes:
        assert baseline.classes == np.bincount(y_train.numpy(), minlength=classes).tolist()
        assert baseline.outputs is None
    else:
        assert baseline.classes is None and baseline.outputs is not None
        assert sum(baseline.outputs.counts) == len(y_train)
    # The same bins and counts as the monitor would build from the split itself.
    expected = summaries.baseline({"x": x_train.numpy()}, y_train.numpy(), classes)
    assert text == expected.to_json()
    # Small beside the artifact: a few kilobytes, well inside the registry's allowance.
    assert len(text) < 8 * 1024 < MAX_BASELINE_CHARS


def test_wide_images_are_summarized_on_a_bounded_number_of_features() -> None:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(200, 28, 28)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, 200))
    split = (x, y)
    splits = Splits(split, split, split, "classification", 10, (28, 28), "", [])
    baseline = summaries.Summary.from_json(baseline_metadata(splits)[summaries.BASELINE_KEY])
    assert len(baseline.features) == summaries.MAX_FEATURES
    assert len(baseline_metadata(splits)[summaries.BASELINE_KEY]) < MAX_BASELINE_CHARS // 2


def test_a_text_model_has_no_baseline() -> None:
    tokens = torch.zeros((10, 8), dtype=torch.int64)
    split = (tokens, tokens)
    splits = Splits(split, split, split, "language", 5, (8,), "abcde", [])
    assert baseline_metadata(splits) == {}


def test_registry_datasets_get_a_baseline_too(tmp_path: Path) -> None:
    arrays = datasets.load_builtin("iris")
    path = tmp_path / "iris.csv"
    rows = ["a,b,c,d,species"] + [",".join(map(str, [*x, ["setosa", "versicolor", "virginica"][t]]))
                                  for x, t in zip(arrays.x, arrays.y, strict=True)]
    path.write_text("\n".join(rows))
    spec = resolve(TrainingSpec(architecture="logistic", dataset="iris-csv", builtin=False, epochs=1),
                   max_epochs=10, max_workers=1)
    csv_job = Job(folder=tmp_path, spec=spec, dataset_file=path, dataset_format="CSV", target_column="species")
    result = train(csv_job, lambda _: None, torch.device("cpu"))
    assert result is not None
    baseline = summaries.Summary.from_json(result["metadata"][summaries.BASELINE_KEY])
    assert list(baseline.features) == ["x[0]", "x[1]", "x[2]", "x[3]"]
    assert baseline.classes is not None and sum(baseline.classes) == baseline.samples
