"""Drift, feedback and live quality (Monitoring), and the leader's monitor (DriftWatch): PSI of a
window against a digits baseline, live accuracy and R^2 from labels, the window merged over
processes, bad inputs, tenant scoping, the exported gauges, drift reported to the trainer, a
canary rolled back for its quality, retention."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import numpy as np
import pytest
from maas.common.v1 import common_pb2
from maas.inference.v1 import inference_pb2, inference_pb2_grpc
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from prometheus_client import REGISTRY
from sklearn.datasets import load_digits

from services.common import summaries
from services.common.database import make_engine, upgrade
from services.common.errors import InvalidArgument, NotFound
from services.common.leader import LeaderLock
from services.gateway.audit import AuditLog
from services.gateway.monitoring import Monitoring, MonitorSettings, Quality
from services.gateway.monitoring_log import LoggedCall, PredictionLog, VersionInfo
from services.gateway.monitoring_store import MonitoringStore, SampleRecord
from services.gateway.monitoring_watch import MIN_CANARY_LABELS, DriftWatch, canary_falls_short
from services.gateway.routes import RouteTable
from services.gateway.server import MIGRATIONS
from services.gateway.store import AuditFilter, GatewayStore
from tests.unit.gateway.gateway_fakes import closed_address, route, serve

WINDOW_SECONDS = 3600.0


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1400], order[1400:]
    base = summaries.baseline({"x": x[train]}, data.target[train], classes=10)
    return base, x[test], data.target[test]


class Catalog:
    """Each (model, version)'s VersionInfo, as the registry would give it."""

    def __init__(self, infos: dict[tuple[str, int], VersionInfo]) -> None:
        self.infos = infos

    async def get(self, tenant: str, model: str, version: int) -> VersionInfo:
        return self.infos.get((model, version), VersionInfo())


class Setup:
    def __init__(self, engine, catalog: Catalog, routes: RouteTable) -> None:
        self.engine = engine
        self.store = MonitoringStore(engine)
        self.catalog = catalog
        self.routes = routes
        self.log = self.new_log()
        settings = MonitorSettings(1000, 7, WINDOW_SECONDS, 0.2)
        self.monitoring = Monitoring(self.store, self.log, catalog, routes, settings)

    def new_log(self) -> PredictionLog:
        return PredictionLog(self.store, self.catalog, queue_size=10_000, bucket_seconds=60, flush_seconds=1,
                             refresh_seconds=1)

    async def serve_calls(self, deployment: str, x: np.ndarray, logits: np.ndarray, *, version: int = 1,
                          tenant: str = "acme", at: float | None = None, log: PredictionLog | None = None,
                          prefix: str = "r") -> list[str]:
        """Log one call per row, as the call path would, and write them; returns their request ids."""
        log = log or self.log
        calls = [
            LoggedCall(tenant, deployment, "digits", version, f"{prefix}{index}", at or time.time(),
                       *predict_pair(x[index : index + 1], logits[index : index + 1]))
            for index in range(len(x))
        ]
        await log.count(calls)
        await log.flush()
        return [call.request_id for call in calls]


def predict_pair(x: np.ndarray, y: np.ndarray) -> tuple[inference_pb2.PredictRequest, bytes]:
    x, y = x.astype(np.float32), y.astype(np.float32)
    request = inference_pb2.PredictRequest(
        inputs=[common_pb2.Tensor(name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=x.shape, raw=x.tobytes())]
    )
    answer = inference_pb2.PredictResponse(
        outputs=[common_pb2.Tensor(name="logits", datatype=common_pb2.DATA_TYPE_FP32, shape=y.shape, raw=y.tobytes())]
    )
    return request, answer.SerializeToString()


def one_hot(classes: np.ndarray, width: int = 10) -> np.ndarray:
    return np.eye(width, dtype=np.float32)[classes]


def canary_route(tenant: str, deployment: str, stable: int, canary: int):
    live = route(tenant, deployment, "127.0.0.1:1", version=stable)
    live.canary.CopyFrom(inference_pb2.CanaryRoute(version=canary, triton_model=f"{deployment}--{canary}", weight_percent=50))
    return live


