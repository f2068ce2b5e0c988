"""Baselines, windows and PSI (services/common/summaries.py) on real data: scikit-learn's digits
and a synthetic regression."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from services.common import summaries
from services.common.summaries import MAX_FEATURES, Summary


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1400], order[1400:]
    return x[train], data.target[train], x[test], data.target[test]


def one_hot(classes: np.ndarray, width: int = 10) -> np.ndarray:
    return np.eye(width, dtype=np.float32)[classes]


def window_of(base: Summary, inputs: dict[str, np.ndarray], outputs: np.ndarray) -> Summary:
    window = base.empty_like()
    summaries.add_prediction(window, inputs, outputs)
    return window


def test_the_same_distribution_has_a_psi_near_zero(digits):
    train_x, train_y, test_x, test_y = digits
    base = summaries.baseline({"x": train_x}, train_y, classes=10)
    assert len(base.features) == 64 and base.classes is not None and sum(base.classes) == base.samples == 1400
    drift = summaries.drift(base, window_of(base, {"x": test_x}, one_hot(test_y)))
    assert drift.features[0][1] < 0.1  # the worst of 64 features, on 397 samples
    assert drift.outputs < 0.1
    assert [psi for _, psi in drift.features] == sorted((psi for _, psi in drift.features), reverse=True)
    itself = summaries.drift(base, window_of(base, {"x": train_x}, one_hot(train_y)))
    assert max(psi for _, psi in itself.features) == pytest.approx(0.0, abs=1e-9)
    assert itself.outputs == pytest.approx(0.0, abs=1e-9)


def test_shifted_inputs_and_predictions_have_a_large_psi(digits):
    train_x, train_y, test_x, test_y = digits
    base = summaries.baseline({"x": train_x}, train_y, classes=10)
    scaled = summaries.drift(base, window_of(base, {"x": test_x * 3}, one_hot(test_y)))
    assert scaled.features[0][1] > 1.0
    assert sum(psi >= summaries.DEFAULT_THRESHOLD for _, psi in scaled.features) > 20
    noisy = test_x + np.random.default_rng(1).normal(0, 0.5, test_x.shape).astype(np.float32)
    assert summaries.drift(base, window_of(base, {"x": noisy}, one_hot(test_y))).features[0][1] > 0.5
    # Every prediction the same class: the outputs drifted, whatever the inputs.
    one_class = summaries.drift(base, window_of(base, {"x": test_x}, one_hot(np.zeros(len(test_x), int))))
    assert one_class.outputs > 1.0


def test_a_regressor_baseline_bins_its_targets():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2000, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + rng.normal(0, 0.1, 2000)
    base = summaries.baseline({"x": x}, y, classes=0)
    assert base.classes is None and base.outputs is not None and len(base.outputs.counts) == summaries.BINS
    same = summaries.drift(base, window_of(base, {"x": x[:500]}, y[:500, None]))
    shifted = summaries.drift(base, window_of(base, {"x": x[:500]}, y[:500, None] + 5))
    assert same.outputs < 0.05 < 1.0 < shifted.outputs


def test_a_summary_survives_json(digits):
    train_x, train_y, *_ = digits
    base = summaries.baseline({"x": train_x}, train_y, classes=10)
    text = base.to_json()
    json.loads(text)  # plain JSON, as version metadata stores it
    back = Summary.from_json(text)
    assert back == base
    regressor = summaries.baseline({"x": train_x[:, :4]}, train_x[:, 5], classes=0)
    assert Summary.from_json(regressor.to_json()) == regressor
    empty = back.empty_like()
    assert empty.samples == 0 and sum(empty.classes) == 0
    assert all(h.cuts == base.features[name].cuts and not any(h.counts) for name, h in empty.features.items())


def test_wide_inputs_are_summarized_on_max_features_spread_over_them():
    rng = np.random.default_rng(3)
    images = rng.random((300, 3, 28, 28)).astype(np.float32)
    base = summaries.baseline({"image": images}, rng.integers(0, 10, 300), classes=10)
    assert len(base.features) == MAX_FEATURES
    indices = sorted(int(name.removeprefix("image[").removesuffix("]")) for name in base.features)
    assert indices[0] == 0 and indices[-1] == 3 * 28 * 28 - 1  # from the first value to the last
    assert summaries.feature_columns(MAX_FEATURES) == list(range(MAX_FEATURES))
    assert len(summaries.feature_columns(MAX_FEATURES + 1)) == MAX_FEATURES
    window = window_of(base, {"image": images[:50]}, rng.random((50, 10)))
    assert window.samples == 50 and all(sum(h.counts) == 50 for h in window.features.values())
    assert len(Summary.from_json(base.to_json()).features) == MAX_FEATURES


def test_constant_features_get_one_cut_and_drift_only_when_they_move():
    x = np.zeros((500, 2), np.float32)
    x[:, 1] = np.arange(500) % 7
    base = summaries.baseline({"x": x}, np.arange(500) % 2, classes=2)
    constant = base.features["x[0]"]
    assert constant.cuts == [0.0] and constant.counts == [0, 500]
    still = summaries.drift(base, window_of(base, {"x": x[:100]}, one_hot(np.arange(100) % 2, 2)))
    assert dict(still.features)["x[0]"] == pytest.approx(0.0, abs=1e-9)
    moved = x[:100].copy()
    moved[:, 0] = -1.0
    drift = summaries.drift(base, window_of(base, {"x": moved}, one_hot(np.arange(100) % 2, 2)))
    assert drift.features[0][0] == "x[0]" and drift.features[0][1] > 1.0


def test_psi_of_empty_sides_is_zero_and_a_single_logit_is_a_binary_class():
    assert summaries.psi([0, 0], [3, 4]) == 0.0 and summaries.psi([3, 4], [0, 0]) == 0.0
    base = summaries.baseline({"x": np.arange(100.0)[:, None]}, np.arange(100) % 2, classes=2)
    window = window_of(base, {"x": np.array([[1.0], [2.0], [3.0]])}, np.array([[2.5], [-1.0], [0.3]]))
    assert window.classes == [1, 2]
