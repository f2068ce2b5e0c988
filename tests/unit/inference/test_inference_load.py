"""Per-deployment load: Triton's statistics and pending-request gauge read into VersionLoads,
and the Prometheus gauges refreshed from them. Triton is faked; its metrics endpoint is a real
HTTP server on port 0."""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY
from tritonclient.grpc import service_pb2

from services.common.errors import InvalidArgument, NotFound
from services.inference.deployments import DeploymentSpec
from services.inference.load import LoadReporter, VersionLoad, pending_by_model
from tests.unit.inference.inference_fakes import TENANT, FakeTriton

METRICS = """\
# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="m-a",version="1"} 3
nv_inference_pending_request_count{model="m-b",version="1"} 0
# HELP nv_inference_count Number of inferences performed
# TYPE nv_inference_count counter
nv_inference_count{model="m-a",version="1"} 40
"""


class StatsTriton(FakeTriton):
    """FakeTriton that also reports statistics, as Triton's statistics API does."""

    def __init__(self, repository) -> None:  # type: ignore[no-untyped-def]
        super().__init__(repository)
        self.stats: dict[str, service_pb2.ModelStatistics] = {}

    def ran(
        self, triton_model: str, requests: int, executions: int, queue_ms: float, failed: int = 0, rows: int = 0
    ) -> None:
        # rows: the calls those requests carried (the gateway joins calls); one each by default.
        stats = service_pb2.ModelStatistics(
            name=triton_model, version="1", execution_count=executions, inference_count=rows or requests
        )
        stats.inference_stats.success.count = requests
        stats.inference_stats.fail.count = failed
        stats.inference_stats.queue.ns = int(queue_ms * 1e6 * requests)
        stats.inference_stats.compute_infer.ns = int(2e6 * requests)
        self.stats[triton_model] = stats

    async def statistics(self, triton_model: str) -> list[service_pb2.ModelStatistics]:
        return [self.stats[triton_model]] if triton_model in self.loaded and triton_model in self.stats else []


@pytest.fixture
def triton(repository) -> StatsTriton:  # type: ignore[no-untyped-def]
    return StatsTriton(repository)


@pytest.fixture
def metrics_text() -> list[str]:
    return [METRICS]


@pytest.fixture
def metrics_url(metrics_text: list[str]) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = metrics_text[0].encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()
    server.server_close()


async def ready(deployments, name: str = "web", **fields) -> str:  # type: ignore[no-untyped-def]
    await deployments.create(TENANT, DeploymentSpec(name=name, model="digits", version=1, **fields))
    for _ in range(500):
        route = deployments.routes.get(TENANT, name)
        if route is not None and route.serving is not None:
            return route.serving.triton_model
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} never served")


def gauge(name: str, deployment: str = "web") -> float | None:
    return REGISTRY.get_sample_value(name, {"tenant": TENANT, "deployment": deployment})


def test_pending_requests_are_read_per_model_from_tritons_exposition() -> None:
    assert pending_by_model(METRICS) == {"m-a": 3, "m-b": 0}
    assert pending_by_model("") == {}


def test_averages_and_the_counts_since_an_earlier_reading() -> None:
    now = VersionLoad(1, "m", 2, success_count=30, failure_count=1, execution_count=10, queue_ns=30_000_000,
                      compute_ns=60_000_000, requests=30)
    assert (now.average_batch_size, now.average_queue_ms, now.average_compute_ms) == (3.0, 1.0, 2.0)
    earlier = VersionLoad(1, "m", 0, success_count=10, execution_count=5, queue_ns=0, compute_ns=20_000_000,
                          requests=10)
    window = now.since(earlier)
    assert (window.success_count, window.execution_count, window.average_queue_ms) == (20, 5, 1.5)
    # Joined calls: 30 calls in 15 requests. Calls per execution, times per request.
    joined = VersionLoad(1, "m", 0, success_count=30, execution_count=10, queue_ns=30_000_000, requests=15)
    assert (joined.average_batch_size, joined.average_queue_ms) == (3.0, 2.0)
    # A reloaded model starts from zero again: the whole reading is the window.
    assert now.since(VersionLoad(1, "m", 0, success_count=99)) == now
    assert VersionLoad(1, "m").average_batch_size == 0.0


async def test_get_reports_the_serving_version_with_tritons_numbers(deployments, triton, metrics_url,
                                                                    metrics_text) -> None:
    model = await ready(deployments, instances=2, max_batch_size=16)
    triton.ran(model, requests=40, executions=10, queue_ms=0.5, failed=2)
    metrics_text[0] = METRICS.replace('model="m-a"', f'model="{model}"')
    load = await LoadReporter(deployments, triton, [metrics_url], 0).get(TENANT, "web")
    assert (load.deployment.instances, load.deployment.max_batch_size) == (2, 16)
    [version] = load.versions
    assert (version.version, version.triton_model, version.pending_requests) == (1, model, 3)
    assert (version.success_count, version.failure_count, version.execution_count) == (40, 2, 10)
    assert version.average_batch_size == 4.0
    assert version.average_queue_ms == pytest.approx(0.5)
    assert version.average_compute_ms == pytest.approx(2.0)


async def test_a_canary_is_reported_beside_the_version_it_tries(deployments, triton, metrics_url) -> None:
    await ready(deployments)
    await deployments.rollouts.start_canary(TENANT, "web", 2, 10, 0.0)
    load = await LoadReporter(deployments, triton, [metrics_url], 0).get(TENANT, "web")
    assert sorted(v.version for v in load.versions) == [1, 2]


async def test_unknown_or_malformed_names_are_refused(deployments, triton, metrics_url) -> None:
    loads = LoadReporter(deployments, triton, [metrics_url], 0)
    with pytest.raises(NotFound):
        await loads.get(TENANT, "nope")
    with pytest.raises(InvalidArgument):
        await loads.get(TENANT, "Not A Name!")
    with pytest.raises(NotFound):
        await loads.get("other-tenant", "web")


async def test_without_tritons_metrics_endpoint_pending_is_zero_not_an_error(deployments, triton) -> None:
    model = await ready(deployments)
    triton.ran(model, requests=5, executions=5, queue_ms=1.0)
    load = await LoadReporter(deployments, triton, ["http://127.0.0.1:9/metrics"], 0).get(TENANT, "web")
    assert (load.versions[0].pending_requests, load.versions[0].success_count) == (0, 5)


async def test_gauges_show_the_last_interval_and_go_with_the_deployment(deployments, triton, metrics_url,
                                                                         metrics_text) -> None:
    model = await ready(deployments)
    metrics_text[0] = METRICS.replace('model="m-a"', f'model="{model}"')
    loads = LoadReporter(deployments, triton, [metrics_url], 0)
    triton.ran(model, requests=10, executions=10, queue_ms=1.0)
    await loads.refresh()
    assert gauge("maas_inference_pending_requests") == 3
    assert gauge("maas_inference_queue_ms") == pytest.approx(1.0)
    assert gauge("maas_inference_batch_size") == 1.0
    # 30 more requests in 5 batches, queued 5 ms each (cumulative average 4 ms): the gauges
    # show the interval, not the average since loading.
    stats = triton.stats[model]
    stats.inference_stats.success.count = stats.inference_count = 40
    stats.execution_count = 15
    stats.inference_stats.queue.ns += int(30 * 5e6)
    await loads.refresh()
    assert gauge("maas_inference_queue_ms") == pytest.approx(5.0)
    assert gauge("maas_inference_batch_size") == pytest.approx(6.0)
    await deployments.delete(TENANT, "web")
    await loads.refresh()
    assert gauge("maas_inference_pending_requests") is None