@pytest.fixture
async def setup(tmp_path, digits):
    base, *_ = digits
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    upgrade(engine, MIGRATIONS)
    catalog = Catalog({
        ("digits", 1): VersionInfo(base, True, 0.95),
        ("digits", 2): VersionInfo(base, True, 0.96),
    })
    async with grpc.aio.insecure_channel(closed_address()) as channel:
        routes = RouteTable(channel, "token")
        routes.apply([
            route("acme", "live", "127.0.0.1:1"),
            route("acme", "shifted", "127.0.0.1:1"),
            route("acme", "plain", "127.0.0.1:1", version=9),  # a version without a baseline
            canary_route("acme", "canaried", stable=1, canary=2),
            route("other", "live", "127.0.0.1:1"),
        ])
        routes.synced = True
        yield Setup(engine, catalog, routes)
    engine.dispose()


async def test_in_distribution_traffic_has_low_psi_and_shifted_traffic_drifts(setup, digits):
    base, test_x, test_y = digits
    await setup.serve_calls("live", test_x, one_hot(test_y))
    await setup.serve_calls("shifted", test_x * 3, one_hot(test_y))
    live = await setup.monitoring.drift("acme", "live")
    assert live.samples == len(test_x) and live.has_baseline and live.version == 1
    assert live.features[0][1] < 0.1 and live.output_psi < 0.1 and not live.drifted
    assert live.window_end - live.window_start == timedelta(seconds=WINDOW_SECONDS)
    assert [c.index for c in live.classes] == list(range(10))
    assert sum(c.window for c in live.classes) == pytest.approx(1.0)
    assert live.classes[3].baseline == pytest.approx(base.classes[3] / sum(base.classes))
    assert live.classes[3].window == pytest.approx(np.mean(test_y == 3))
    shifted = await setup.monitoring.drift("acme", "shifted")
    assert shifted.drifted and shifted.features[0][1] > 1.0 and shifted.worst == shifted.features[0]
    plain = await setup.monitoring.drift("acme", "plain")  # no baseline: no PSI, never drifted
    assert not plain.has_baseline and plain.features == [] and not plain.drifted


async def test_feedback_gives_live_accuracy_beside_the_test_figure(setup, digits):
    _, test_x, test_y = digits
    predicted = test_y.copy()
    predicted[::10] = (predicted[::10] + 1) % 10  # every tenth prediction wrong
    ids = await setup.serve_calls("live", test_x, one_hot(predicted))
    before = await setup.monitoring.drift("acme", "live")
    assert before.live == Quality(0, "accuracy", 0.0, 0.95)
    labels = [(request_id, float(label)) for request_id, label in zip(ids, test_y, strict=True)]
    matched, unmatched = await setup.monitoring.feedback("acme", "live", [*labels, ("not-logged", 1.0)])
    assert matched == len(ids) and unmatched == ["not-logged"]
    live = (await setup.monitoring.drift("acme", "live")).live
    assert live.labelled == len(ids) and live.metric == "accuracy" and live.test_value == 0.95
    assert live.value == pytest.approx(np.mean(predicted == test_y))
    # The last label sent for a request id wins.
    await setup.monitoring.feedback("acme", "live", [(ids[1], 0.0), (ids[1], float(predicted[1]))])
    assert (await setup.monitoring.drift("acme", "live")).live.value == pytest.approx(np.mean(predicted == test_y))


async def test_a_regressor_reports_r2(setup):
    setup.catalog.infos[("digits", 9)] = VersionInfo(None, False, 0.8)
    rng = np.random.default_rng(4)
    targets = rng.normal(size=200)
    predicted = targets + rng.normal(0, 0.5, 200)
    ids = await setup.serve_calls("plain", np.zeros((200, 4)), predicted[:, None], version=9)
    await setup.monitoring.feedback("acme", "plain", list(zip(ids, targets.tolist(), strict=True)))
    live = (await setup.monitoring.drift("acme", "plain")).live
    expected = 1 - np.sum((targets - predicted) ** 2) / np.sum((targets - targets.mean()) ** 2)
    assert live.metric == "r2" and live.value == pytest.approx(expected) and live.test_value == 0.8


