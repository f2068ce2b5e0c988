"""Per-deployment load, read from Triton: its statistics API (cumulative counts and times per
model) and its metrics endpoint (requests it holds right now). GetDeploymentLoad answers from
it, and Prometheus gauges per deployment, refreshed in the background, let an operator, an
alert or an autoscaler act on it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Gauge
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2

from services.common.periodic import Periodic
from services.inference.deployments import Deployments
from services.inference.routes import Route
from services.inference.store import FAILED, Deployment

log = logging.getLogger(__name__)

LABELS = ("tenant", "deployment")
PENDING = Gauge(
    "maas_inference_pending_requests",
    "Requests Triton holds for the deployment (all its loaded versions), queued or executing",
    LABELS,
)
QUEUE_MS = Gauge(
    "maas_inference_queue_ms",
    "Average time a request of the deployment waited in Triton's queue over the last refresh interval",
    LABELS,
)
COMPUTE_MS = Gauge(
    "maas_inference_compute_ms",
    "Average time Triton computed a request of the deployment over the last refresh interval",
    LABELS,
)
BATCH_SIZE = Gauge(
    "maas_inference_batch_size",
    "Average requests per model execution of the deployment over the last refresh interval",
    LABELS,
)
GAUGES = (PENDING, QUEUE_MS, COMPUTE_MS, BATCH_SIZE)
PENDING_METRIC = "nv_inference_pending_request_count"


class TritonStatistics(Protocol):
    """What load reporting needs of the nodes (services.inference.nodes.NodeSet): a model's
    statistics on every node that holds it."""

    async def statistics(self, triton_model: str) -> list[service_pb2.ModelStatistics]: ...


@dataclass(frozen=True)
class VersionLoad:
    version: int
    triton_model: str
    pending_requests: int = 0
    # Calls answered: rows of Triton's successful requests (the gateway joins calls into one).
    success_count: int = 0
    failure_count: int = 0
    execution_count: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    # Triton's successful requests, over which its queue and compute times are summed.
    requests: int = 0

    @property
    def average_batch_size(self) -> float:
        return self.success_count / self.execution_count if self.execution_count else 0.0

    @property
    def average_queue_ms(self) -> float:
        return self.queue_ns / self.requests / 1e6 if self.requests else 0.0

    @property
    def average_compute_ms(self) -> float:
        return self.compute_ns / self.requests / 1e6 if self.requests else 0.0

    def since(self, earlier: VersionLoad | None) -> VersionLoad:
        """The counts accumulated after `earlier` (same model); all of them if it was reloaded."""
        if earlier is None or earlier.success_count > self.success_count:
            return self
        return VersionLoad(
            self.version,
            self.triton_model,
            self.pending_requests,
            self.success_count - earlier.success_count,
            self.failure_count - earlier.failure_count,
            self.execution_count - earlier.execution_count,
            self.queue_ns - earlier.queue_ns,
            self.compute_ns - earlier.compute_ns,
            self.requests - earlier.requests,
        )


@dataclass(frozen=True)
class DeploymentLoad:
    deployment: Deployment
    versions: list[VersionLoad]


def loaded_versions(route: Route) -> list[tuple[int, str]]:
    """(version, Triton model) of every revision of a deployment that Triton holds or is loading:
    the one serving, the one a roll is loading, and the canary."""
    revisions = [route.served, route.deployment]
    found = {r.triton_model: r.resolved_version for r in revisions}
    if route.deployment.canary is not None and route.deployment.canary.state != FAILED:
        found[route.deployment.canary.triton_model] = route.deployment.canary.version
    return [(version, model) for model, version in found.items()]


def pending_by_model(metrics_text: str) -> dict[str, int]:
    """Triton's pending-request gauge per model from its Prometheus exposition."""
    pending: dict[str, int] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != PENDING_METRIC:
            continue
        for sample in family.samples:
            model = sample.labels.get("model", "")
            pending[model] = pending.get(model, 0) + int(sample.value)
    return pending


