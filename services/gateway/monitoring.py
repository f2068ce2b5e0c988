"""Prediction monitoring (no gRPC here): each deployment's logging settings, its logged samples,
its drift from the baseline the trainer stored with its version, and its live quality from the
labels sent back as feedback. Every call names the caller's tenant; a deployment is one of that
tenant's (the route table says which exist).

A window is the last `window_seconds`: its summaries are merged over every gateway process's
rows and compared with the baseline feature by feature (PSI), and on the outputs; its labelled
calls give live accuracy (classifiers: the predicted class is the label) or R^2 (regressors)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.common import summaries
from services.common.errors import InvalidArgument
from services.common.summaries import Summary
from services.common.validation import check_name
from services.gateway.monitoring_log import PredictionLog, VersionCatalog, VersionInfo
from services.gateway.monitoring_store import LabelStats, LoggingRecord, MonitoringStore, SampleRecord
from services.gateway.routes import LiveRoute, RouteTable
from services.gateway.store import utc_now

DEFAULT_SAMPLES_LISTED = 20
MAX_SAMPLES_LISTED = 1000
MAX_LABELS = 10_000
MAX_REQUEST_ID = 128
MAX_RETENTION_DAYS = 3650
ACCURACY, R2 = "accuracy", "r2"


@dataclass(frozen=True)
class MonitorSettings:
    byte_budget_per_day: int  # what a budget of 0 means
    retention_days: int  # what a retention of 0 means
    window_seconds: float
    drift_threshold: float


@dataclass(frozen=True)
class Quality:
    labelled: int
    metric: str  # ACCURACY or R2
    value: float
    test_value: float | None


@dataclass(frozen=True)
class ClassShare:
    index: int
    baseline: float
    window: float


@dataclass(frozen=True)
class Report:
    """One version's window: drift from its baseline and live quality."""

    deployment: str
    version: int
    window_start: datetime
    window_end: datetime
    samples: int
    has_baseline: bool
    features: list[tuple[str, float]]  # worst first
    output_psi: float
    classes: list[ClassShare]
    threshold: float
    live: Quality

    @property
    def worst(self) -> tuple[str, float]:
        """Where the window drifted most: a feature, or "outputs"."""
        if self.features and self.features[0][1] >= self.output_psi:
            return self.features[0]
        return "outputs", self.output_psi

    @property
    def drifted(self) -> bool:
        return self.has_baseline and self.worst[1] >= self.threshold


def merge(baseline: Summary, stored: Sequence[str]) -> Summary:
    """The window: the stored summaries (JSON) added up in the baseline's bins. A summary binned
    otherwise (a baseline that changed) is left out."""
    window = baseline.empty_like()
    for text in stored:
        window.absorb(Summary.from_json(text))
    return window


def quality(stats: LabelStats, info: VersionInfo) -> Quality:
    """Accuracy of the labelled calls (a version not known to be a regressor counts as a
    classifier), or R^2 (0 until the labels vary)."""
    if info.classifier is False:
        n = stats.labelled
        total = stats.label_square_sum - (stats.label_sum**2 / n if n else 0.0)
        value = 1.0 - stats.error_square_sum / total if n > 1 and total > 1e-12 else 0.0
        return Quality(n, R2, value, info.test_value)
    value = stats.correct / stats.labelled if stats.labelled else 0.0
    return Quality(stats.labelled, ACCURACY, value, info.test_value)


def class_shares(baseline: Summary, window: Summary) -> list[ClassShare]:
    if baseline.classes is None or window.classes is None:
        return []
    base_total, window_total = sum(baseline.classes) or 1, sum(window.classes) or 1
    return [
        ClassShare(index, base / base_total, seen / window_total)
        for index, (base, seen) in enumerate(zip(baseline.classes, window.classes, strict=True))
    ]