async def test_the_window_adds_up_every_process_and_leaves_older_calls_out(setup, digits):
    _, test_x, test_y = digits
    await setup.serve_calls("live", test_x[:100], one_hot(test_y[:100]))
    await setup.serve_calls("live", test_x[100:250], one_hot(test_y[100:250]), log=setup.new_log(), prefix="b")
    await setup.serve_calls("live", test_x * 3, one_hot(test_y), at=time.time() - 2 * WINDOW_SECONDS, prefix="old")
    report = await setup.monitoring.drift("acme", "live")
    assert report.samples == 250 and sum(c.window for c in report.classes) == pytest.approx(1.0)
    assert not report.drifted  # the shifted calls are older than the window
    # Each process wrote its own row of the bucket.
    assert len(setup.store.window_summaries("acme", "live", 1, datetime.now(UTC) - timedelta(hours=1))) >= 2


async def test_settings_default_and_follow_changes(setup):
    assert (await setup.monitoring.get_logging("acme", "live")).sample_rate == 0.0
    record = await setup.monitoring.set_logging("acme", "live", 0.01, 0, True, 0)
    assert (record.sample_rate, record.byte_budget_per_day, record.keep_payloads, record.retention_days) == (
        0.01, 1000, True, 7
    )
    assert await setup.monitoring.get_logging("acme", "live") == record
    assert setup.log.settings_of("acme", "live") == record  # followed at once by this process
    off = await setup.monitoring.set_logging("acme", "live", 0.0, 5000, False, 30)
    assert (off.sample_rate, off.byte_budget_per_day, off.retention_days) == (0.0, 5000, 30)
    assert (await setup.monitoring.get_logging("other", "live")).sample_rate == 0.0  # the other tenant's own


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.set_logging("acme", "live", 1.5, 0, False, 0), "outside [0, 1]"),
        (lambda m: m.set_logging("acme", "live", -0.1, 0, False, 0), "outside [0, 1]"),
        (lambda m: m.set_logging("acme", "live", math.nan, 0, False, 0), "outside [0, 1]"),
        (lambda m: m.set_logging("acme", "live", 0.1, -1, False, 0), "byte_budget_per_day"),
        (lambda m: m.set_logging("acme", "live", 0.1, 0, False, 5000), "retention_days"),
        (lambda m: m.set_logging("acme", "Live!", 0.1, 0, False, 0), "invalid deployment name"),
        (lambda m: m.samples("acme", "live", 1001), "limit"),
        (lambda m: m.samples("acme", "live", -1), "limit"),
        (lambda m: m.feedback("acme", "live", []), "labels is empty"),
        (lambda m: m.feedback("acme", "live", [("r", 1.0)] * 10_001), "at most 10000"),
        (lambda m: m.feedback("acme", "live", [("", 1.0)]), "request_id"),
        (lambda m: m.feedback("acme", "live", [("r" * 129, 1.0)]), "request_id"),
        (lambda m: m.feedback("acme", "live", [("r", math.inf)]), "not a number"),
    ],
)
async def test_bad_inputs_are_refused(setup, call, message):
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        await call(setup.monitoring)


async def test_unknown_deployments_are_not_found_and_tenants_stay_apart(setup, digits):
    _, test_x, test_y = digits
    for call in (
        lambda m: m.set_logging("acme", "lve", 0.1, 0, False, 0),
        lambda m: m.get_logging("acme", "lve"),
        lambda m: m.samples("acme", "lve", 0),
        lambda m: m.drift("acme", "lve"),
        lambda m: m.feedback("acme", "lve", [("r", 1.0)]),
    ):
        with pytest.raises(NotFound, match="did you mean 'live'"):
            await call(setup.monitoring)
    with pytest.raises(NotFound) as found:
        await setup.monitoring.drift("other", "shifted")  # acme's deployment, asked by another tenant
    assert "did you mean" not in str(found.value)
    await setup.monitoring.set_logging("acme", "live", 1.0, 10**7, True, 0)
    ids = await setup.serve_calls("live", test_x * 3, one_hot(test_y))
    other = await setup.monitoring.drift("other", "live")  # its own deployment of the same name
    assert other.samples == 0 and not other.drifted and other.features[0][1] == 0.0
    assert await setup.monitoring.samples("other", "live", 10) == []
    assert await setup.monitoring.feedback("other", "live", [(ids[0], 1.0)]) == (0, [ids[0]])
    assert len(await setup.monitoring.samples("acme", "live", 10)) == 10


