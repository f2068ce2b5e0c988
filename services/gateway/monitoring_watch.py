"""The drift monitor: every `interval_seconds`, in the one gateway process that holds the
monitoring lock among all those sharing the gateway's database, for each logged deployment:

- its serving version's window against the baseline: the PSI of the worst features and of the
  outputs as `maas_model_drift_psi`, live accuracy (or R^2) as `maas_model_live_accuracy`, and
  when the window drifted, a report to the trainer (TrainerService.ReportDrift, which starts the
  retraining policies that wait for drift); a report that fails is made again next round, as
  long as the window stays drifted;
- while a canary runs: when both versions have MIN_CANARY_LABELS labelled calls in the window and
  the canary's live quality is below the stable version's by more than `canary_quality_drop`,
  the canary is rolled back (InferenceService.RollbackCanary) and that goes to the audit log.

The same round deletes what is past its retention. Another process takes the lock over when
this one stops; the gauges of the one that stopped go with it."""

from __future__ import annotations

import asyncio
import logging

import grpc
from maas.inference.v1 import inference_pb2, inference_pb2_grpc
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from prometheus_client import Gauge

from services.common.channels import internal_metadata
from services.common.leader import LeaderLock
from services.common.periodic import Periodic
from services.gateway.audit import AuditLog
from services.gateway.monitoring import Monitoring, Quality, Report
from services.gateway.routes import LiveRoute, RouteTable
from services.gateway.store import utc_now

log = logging.getLogger(__name__)

DRIFT_PSI = Gauge(
    "maas_model_drift_psi",
    "Population stability index of a logged deployment's last window against its version's baseline, for its "
    "worst input features and its outputs (feature=\"outputs\")",
    ["tenant", "deployment", "feature"],
    multiprocess_mode="livemostrecent",
)
LIVE_ACCURACY = Gauge(
    "maas_model_live_accuracy",
    "Live accuracy (classifiers) or R^2 (regressors) of a logged deployment's labelled predictions in its last window",
    ["tenant", "deployment"],
    multiprocess_mode="livemostrecent",
)
# Features exported per deployment, worst first.
TOP_FEATURES = 10
OUTPUTS = "outputs"
# Labelled calls each side of a canary needs in the window before their quality is compared.
MIN_CANARY_LABELS = 50
# Who the audit log names as the caller of a rollback, and the method it records.
MONITOR = "monitor"
ROLLBACK_METHOD = "/maas.inference.v1.InferenceService/RollbackCanary"
CALL_TIMEOUT_SECONDS = 30.0


def exported(report: Report) -> dict[str, float]:
    """The PSI series a report sets: its worst features and the outputs."""
    return {**dict(report.features[:TOP_FEATURES]), OUTPUTS: report.output_psi}


def canary_falls_short(stable: Quality, canary: Quality, drop: float) -> bool:
    """Whether the canary's live quality is below the stable version's by more than `drop`, both
    measured on enough labelled calls."""
    enough = min(stable.labelled, canary.labelled) >= MIN_CANARY_LABELS
    return enough and stable.value - canary.value > drop


