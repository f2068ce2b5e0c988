"""Summaries of what a model sees and answers, and the drift between two of them.

The trainer stores a baseline with each version it registers (version metadata BASELINE_KEY):
per-feature histograms of the training split's inputs, cut at their deciles, and the
distribution of its targets (class counts for a classifier, a histogram for a regressor). The
gateway's monitor counts a window of logged predictions into the same bins and compares them
with the population stability index (PSI). Plain numpy: no gRPC, no storage.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

BASELINE_KEY = "maas.baseline"
# Decile cuts: ten bins per feature.
BINS = 10
# Inputs wider than this (images) are summarized on this many features spread evenly over
# them: a baseline stays a few kilobytes, and drift of a whole image still shows.
MAX_FEATURES = 64
# Added to every bin's share so that an empty bin does not make PSI infinite.
EPSILON = 1e-4
# A PSI of 0.1 is a shift worth a look, 0.2 a significant one (the usual reading).
DEFAULT_THRESHOLD = 0.2


@dataclass
class Histogram:
    """Counts of values in the bins the cut points make: len(counts) == len(cuts) + 1."""

    cuts: list[float]
    counts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.cuts) + 1)

    def add(self, values: np.ndarray) -> None:
        bins = np.searchsorted(np.asarray(self.cuts, dtype=np.float64), values, side="right")
        for index, count in zip(*np.unique(bins, return_counts=True), strict=True):
            self.counts[int(index)] += int(count)


@dataclass
class Summary:
    """Feature histograms by name, and the outputs: class counts or a histogram."""

    features: dict[str, Histogram]
    classes: list[int] | None = None
    outputs: Histogram | None = None
    samples: int = 0

    def to_json(self) -> str:
        return json.dumps({
            "samples": self.samples,
            "features": {name: {"cuts": h.cuts, "counts": h.counts} for name, h in self.features.items()},
            "classes": self.classes,
            "outputs": None if self.outputs is None else {"cuts": self.outputs.cuts, "counts": self.outputs.counts},
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Summary:
        data = json.loads(text)
        outputs = data.get("outputs")
        return cls(
            features={name: Histogram(h["cuts"], h["counts"]) for name, h in data["features"].items()},
            classes=data.get("classes"),
            outputs=None if outputs is None else Histogram(outputs["cuts"], outputs["counts"]),
            samples=int(data.get("samples", 0)),
        )

    def absorb(self, other: Summary) -> None:
        """Add `other`'s counts into this one's, where both are binned alike (a part binned
        otherwise, from a baseline that changed, is left out)."""
        for name, histogram in self.features.items():
            theirs = other.features.get(name)
            if theirs is not None and len(theirs.counts) == len(histogram.counts):
                histogram.counts = [a + b for a, b in zip(histogram.counts, theirs.counts, strict=True)]
        if self.classes is not None and other.classes is not None and len(other.classes) == len(self.classes):
            self.classes = [a + b for a, b in zip(self.classes, other.classes, strict=True)]
        if (
            self.outputs is not None
            and other.outputs is not None
            and len(other.outputs.counts) == len(self.outputs.counts)
        ):
            self.outputs.counts = [a + b for a, b in zip(self.outputs.counts, other.outputs.counts, strict=True)]
        self.samples += other.samples

    def empty_like(self) -> Summary:
        """A summary with this one's bins and no counts: a window to count into."""
        return Summary(
            features={name: Histogram(h.cuts) for name, h in self.features.items()},
            classes=None if self.classes is None else [0] * len(self.classes),
            outputs=None if self.outputs is None else Histogram(self.outputs.cuts),
        )


def feature_columns(width: int) -> list[int]:
    """The flat indices summarized of an input `width` values wide."""
    if width <= MAX_FEATURES:
        return list(range(width))
    return sorted({round(i * (width - 1) / (MAX_FEATURES - 1)) for i in range(MAX_FEATURES)})


def feature_name(input_name: str, index: int) -> str:
    return f"{input_name}[{index}]"


def cuts_of(values: np.ndarray) -> list[float]:
    """Distinct decile cut points (a feature with few values gets fewer bins)."""
    quantiles = np.quantile(values.astype(np.float64), np.linspace(0, 1, BINS + 1)[1:-1])
    return [float(cut) for cut in np.unique(quantiles)]


def baseline(inputs: dict[str, np.ndarray], targets: np.ndarray, classes: int) -> Summary:
    """The baseline of a training split: `inputs` by name with samples on the first axis, and
    the targets (class indices when `classes` > 0, else real values)."""
    features: dict[str, Histogram] = {}
    for name, array in inputs.items():
        flat = array.reshape(len(array), -1)
        for index in feature_columns(flat.shape[1]):
            histogram = Histogram(cuts_of(flat[:, index]))
            histogram.add(flat[:, index])
            features[feature_name(name, index)] = histogram
    summary = Summary(features=features, samples=len(targets))
    if classes > 0:
        counts = np.bincount(targets.astype(np.int64).reshape(-1), minlength=classes)
        summary.classes = [int(count) for count in counts]
    else:
        values = targets.astype(np.float64).reshape(-1)
        summary.outputs = Histogram(cuts_of(values))
        summary.outputs.add(values)
    return summary


def add_prediction(window: Summary, inputs: dict[str, np.ndarray], outputs: np.ndarray) -> None:
    """Count a batch of logged predictions (samples on the first axis) into `window`: inputs
    into the feature histograms, the predicted class (argmax) or the predicted value into the
    outputs."""
    for name, array in inputs.items():
        flat = array.reshape(len(array), -1)
        for index in feature_columns(flat.shape[1]):
            histogram = window.features.get(feature_name(name, index))
            if histogram is not None:
                histogram.add(flat[:, index])
    flat_outputs = outputs.reshape(len(outputs), -1)
    if window.classes is not None:
        predicted = flat_outputs.argmax(axis=1) if flat_outputs.shape[1] > 1 else (flat_outputs[:, 0] > 0).astype(int)
        for index in predicted:
            if 0 <= index < len(window.classes):
                window.classes[int(index)] += 1
    elif window.outputs is not None:
        window.outputs.add(flat_outputs[:, 0])
    window.samples += len(outputs)


def psi(expected: list[int], actual: list[int]) -> float:
    """Population stability index of `actual` counts against `expected` ones over the same bins;
    0 when either side has no count."""
    expected_total, actual_total = sum(expected), sum(actual)
    if not expected_total or not actual_total:
        return 0.0
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        p, q = e / expected_total + EPSILON, a / actual_total + EPSILON
        total += (q - p) * math.log(q / p)
    return total


@dataclass
class Drift:
    features: list[tuple[str, float]]  # worst first
    outputs: float


def drift(base: Summary, window: Summary) -> Drift:
    features = sorted(
        ((name, psi(h.counts, window.features[name].counts)) for name, h in base.features.items()
         if name in window.features),
        key=lambda item: -item[1],
    )
    if base.classes is not None and window.classes is not None:
        outputs = psi(base.classes, window.classes)
    elif base.outputs is not None and window.outputs is not None:
        outputs = psi(base.outputs.counts, window.outputs.counts)
    else:
        outputs = 0.0
    return Drift(features, outputs)