def test_a_canary_falls_short_only_on_enough_labels_and_a_large_enough_drop():
    stable = Quality(MIN_CANARY_LABELS, "accuracy", 0.95, None)
    assert canary_falls_short(stable, Quality(MIN_CANARY_LABELS, "accuracy", 0.85, None), 0.05)
    assert not canary_falls_short(stable, Quality(MIN_CANARY_LABELS, "accuracy", 0.91, None), 0.05)
    assert not canary_falls_short(stable, Quality(MIN_CANARY_LABELS - 1, "accuracy", 0.1, None), 0.05)
    assert not canary_falls_short(Quality(MIN_CANARY_LABELS - 1, "accuracy", 1.0, None),
                                  Quality(500, "accuracy", 0.1, None), 0.05)


class Trainer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self) -> None:
        self.reports: list[tuple[dict, trainer_pb2.ReportDriftRequest]] = []
        self.failures = 0

    async def ReportDrift(self, request, context):
        self.reports.append((dict(context.invocation_metadata()), request))
        if self.failures:
            self.failures -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "trainer restarting")
        return trainer_pb2.ReportDriftResponse()


class Inference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self) -> None:
        self.rollbacks: list[tuple[dict, inference_pb2.RollbackCanaryRequest]] = []

    async def RollbackCanary(self, request, context):
        self.rollbacks.append((dict(context.invocation_metadata()), request))
        return inference_pb2.RollbackCanaryResponse(deployment=inference_pb2.Deployment(name=request.name))


@dataclass
class Watched:
    """The leader's monitor, and the fakes it calls."""

    monitor: DriftWatch
    trainer: Trainer
    inference: Inference
    gateway_store: GatewayStore

    async def round(self) -> None:
        await self.monitor.round()


def new_watch(setup: Setup, trainer: grpc.aio.Channel, inference: grpc.aio.Channel) -> DriftWatch:
    lock = LeaderLock(str(setup.engine.url), "gateway-monitoring")
    audit = AuditLog(GatewayStore(setup.engine))
    return DriftWatch(setup.monitoring, setup.routes, lock, trainer, inference, "token", audit, 0, 0.05)


@pytest.fixture
async def watch(setup):
    trainer, inference = Trainer(), Inference()
    trainer_server, trainer_address = await serve((trainer_pb2_grpc.add_TrainerServiceServicer_to_server, trainer))
    inference_server, inference_address = await serve(
        (inference_pb2_grpc.add_InferenceServiceServicer_to_server, inference)
    )
    async with (
        grpc.aio.insecure_channel(trainer_address) as to_trainer,
        grpc.aio.insecure_channel(inference_address) as to_inference,
    ):
        monitor = new_watch(setup, to_trainer, to_inference)
        yield Watched(monitor, trainer, inference, GatewayStore(setup.engine))
        await monitor.close()
    await trainer_server.stop(0)
    await inference_server.stop(0)


def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def test_the_monitor_exports_drift_and_live_accuracy_and_reports_drift(setup, watch, digits):
    _, test_x, test_y = digits
    for deployment in ("live", "shifted"):
        await setup.monitoring.set_logging("acme", deployment, 0.5, 0, False, 0)
    await setup.monitoring.set_logging("acme", "plain", 0.0, 0, False, 0)  # off: not watched
    ids = await setup.serve_calls("live", test_x, one_hot(test_y))
    await setup.monitoring.feedback("acme", "live", [(i, float(y)) for i, y in zip(ids, test_y, strict=True)])
    await setup.serve_calls("shifted", test_x * 3, one_hot(test_y))
    await watch.round()
    (metadata, report), = watch.trainer.reports  # only the drifted deployment is reported
    assert (report.tenant, report.deployment) == ("acme", "shifted") and report.psi > 1.0
    assert report.feature.startswith("x[") and metadata["x-maas-tenant"] == "acme"
    assert metadata["x-maas-internal-token"] == "token"
    shifted = await setup.monitoring.drift("acme", "shifted")
    assert gauge("maas_model_drift_psi", tenant="acme", deployment="shifted", feature=report.feature) == report.psi
    assert gauge("maas_model_drift_psi", tenant="acme", deployment="shifted", feature="outputs") == pytest.approx(
        shifted.output_psi
    )
    assert gauge("maas_model_drift_psi", tenant="acme", deployment="shifted", feature=shifted.features[10][0]) is None
    assert gauge("maas_model_drift_psi", tenant="acme", deployment="live", feature="outputs") < 0.1
    assert gauge("maas_model_live_accuracy", tenant="acme", deployment="live") == 1.0
    assert gauge("maas_model_live_accuracy", tenant="acme", deployment="shifted") is None  # no labels
    # Logging turned off: the deployment's series drop to 0.
    await setup.monitoring.set_logging("acme", "live", 0.0, 0, False, 0)
    await watch.round()
    assert gauge("maas_model_live_accuracy", tenant="acme", deployment="live") == 0.0
    assert gauge("maas_model_drift_psi", tenant="acme", deployment="live", feature="outputs") == 0.0