class Monitoring:
    def __init__(
        self,
        store: MonitoringStore,
        log: PredictionLog,
        catalog: VersionCatalog,
        routes: RouteTable,
        settings: MonitorSettings,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.store = store
        self.log = log
        self.catalog = catalog
        self.routes = routes
        self.settings = settings
        self.clock = clock

    # --- logging settings --------------------------------------------------------------------
    async def set_logging(
        self,
        tenant: str,
        deployment: str,
        sample_rate: float,
        byte_budget_per_day: int,
        keep_payloads: bool,
        retention_days: int,
    ) -> LoggingRecord:
        """0 for the budget or the retention means the gateway's default; a rate of 0 turns logging
        off (what was logged stays until its retention)."""
        self._deployment(tenant, deployment)
        if not (math.isfinite(sample_rate) and 0.0 <= sample_rate <= 1.0):
            raise InvalidArgument(
                f"sample_rate {sample_rate} is outside [0, 1]: give the fraction of calls to log, e.g. 0.01 for 1 %, "
                "or 0 to turn logging off"
            )
        if byte_budget_per_day < 0:
            raise InvalidArgument("byte_budget_per_day must not be negative; 0 means the gateway's default")
        if not 0 <= retention_days <= MAX_RETENTION_DAYS:
            raise InvalidArgument(
                f"retention_days must be between 1 and {MAX_RETENTION_DAYS}; 0 means the gateway's default"
            )
        record = LoggingRecord(
            tenant,
            deployment,
            sample_rate,
            byte_budget_per_day or self.settings.byte_budget_per_day,
            keep_payloads,
            retention_days or self.settings.retention_days,
            self.clock(),
        )
        await asyncio.to_thread(self.store.set_logging, record)
        self.log.changed(record)
        return record

    async def get_logging(self, tenant: str, deployment: str) -> LoggingRecord:
        """The deployment's settings; rate 0 and the defaults when logging was never set."""
        self._deployment(tenant, deployment)
        record = await asyncio.to_thread(self.store.get_logging, tenant, deployment)
        if record is None:
            return LoggingRecord(
                tenant, deployment, 0.0, self.settings.byte_budget_per_day, False, self.settings.retention_days,
                self.clock(),
            )
        return record

    # --- samples and feedback ----------------------------------------------------------------
    async def samples(self, tenant: str, deployment: str, limit: int) -> list[SampleRecord]:
        """The newest calls logged with their payloads, newest first."""
        self._deployment(tenant, deployment)
        if not 0 <= limit <= MAX_SAMPLES_LISTED:
            raise InvalidArgument(f"limit must be between 1 and {MAX_SAMPLES_LISTED}; 0 means {DEFAULT_SAMPLES_LISTED}")
        await self._written()
        return await asyncio.to_thread(
            self.store.newest_samples, tenant, deployment, limit or DEFAULT_SAMPLES_LISTED
        )

    async def feedback(
        self, tenant: str, deployment: str, labels: Sequence[tuple[str, float]]
    ) -> tuple[int, list[str]]:
        """Attach true labels (class indices, or regression targets) by request id; returns how
        many matched a logged call of one prediction, and the request ids that did not (not
        sampled, past retention, or a call of several rows)."""
        self._deployment(tenant, deployment)
        if not labels:
            raise InvalidArgument("labels is empty: give request ids with their true labels")
        if len(labels) > MAX_LABELS:
            raise InvalidArgument(f"{len(labels)} labels in one call; send at most {MAX_LABELS} per call")
        by_id: dict[str, float] = {}
        for index, (request_id, value) in enumerate(labels):
            if not request_id or len(request_id) > MAX_REQUEST_ID:
                raise InvalidArgument(
                    f"label {index + 1}: request_id must be 1 to {MAX_REQUEST_ID} characters, the x-request-id "
                    "the prediction was served with"
                )
            if not math.isfinite(value):
                raise InvalidArgument(f"label {index + 1} ({request_id[:40]!r}): value {value} is not a number")
            by_id[request_id] = value  # the last label of an id wins
        await self._written()
        matched = await asyncio.to_thread(self.store.attach_labels, tenant, deployment, by_id)
        return len(matched), [request_id for request_id in by_id if request_id not in matched]

    # --- drift -------------------------------------------------------------------------------
    async def drift(self, tenant: str, deployment: str) -> Report:
        """The deployment's serving version over the last window."""
        live = self._deployment(tenant, deployment)
        await self._written()
        return await self.report(tenant, deployment, live.route.model, live.route.version)

    async def report(self, tenant: str, deployment: str, model: str, version: int) -> Report:
        end = self.clock()
        start = end - timedelta(seconds=self.settings.window_seconds)
        info = await self.catalog.get(tenant, model, version)
        rows = await asyncio.to_thread(self.store.window_rows, tenant, deployment, version, start)
        live = await self.live_quality(tenant, deployment, model, version)
        features: list[tuple[str, float]] = []
        output_psi, classes = 0.0, []
        if info.baseline is not None:
            stored = await asyncio.to_thread(self.store.window_summaries, tenant, deployment, version, start)
            window = merge(info.baseline, stored)
            drift = summaries.drift(info.baseline, window)
            features, output_psi = drift.features, drift.outputs
            classes = class_shares(info.baseline, window)
        return Report(
            deployment, version, start, end, rows, info.baseline is not None, features, output_psi, classes,
            self.settings.drift_threshold, live,
        )

    async def live_quality(self, tenant: str, deployment: str, model: str, version: int) -> Quality:
        since = self.clock() - timedelta(seconds=self.settings.window_seconds)
        info = await self.catalog.get(tenant, model, version)
        stats = await asyncio.to_thread(self.store.label_stats, tenant, deployment, version, since)
        return quality(stats, info)

    async def _written(self) -> None:
        """What this process logged so far is in SQL (other processes write theirs within
        MAAS_MONITOR_FLUSH_SECONDS)."""
        await self.log.drain()
        await self.log.flush()

    def _deployment(self, tenant: str, deployment: str) -> LiveRoute:
        """One of the tenant's deployments, or NOT_FOUND (suggesting only the tenant's own)."""
        return self.routes.find(tenant, check_name("deployment", deployment))
