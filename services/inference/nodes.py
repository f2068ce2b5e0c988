"""The Triton servers ("nodes") that replicas are placed on: each one's client, its own model
repository, its state (READY, DRAINING, DOWN), its capacity and when it last answered.

Embedded nodes are tritonserver processes this service starts on this host (MAAS_TRITON_NODES),
each with its own repository folder; external ones are reached at MAAS_TRITON_URLS and get each
model's files in the load request. The table `nodes` keeps what the service last saw of each,
for operators and for the next start.
"""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.request
from dataclasses import dataclass
from datetime import datetime

from prometheus_client import Gauge
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2

from services.common.errors import FailedPrecondition, NotFound
from services.inference.repository import ModelRepository
from services.inference.store import NodeRecord, NodeStore, now
from services.inference.triton import Triton

log = logging.getLogger(__name__)

NODE_READY, DRAINING, DOWN = "READY", "DRAINING", "DOWN"
NODE_STATES = Gauge("maas_inference_nodes", "Triton nodes by state", ["state"])
NODE_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,62}$")


@dataclass(frozen=True)
class Capacity:
    """What one node may hold: replicas (model slots) and the memory their processes take."""

    model_slots: int
    memory_mb: int
    gpus: int = 0


class Node:
    def __init__(
        self,
        name: str,
        triton: Triton,
        repository: ModelRepository,
        capacity: Capacity,
        *,
        embedded: bool,
        metrics_url: str = "",
    ) -> None:
        self.name = name
        self.triton = triton
        # Where this node's model directories are written: its own repository when embedded,
        # the folder its load requests are built from when external.
        self.repository = repository
        self.capacity = capacity
        # Its model processes run on this host: they can be watched (revive) and killed (reap).
        self.embedded = embedded
        self.metrics_url = metrics_url
        self.state = DOWN
        self.message = "starting"
        self.last_contact: datetime | None = None
        # Set by DrainNode, cleared by ResumeNode: survives the node going down and up.
        self.cordoned = False

    @property
    def address(self) -> str:
        return self.triton.address

    @property
    def placeable(self) -> bool:
        """New replicas may go here."""
        return self.state == NODE_READY

    def record(self) -> NodeRecord:
        return NodeRecord(
            name=self.name,
            address=self.address,
            state=self.state,
            model_slots=self.capacity.model_slots,
            memory_mb=self.capacity.memory_mb,
            gpus=self.capacity.gpus,
            message=self.message,
            last_contact=self.last_contact,
        )

    def read_gpus(self) -> None:
        """GPU count and memory from Triton's metrics, when it reports GPUs: they replace the
        configured memory budget (blocking: call in a thread)."""
        if not self.metrics_url:
            return
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=3) as response:  # noqa: S310 - our own node
                text = response.read().decode()
        except OSError as error:
            log.info("no metrics from node", extra={"node": self.name, "error": str(error)})
            return
        gpus, memory = gpu_capacity(text)
        if gpus:
            self.capacity = Capacity(self.capacity.model_slots, memory // (1024 * 1024), gpus)


def gpu_capacity(metrics_text: str) -> tuple[int, int]:
    """(GPUs, total GPU memory in bytes) from Triton's Prometheus metrics."""
    memory: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "nv_gpu_memory_total_bytes":
            for sample in family.samples:
                memory[sample.labels.get("gpu_uuid", str(len(memory)))] = sample.value
    return len(memory), int(sum(memory.values()))


class NodeSet:
    def __init__(self, nodes: list[Node], store: NodeStore | None = None) -> None:
        if not nodes:
            raise ValueError("the inference service needs at least one Triton node")
        self._nodes = {node.name: node for node in nodes}
        self.store = store

    def __iter__(self):
        return iter(self._nodes.values())

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, name: str) -> Node | None:
        return self._nodes.get(name)

    def named(self, name: str) -> Node:
        node = self._nodes.get(name) if NODE_NAME.match(name or "") else None
        if node is None:
            raise NotFound(f"node {name[:80]!r} not found; `maas nodes list` shows the nodes")
        return node

    def placeable(self) -> list[Node]:
        return [node for node in self if node.placeable]

    def mark(self, node: Node, state: str, message: str = "") -> None:
        """Change a node's state (a cordoned node that comes up is DRAINING, not READY)."""
        if state == NODE_READY and node.cordoned:
            state, message = DRAINING, message or "drained by an operator; `maas nodes resume` to use it again"
        node.state, node.message = state, message
        if state != DOWN:
            node.last_contact = now()
        log.info("node state", extra={"node": node.name, "state": state, "reason": message})
        for each in (NODE_READY, DRAINING, DOWN):
            NODE_STATES.labels(each).set(sum(other.state == each for other in self))

    def cordon(self, name: str, cordoned: bool) -> Node:
        node = self.named(name)
        if node.state == DOWN and cordoned:
            raise FailedPrecondition(f"node {name!r} is down: nothing on it to drain")
        node.cordoned = cordoned
        if node.state != DOWN:
            self.mark(node, NODE_READY, "")  # READY, or DRAINING when cordoned
        return node

    async def contact(self) -> None:
        """One round: note which nodes answer, and write every node's state to the table."""
        for node in self:
            if node.state != DOWN and await node.triton.is_live(timeout=1.0):
                node.last_contact = now()
        if self.store is not None:
            await asyncio.to_thread(self._save)

    def _save(self) -> None:
        assert self.store is not None
        records = [node.record() for node in self]
        for record in records:
            self.store.save(record)
        self.store.remove_except({record.name for record in records})

    async def statistics(self, triton_model: str) -> list[service_pb2.ModelStatistics]:
        """A model's statistics on every node that answers (one entry per node and version)."""
        found = await asyncio.gather(*(node.triton.statistics(triton_model) for node in self if node.state != DOWN))
        return [stats for per_node in found for stats in per_node]

    async def request_counts(self, triton_model: str) -> tuple[int, int]:
        """(succeeded, failed) requests of a model, over its replicas on every node."""
        stats = [model.inference_stats for model in await self.statistics(triton_model)]
        return sum(s.success.count for s in stats), sum(s.fail.count for s in stats)