def _fetch_metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our own nodes
        return response.read().decode()


class LoadReporter:
    def __init__(
        self,
        deployments: Deployments,
        triton: TritonStatistics,
        metrics_urls: Iterable[str],
        refresh_seconds: float,
    ) -> None:
        self.deployments = deployments
        self.triton = triton
        # Every node's Prometheus endpoint: pending requests are summed over them.
        self.metrics_urls = [url for url in metrics_urls if url]
        # Per Triton model, the counts at the last refresh: the gauges show the interval since.
        self._last: dict[str, VersionLoad] = {}
        self._labelled: set[tuple[str, str]] = set()
        self._rounds = Periodic("deployment-load", self.refresh, refresh_seconds)

    async def get(self, tenant: str, name: str) -> DeploymentLoad:
        deployment = await self.deployments.get(tenant, name)
        route = self.deployments.routes.get(tenant, name)
        models = loaded_versions(route) if route is not None else []
        return DeploymentLoad(deployment, await self._read(models, await self._pending()))

    async def _pending(self) -> dict[str, int]:
        """Pending requests per Triton model over every node; a node whose endpoint does not
        answer counts none (and is logged)."""
        pending: dict[str, int] = {}
        for url in self.metrics_urls:
            try:
                text = await asyncio.to_thread(_fetch_metrics, url)
            except OSError as error:
                log.warning("a Triton metrics endpoint did not answer", extra={"url": url, "error": str(error)})
                continue
            for model, count in pending_by_model(text).items():
                pending[model] = pending.get(model, 0) + count
        return pending

    async def _read(self, models: Iterable[tuple[int, str]], pending: dict[str, int]) -> list[VersionLoad]:
        loads = []
        for version, triton_model in models:
            counts = VersionLoad(version, triton_model, pending_requests=pending.get(triton_model, 0))
            for stats in await self.triton.statistics(triton_model):
                inference = stats.inference_stats
                counts = VersionLoad(
                    version,
                    triton_model,
                    counts.pending_requests,
                    counts.success_count + stats.inference_count,
                    counts.failure_count + inference.fail.count,
                    counts.execution_count + stats.execution_count,
                    counts.queue_ns + inference.queue.ns,
                    counts.compute_ns
                    + inference.compute_input.ns
                    + inference.compute_infer.ns
                    + inference.compute_output.ns,
                    counts.requests + inference.success.count,
                )
            loads.append(counts)
        return loads

    # -- the gauges ---------------------------------------------------------------------------

    def start(self) -> None:
        self._rounds.start()

    async def close(self) -> None:
        await self._rounds.close()

    async def refresh(self) -> None:
        """Set every deployment's gauges from the counts since the last refresh."""
        pending = await self._pending()
        seen: set[tuple[str, str]] = set()
        last: dict[str, VersionLoad] = {}
        for route in self.deployments.routes.all():
            labels = (route.deployment.tenant, route.deployment.name)
            loads = await self._read(loaded_versions(route), pending)
            window = [load.since(self._last.get(load.triton_model)) for load in loads]
            last.update((load.triton_model, load) for load in loads)
            requests = sum(w.requests for w in window)
            executions = sum(w.execution_count for w in window)
            PENDING.labels(*labels).set(sum(load.pending_requests for load in loads))
            QUEUE_MS.labels(*labels).set(sum(w.queue_ns for w in window) / requests / 1e6 if requests else 0)
            COMPUTE_MS.labels(*labels).set(
                sum(w.compute_ns for w in window) / requests / 1e6 if requests else 0
            )
            rows = sum(w.success_count for w in window)
            BATCH_SIZE.labels(*labels).set(rows / executions if executions else 0)
            seen.add(labels)
        for labels in self._labelled - seen:
            for gauge in GAUGES:
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
        self._labelled, self._last = seen, last