class DriftWatch:
    def __init__(
        self,
        monitoring: Monitoring,
        routes: RouteTable,
        lock: LeaderLock,
        trainer: grpc.aio.Channel,
        inference: grpc.aio.Channel,
        token: str,
        audit: AuditLog,
        interval_seconds: float,
        canary_quality_drop: float,
    ) -> None:
        self.monitoring = monitoring
        self.routes = routes
        self.lock = lock
        self.trainer = trainer_pb2_grpc.TrainerServiceStub(trainer)
        self.inference = inference_pb2_grpc.InferenceServiceStub(inference)
        self.token = token
        self.audit = audit
        self.canary_quality_drop = canary_quality_drop
        # The series this process has set, to zero those a later round no longer sets.
        self._psi_series: set[tuple[str, str, str]] = set()
        self._accuracy_series: set[tuple[str, str]] = set()
        self._rounds = Periodic("drift-monitor", self.round, interval_seconds)

    def start(self) -> None:
        self._rounds.start()

    async def close(self) -> None:
        await self._rounds.close()
        await self.lock.release()

    async def round(self) -> None:
        if await self.lock.try_acquire():
            await self.watch()

    async def watch(self) -> None:
        """One round over every logged deployment; one that fails is logged and the rest go on."""
        store = self.monitoring.store
        deleted = await asyncio.to_thread(store.delete_expired, utc_now(), self.monitoring.settings.retention_days)
        if deleted:
            log.info("logged predictions past their retention deleted", extra={"samples": deleted})
        psi_series: set[tuple[str, str, str]] = set()
        accuracy_series: set[tuple[str, str]] = set()
        for settings in await asyncio.to_thread(store.list_logging):
            live = self.routes.get(settings.tenant, settings.deployment)
            if settings.sample_rate <= 0 or live is None:
                continue
            try:
                report = await self.watch_one(settings.tenant, live)
            except Exception:
                log.exception(
                    "watching a deployment failed; the next round tries again",
                    extra={"tenant": settings.tenant, "deployment": settings.deployment},
                )
                continue
            if report.has_baseline:
                for feature, value in exported(report).items():
                    DRIFT_PSI.labels(settings.tenant, settings.deployment, feature).set(value)
                    psi_series.add((settings.tenant, settings.deployment, feature))
            if report.live.labelled:
                LIVE_ACCURACY.labels(settings.tenant, settings.deployment).set(report.live.value)
                accuracy_series.add((settings.tenant, settings.deployment))
        # In multiprocess mode a series cannot be removed: one no longer watched drops to 0.
        for labels in self._psi_series - psi_series:
            DRIFT_PSI.labels(*labels).set(0)
        for labels in self._accuracy_series - accuracy_series:
            LIVE_ACCURACY.labels(*labels).set(0)
        self._psi_series, self._accuracy_series = psi_series, accuracy_series

    async def watch_one(self, tenant: str, live: LiveRoute) -> Report:
        route = live.route
        report = await self.monitoring.report(tenant, route.deployment, route.model, route.version)
        if report.drifted:
            await self.report_drift(tenant, report)
        if live.canary is not None:
            canary = await self.monitoring.live_quality(tenant, route.deployment, route.model, live.canary.version)
            if canary_falls_short(report.live, canary, self.canary_quality_drop):
                await self.roll_back(tenant, route.deployment, report, live.canary.version, canary)
        return report

    async def report_drift(self, tenant: str, report: Report) -> None:
        feature, psi = report.worst
        request = trainer_pb2.ReportDriftRequest(tenant=tenant, deployment=report.deployment, psi=psi, feature=feature)
        try:
            answer = await self.trainer.ReportDrift(
                request, metadata=internal_metadata(self.token, tenant), timeout=CALL_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as error:
            log.warning(
                "reporting drift to the trainer failed; reported again next round",
                extra={"tenant": tenant, "deployment": report.deployment, "error": f"{error.code().name}: {error.details()}"},
            )
            return
        log.info(
            "drift reported",
            extra={"tenant": tenant, "deployment": report.deployment, "feature": feature, "psi": psi, "runs": len(answer.runs)},
        )

    async def roll_back(
        self, tenant: str, deployment: str, stable: Report, canary_version: int, canary: Quality
    ) -> None:
        resource = (
            f"{deployment}: canary v{canary_version} live {canary.metric} {canary.value:.3f} is more than "
            f"{self.canary_quality_drop} below v{stable.version}'s {stable.live.value:.3f}"
        )
        code = "OK"
        try:
            await self.inference.RollbackCanary(
                inference_pb2.RollbackCanaryRequest(name=deployment),
                metadata=internal_metadata(self.token, tenant),
                timeout=CALL_TIMEOUT_SECONDS,
            )
        except grpc.aio.AioRpcError as error:
            code = error.code().name
            log.warning(
                "rolling back a canary whose quality dropped failed; tried again next round",
                extra={"tenant": tenant, "deployment": deployment, "error": f"{code}: {error.details()}"},
            )
        else:
            log.info("canary rolled back for its live quality", extra={"tenant": tenant, "deployment": deployment})
        await self.audit.commit(tenant, MONITOR, ROLLBACK_METHOD, resource, code)