async def test_a_failed_drift_report_is_made_again_next_round(setup, watch, digits):
    _, test_x, test_y = digits
    await setup.monitoring.set_logging("acme", "shifted", 1.0, 0, False, 0)
    await setup.serve_calls("shifted", test_x * 3, one_hot(test_y))
    watch.trainer.failures = 1
    await watch.round()
    await watch.round()
    assert len(watch.trainer.reports) == 2


async def test_only_the_leader_watches(setup, watch, digits):
    _, test_x, test_y = digits
    await setup.monitoring.set_logging("acme", "shifted", 1.0, 0, False, 0)
    await setup.serve_calls("shifted", test_x * 3, one_hot(test_y))
    await watch.round()
    async with grpc.aio.insecure_channel(closed_address()) as nowhere:
        standby = new_watch(setup, nowhere, nowhere)
        await standby.round()  # the lock is held: nothing done, nothing failed
        await standby.close()
    assert len(watch.trainer.reports) == 1
    await watch.round()
    assert len(watch.trainer.reports) == 2


async def test_a_canary_whose_live_accuracy_dropped_is_rolled_back_and_audited(setup, watch, digits):
    _, test_x, test_y = digits
    await setup.monitoring.set_logging("acme", "canaried", 0.5, 0, False, 0)
    worse = test_y.copy()
    worse[::4] = (worse[::4] + 1) % 10  # 75 % right
    stable_ids = await setup.serve_calls("canaried", test_x[:100], one_hot(test_y[:100]), prefix="s")
    canary_ids = await setup.serve_calls("canaried", test_x[:100], one_hot(worse[:100]), version=2, prefix="c")
    labels = [(i, float(y)) for i, y in zip([*stable_ids, *canary_ids], [*test_y[:100], *test_y[:100]], strict=True)]
    # Too few labels on the canary's side: no verdict yet.
    await setup.monitoring.feedback("acme", "canaried", labels[: 100 + MIN_CANARY_LABELS - 1])
    await watch.round()
    assert watch.inference.rollbacks == []
    await setup.monitoring.feedback("acme", "canaried", labels)
    await watch.round()
    (metadata, request), = watch.inference.rollbacks
    assert request.name == "canaried" and metadata["x-maas-tenant"] == "acme"
    (event,) = watch.gateway_store.list_audit_events(AuditFilter(tenant="acme"), "", 10)
    assert (event.api_key_id, event.method, event.code) == ("monitor", "/maas.inference.v1.InferenceService/RollbackCanary", "OK")
    assert "canary v2 live accuracy 0.750" in event.resource and "v1's 1.000" in event.resource


async def test_the_monitor_deletes_samples_past_their_retention(setup, watch):
    await setup.monitoring.set_logging("acme", "live", 0.5, 0, False, 1)
    old = datetime.now(UTC) - timedelta(days=2)
    setup.store.write([SampleRecord("acme", "live", 1, "old", old, 1, 1.0)], {}, [], "w")
    setup.store.write([SampleRecord("acme", "live", 1, "new", datetime.now(UTC), 1, 1.0)], {}, [], "w")
    await watch.round()
    assert setup.store.window_rows("acme", "live", 1, old - timedelta(days=1)) == 1
