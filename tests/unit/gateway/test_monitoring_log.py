"""Prediction logging's call-path side and its recorder: sampling at the deployment's rate, the
bounded queue, decoding both wire formats, the predicted class kept for feedback, payloads only
when asked, summaries in the baseline's bins, settings followed across processes, and the
registry read once per version."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime

import grpc
import numpy as np
import pytest
from maas.common.v1 import common_pb2
from maas.inference.v1 import inference_pb2
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from prometheus_client import REGISTRY
from tritonclient.grpc import service_pb2

from services.common import summaries
from services.common.database import make_engine, upgrade
from services.common.logs import request_id_var
from services.common.summaries import Summary
from services.gateway import monitoring_log
from services.gateway.monitoring_log import (
    LoggedCall,
    PredictionLog,
    VersionCatalog,
    VersionInfo,
    decode,
    version_info,
)
from services.gateway.monitoring_store import LoggingRecord, MonitoringStore
from services.gateway.server import MIGRATIONS
from tests.unit.gateway.gateway_fakes import closed_address, serve

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


class Catalog:
    """What a VersionCatalog answers, without a registry."""

    def __init__(self, info: VersionInfo) -> None:
        self.info = info

    async def get(self, tenant: str, model: str, version: int) -> VersionInfo:
        return self.info


def baseline4() -> Summary:
    """Four features, four classes: the class is the argmax of the features (as the fake Triton's
    echo answers)."""
    x = np.random.default_rng(0).random((1000, 4)).astype(np.float32)
    return summaries.baseline({"x": x}, x.argmax(1), classes=4)


@pytest.fixture
def store(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    upgrade(engine, MIGRATIONS)
    yield MonitoringStore(engine)
    engine.dispose()


def new_log(store, info: VersionInfo | None = None, queue_size=100, draws=None) -> PredictionLog:
    info = info or VersionInfo()
    draw = iter(draws).__next__ if draws is not None else (lambda: 0.0)
    return PredictionLog(
        store, Catalog(info), queue_size=queue_size, bucket_seconds=60, flush_seconds=1, refresh_seconds=1, draw=draw
    )


def logging(deployment="mlp", rate=1.0, keep=False, budget=10**6, tenant="acme") -> LoggingRecord:
    return LoggingRecord(tenant, deployment, rate, budget, keep, 7, NOW)


def predict_pair(x: np.ndarray, y: np.ndarray | None = None) -> tuple[inference_pb2.PredictRequest, bytes]:
    """A Predict call and its serialized answer (by default the echo of its input)."""
    y = x if y is None else y
    request = inference_pb2.PredictRequest(
        deployment="mlp",
        inputs=[common_pb2.Tensor(name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=x.shape, raw=x.tobytes())],
    )
    response = inference_pb2.PredictResponse(
        outputs=[common_pb2.Tensor(name="y", datatype=common_pb2.DATA_TYPE_FP32, shape=y.shape, raw=y.tobytes())]
    )
    return request, response.SerializeToString()


def infer_pair(x: np.ndarray, typed: bool = False) -> tuple[service_pb2.ModelInferRequest, service_pb2.ModelInferResponse]:
    request = service_pb2.ModelInferRequest(model_name="acme--mlp--1")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=x.shape)
    if typed:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    else:
        request.raw_input_contents.append(x.tobytes())
    response = service_pb2.ModelInferResponse(model_name="acme--mlp--1")
    response.outputs.add(name="y", datatype="FP32", shape=x.shape)
    response.raw_output_contents.append(x.tobytes())
    return request, response


def offer(log: PredictionLog, request_id: str, pair, deployment="mlp", version=1, tenant="acme") -> None:
    token = request_id_var.set(request_id)
    try:
        log.offer(tenant, deployment, "digits", version, *pair)
    finally:
        request_id_var.reset(token)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_only_logged_deployments_are_sampled_at_their_rate(store):
    log = new_log(store, draws=[0.1, 0.7, 0.49, 0.5])
    log.apply([logging(rate=0.5), logging(deployment="off", rate=0.0)])
    pair = predict_pair(np.zeros((1, 4), np.float32))
    for index in range(4):
        offer(log, f"r{index}", pair)
    offer(log, "never", pair, deployment="off")  # rate 0: no draw taken
    offer(log, "never", pair, deployment="unlogged")
    offer(log, "never", pair, tenant="other")  # another tenant's deployment of the same name
    assert [call.request_id for call in log._take()] == ["r0", "r2"]


async def test_a_full_queue_drops_the_sample_and_counts_it(store):
    log = new_log(store, queue_size=2)
    log.apply([logging()])
    before = metric("maas_monitor_samples_dropped_total", reason="queue_full")
    pair = predict_pair(np.zeros((1, 4), np.float32))
    for index in range(5):
        offer(log, f"r{index}", pair)
    assert metric("maas_monitor_samples_dropped_total", reason="queue_full") - before == 3
    await log.drain()
    await log.flush()
    assert store.window_rows("acme", "mlp", 1, NOW.replace(year=2000)) == 2


async def test_logged_calls_are_written_with_their_prediction_payloads_and_summary(store):
    base = baseline4()
    log = new_log(store, VersionInfo(base, classifier=True, test_value=0.9))
    log.apply([logging(keep=True)])
    logged_before = metric("maas_monitor_samples_logged_total")
    x = np.array([[0.1, 0.9, 0.2, 0.3]], np.float32)
    offer(log, "maas-call", predict_pair(x))
    offer(log, "oip-call", infer_pair(x[:, ::-1].copy()))
    offer(log, "typed-call", infer_pair(x, typed=True))
    offer(log, "batch-call", predict_pair(np.tile(x, (3, 1))))
    await log.drain()
    await log.flush()
    assert metric("maas_monitor_samples_logged_total") - logged_before == 4
    written = {s.request_id: s for s in store.newest_samples("acme", "mlp", 10)}
    assert written["maas-call"].predicted == 1.0 and written["oip-call"].predicted == 2.0
    assert written["typed-call"].predicted == 1.0
    assert written["batch-call"].predicted is None and written["batch-call"].rows == 3
    assert json.loads(written["maas-call"].inputs_json) == {"x": x.tolist()}
    assert json.loads(written["oip-call"].outputs_json) == {"y": x[:, ::-1].tolist()}
    # Counted in the baseline's bins: 6 rows, their predicted classes.
    (stored,) = store.window_summaries("acme", "mlp", 1, NOW.replace(year=2000))
    window = Summary.from_json(stored)
    assert window.samples == 6 and window.classes == [0, 5, 1, 0]
    assert set(window.features) == set(base.features)
    assert all(sum(h.counts) == 6 for h in window.features.values())


async def test_without_a_baseline_or_payloads_only_the_prediction_is_kept(store):
    log = new_log(store)
    log.apply([logging(keep=False)])
    offer(log, "r1", predict_pair(np.array([[0.0, 0.0, 5.0, 1.0]], np.float32)))
    await log.drain()
    await log.flush()
    assert store.window_summaries("acme", "mlp", 1, NOW.replace(year=2000)) == []
    assert store.newest_samples("acme", "mlp", 10) == []  # no payloads to list
    assert store.attach_labels("acme", "mlp", {"r1": 2.0}) == {"r1"}  # its predicted class was kept
    stats = store.label_stats("acme", "mlp", 1, NOW.replace(year=2000))
    assert (stats.labelled, stats.correct) == (1, 1)


async def test_a_failed_write_is_kept_for_the_next_flush(store, monkeypatch):
    log = new_log(store, VersionInfo(baseline4(), classifier=True))
    log.apply([logging()])
    offer(log, "r1", predict_pair(np.ones((1, 4), np.float32)))
    await log.drain()
    write = store.write
    monkeypatch.setattr(store, "write", lambda *args: (_ for _ in ()).throw(OSError("disk full")))
    await log.flush()
    monkeypatch.setattr(store, "write", write)
    await log.flush()
    assert store.window_rows("acme", "mlp", 1, NOW.replace(year=2000)) == 1
    assert len(store.window_summaries("acme", "mlp", 1, NOW.replace(year=2000))) == 1


async def test_calls_counted_after_their_bucket_was_written_add_to_it(store, monkeypatch):
    """A call made in a bucket's last moment is counted after the clock has left the bucket and
    after the bucket was written: it adds to the stored summary and never replaces it (a late
    call once overwrote the whole minute's counts with its own)."""
    log = new_log(store, VersionInfo(baseline4(), classifier=True))
    log.apply([logging()])
    clock = [NOW.timestamp() + 59.9]
    monkeypatch.setattr(monitoring_log.time, "time", lambda: clock[0])
    for _ in range(5):
        offer(log, "early", predict_pair(np.ones((1, 4), np.float32)))
    await log.drain()
    await log.flush()
    offer(log, "late", predict_pair(np.ones((1, 4), np.float32)))  # still 12:00:59.9
    clock[0] += 0.2  # the clock leaves the bucket before the late call is counted
    await log.flush()
    await log.drain()
    await log.flush()
    (stored,) = store.window_summaries("acme", "mlp", 1, NOW.replace(year=2000))
    assert Summary.from_json(stored).samples == 6


def test_summaries_of_one_bucket_add_up_and_a_summary_binned_otherwise_is_left_out():
    base = baseline4()
    one, two = base.empty_like(), base.empty_like()
    summaries.add_prediction(one, {"x": np.ones((2, 4), np.float32)}, np.ones((2, 4), np.float32))
    summaries.add_prediction(two, {"x": np.zeros((3, 4), np.float32)}, np.zeros((3, 4), np.float32))
    one.absorb(two)
    assert one.samples == 5 and all(sum(h.counts) == 5 for h in one.features.values())
    assert sum(one.classes) == 5
    rebinned = Summary({"x[0]": summaries.Histogram([0.5])}, classes=[1, 1], samples=2)
    one.absorb(rebinned)
    assert sum(one.features["x[0]"].counts) == 5 and sum(one.classes) == 5 and one.samples == 7


async def test_settings_changed_through_another_process_are_followed_after_a_refresh(store):
    here, there = new_log(store), new_log(store)
    await here.refresh()
    pair = predict_pair(np.zeros((1, 4), np.float32))
    record = logging(rate=1.0)
    store.set_logging(record)
    there.changed(record)  # the process that changed it follows at once
    offer(there, "r1", pair)
    offer(here, "r2", pair)
    assert there._queue.qsize() == 1 and here._queue.qsize() == 0
    await here.refresh()
    offer(here, "r3", pair)
    assert here._queue.qsize() == 1 and here.settings_of("acme", "mlp") == record


def test_predictions_of_classifiers_and_regressors():
    def decoded(y: np.ndarray):
        return decode(LoggedCall("acme", "mlp", "m", 1, "r", 0.0, *predict_pair(np.zeros((len(y), 1), np.float32), y)))

    assert decoded(np.array([[0.1, 3.0, 0.2]], np.float32)).prediction(None) == 1.0
    assert decoded(np.array([[0.7]], np.float32)).prediction(True) == 1.0  # one logit: above 0 is class 1
    assert decoded(np.array([[-0.7]], np.float32)).prediction(True) == 0.0
    assert decoded(np.array([[-0.7]], np.float32)).prediction(False) == pytest.approx(-0.7)
    assert decoded(np.array([[2.5, 9.0]], np.float32)).prediction(False) == 2.5  # a regressor's first value
    assert decoded(np.array([[1.0], [2.0]], np.float32)).prediction(None) is None  # two rows
    assert decoded(np.array([[np.nan, 1.0]], np.float32)).prediction(None) is None


def test_a_tensor_whose_bytes_do_not_fit_its_shape_is_undecodable():
    request, response = predict_pair(np.zeros((1, 4), np.float32))
    request.inputs[0].raw = b"\0" * 12
    with pytest.raises(ValueError):
        decode(LoggedCall("acme", "mlp", "m", 1, "r", 0.0, request, response))


def test_version_info_reads_the_baseline_task_and_test_figure():
    base = baseline4()
    version = registry_pb2.Version(
        model="m", version=1, metadata={summaries.BASELINE_KEY: base.to_json(), "task": "classification"},
        metrics={"test_accuracy": 0.93, "test_r2": 0.1},
    )
    assert version_info(version) == VersionInfo(base, True, 0.93)
    regressor = registry_pb2.Version(metadata={"task": "regression"}, metrics={"test_accuracy": 0.5, "test_r2": 0.8})
    assert version_info(regressor) == VersionInfo(None, False, 0.8)
    by_baseline = registry_pb2.Version(metadata={summaries.BASELINE_KEY: base.to_json()})
    assert version_info(by_baseline).classifier is True
    broken = registry_pb2.Version(metadata={summaries.BASELINE_KEY: "{not json"}, metrics={"test_accuracy": 0.7})
    assert version_info(broken) == VersionInfo(None, None, 0.7)


class Registry(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self) -> None:
        self.calls: list[tuple[dict, registry_pb2.GetVersionRequest]] = []
        self.failing = True

    async def GetVersion(self, request, context):
        self.calls.append((dict(context.invocation_metadata()), request))
        if self.failing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        metadata = {"task": "regression"}
        return registry_pb2.GetVersionResponse(version=registry_pb2.Version(model=request.model, metadata=metadata))


async def test_the_catalog_reads_each_version_once_and_asks_again_after_a_failure():
    registry = Registry()
    server, address = await serve((registry_pb2_grpc.add_RegistryServiceServicer_to_server, registry))
    now = itertools.count(0.0, 20.0)  # each look at the clock is 20 s later
    channel = grpc.aio.insecure_channel(address)
    try:
        catalog = VersionCatalog(channel, "token", clock=lambda: next(now))
        assert await catalog.get("acme", "digits", 3) == VersionInfo()  # unavailable: no baseline for now
        assert await catalog.get("acme", "digits", 3) == VersionInfo()  # within the retry time: not asked
        assert len(registry.calls) == 1
        registry.failing = False
        for _ in range(3):
            assert (await catalog.get("acme", "digits", 3)).classifier is False
        assert len(registry.calls) == 2
        metadata, request = registry.calls[-1]
        assert metadata["x-maas-tenant"] == "acme" and metadata["x-maas-internal-token"] == "token"
        assert (request.model, request.version) == ("digits", 3)
        await catalog.get("other", "digits", 3)  # another tenant's model of the same name
        assert registry.calls[-1][0]["x-maas-tenant"] == "other"
    finally:
        await channel.close()
        await server.stop(0)


async def test_an_unreachable_registry_leaves_versions_without_baseline():
    async with grpc.aio.insecure_channel(closed_address()) as channel:
        assert await VersionCatalog(channel, "token").get("acme", "digits", 1) == VersionInfo()
