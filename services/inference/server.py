from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
from pathlib import Path

from maas.inference.v1 import inference_pb2_grpc

from services.common.channels import internal_credentials, open_channel, triton_credentials
from services.common.database import make_engine, upgrade
from services.common.interceptors import internal_token_authenticator
from services.common.leader import LeaderLock
from services.common.server import App, RunningServer, ServerSpec, Servicer, server_tls
from services.inference.artifacts import ArtifactCache, Registry
from services.inference.autoscaler import Policy
from services.inference.caps import TenantCaps
from services.inference.config import InferenceSettings
from services.inference.converge import Converger
from services.inference.deployments import Deployments, gpu_on_this_host
from services.inference.load import LoadReporter
from services.inference.nodes import Capacity, Node, NodeSet
from services.inference.repository import ModelRepository
from services.inference.servicer import FleetServicer, InferenceServicer, RoutingServicer
from services.inference.store import DeploymentStore, NodeStore
from services.inference.triton import TritonClient, TritonLaunch, TritonSupervisor, TritonTls

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
# How often the service looks for served models whose processes died (its own Triton only).
STUB_CHECK_SECONDS = 1.0
# An external node's memory budget when none is configured.
EXTERNAL_NODE_MEMORY_MB = 16384


def triton_tls(settings: InferenceSettings) -> TritonTls | None:
    """The certificate our own Triton serves, when its port speaks TLS."""
    if settings.external_triton_addresses or not settings.uses_triton_tls:
        return None
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise ValueError("MAAS_TRITON_TLS=true for our own Triton needs MAAS_TLS_CERT_FILE and MAAS_TLS_KEY_FILE")
    return TritonTls(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)


def host_memory_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 16384


def external_node_names(addresses: list[str]) -> list[str]:
    """Stable names for external nodes: the first label of each host (a StatefulSet pod's name,
    triton-0.triton.ns.svc... -> triton-0), or the whole address where those would clash."""
    labels = [address.rsplit(":", 1)[0].split(".")[0].lower() for address in addresses]
    if len(set(labels)) == len(labels) and not any(label.isdigit() for label in labels):
        return labels
    return [address.lower().replace(":", "-").replace("[", "").replace("]", "") for address in addresses]


class Fleet:
    """The nodes, and what keeps each one running (embedded) or watched (external)."""

    def __init__(self, settings: InferenceSettings, store: NodeStore) -> None:
        directory = settings.directory / "nodes"
        token, credentials = settings.triton_token, triton_credentials(settings)
        addresses = settings.external_triton_addresses
        self.supervisors: list[tuple[Node, TritonSupervisor]] = []
        nodes = []
        if addresses:
            memory = settings.triton_node_memory_mb or EXTERNAL_NODE_MEMORY_MB
            for name, address in zip(external_node_names(addresses), addresses, strict=True):
                host = address.rsplit(":", 1)[0]
                repository = ModelRepository(directory / name / "models", directory / name / "staging")
                client = TritonClient(address, token, credentials, ships_from=repository.root)
                metrics = f"http://{host}:{settings.triton_metrics_port}/metrics"
                nodes.append(Node(name, client, repository, Capacity(settings.triton_node_model_slots, memory),
                                  embedded=False, metrics_url=metrics))
        else:
            memory = settings.triton_node_memory_mb or host_memory_mb() * 3 // 4 // settings.triton_nodes
            for index in range(settings.triton_nodes):
                name = f"triton-{index}"
                grpc_port, _, metrics_port = settings.embedded_ports(index)
                repository = ModelRepository(directory / name / "models", directory / name / "staging")
                client = TritonClient(f"127.0.0.1:{grpc_port}", token, credentials)
                nodes.append(Node(name, client, repository, Capacity(settings.triton_node_model_slots, memory),
                                  embedded=True, metrics_url=f"http://127.0.0.1:{metrics_port}/metrics"))
        self.nodes = NodeSet(nodes, store)
        self.settings = settings
        self.external = bool(addresses)

    def watch(self, converger: Converger) -> None:
        """A supervisor per node, telling the converger when its node comes up or goes down."""
        settings = self.settings
        for index, node in enumerate(self.nodes):
            grpc_port, http_port, metrics_port = settings.embedded_ports(index)
            launch = TritonLaunch(
                directory=node.repository.root.parent,
                grpc_port=grpc_port,
                http_port=http_port,
                metrics_port=metrics_port,
                token=settings.triton_token,
                fence_models=settings.model_fence == "required",
                tls=triton_tls(settings),
            )
            supervisor = TritonSupervisor(
                launch=launch,
                client=node.triton,  # type: ignore[arg-type]
                external=self.external,
                start_timeout=settings.triton_start_timeout_seconds,
                on_start=functools.partial(converger.node_up, node),
                on_exit=functools.partial(converger.node_down, node),
            )
            self.supervisors.append((node, supervisor))

    async def start(self) -> None:
        await asyncio.gather(*(supervisor.start() for _, supervisor in self.supervisors))

    async def stop(self) -> None:
        await asyncio.gather(*(supervisor.stop() for _, supervisor in self.supervisors))
        for node in self.nodes:
            await node.triton.close()  # type: ignore[attr-defined]


async def _stop_when_lost(leader: LeaderLock) -> None:
    """Leadership lost (its database session ended): stop at once, as a standby may lead now."""
    await leader.lost()
    log.error("lost the inference leader lock; stopping")
    os.kill(os.getpid(), signal.SIGTERM)


async def create_app(settings: InferenceSettings) -> App:
    engine = make_engine(settings.inference_database_url)
    await asyncio.to_thread(upgrade, engine, MIGRATIONS)
    directory = settings.directory
    registry_channel = open_channel(settings.registry_addr, internal_credentials(settings))
    registry = Registry(registry_channel, settings.internal_token, settings.model_load_timeout_seconds)
    fleet = Fleet(settings, NodeStore(engine))
    leader = LeaderLock(settings.inference_database_url, "inference") if settings.inference_leader_election else None
    deployments = Deployments(
        store=DeploymentStore(engine),
        registry=registry,
        artifacts=ArtifactCache(directory / "artifacts", registry),
        nodes=fleet.nodes,
        gpu_available=gpu_on_this_host() if settings.gpu_available is None else settings.gpu_available,
        load_timeout=settings.model_load_timeout_seconds,
        load_concurrency=settings.model_load_concurrency,
        predict_timeout=settings.predict_timeout_seconds,
        cold_start_wait=settings.cold_start_wait_seconds,
        drain_seconds=settings.rollout_drain_seconds,
        alias_poll_interval=settings.alias_poll_seconds,
        canary_check_interval=settings.canary_check_seconds,
        # Only embedded nodes have their model processes where the service can see them.
        stub_check_interval=0.0 if fleet.external else STUB_CHECK_SECONDS,
        execution_limit=settings.inference_execution_limit_seconds,
        caps=TenantCaps(
            max_deployments=settings.inference_max_deployments_per_tenant,
            max_memory_mb=settings.inference_max_memory_per_tenant_mb,
            max_replicas=settings.inference_max_replicas_per_tenant,
        ),
        scaling=Policy(
            target_in_flight=settings.inference_target_in_flight,
            up_window=settings.inference_scale_up_window_seconds,
            down_window=settings.inference_scale_down_window_seconds,
            idle_to_zero=settings.inference_scale_to_zero_seconds,
        ),
        fill_interval=settings.inference_replica_check_seconds,
        autoscale_interval=settings.inference_autoscale_seconds,
        replica_meter_interval=settings.inference_replica_meter_seconds,
        leading=lambda: leader is None or leader.held,
    )
    await deployments.converger.restore()
    fleet.watch(deployments.converger)
    background: set[asyncio.Task] = set()
    loads = LoadReporter(
        deployments, fleet.nodes, [node.metrics_url for node in fleet.nodes], settings.load_refresh_seconds
    )

    async def on_start(server: RunningServer) -> None:
        # Health stays NOT_SERVING until this returns: every node up, deployments loading.
        if leader is not None:
            # A standby waits here, not ready, until the leader goes; two never drive the nodes.
            log.info("waiting for the inference leader lock")
            await leader.acquire()
            watcher = asyncio.create_task(_stop_when_lost(leader))
            background.add(watcher)
        await fleet.start()
        await deployments.converger.start()
        deployments.start_watching()
        loads.start()

    async def on_stop() -> None:
        for task in background:
            task.cancel()
        await loads.close()
        await deployments.close()
        await fleet.stop()
        if leader is not None:
            await leader.release()
        await registry_channel.close()
        engine.dispose()

    spec = ServerSpec(
        service="inference",
        address=settings.inference_addr,
        servicers=[
            Servicer(
                inference_pb2_grpc.add_InferenceServiceServicer_to_server,
                InferenceServicer(deployments, loads),
                "maas.inference.v1.InferenceService",
            ),
            Servicer(
                inference_pb2_grpc.add_RoutingServiceServicer_to_server,
                RoutingServicer(deployments),
                "maas.inference.v1.RoutingService",
            ),
            Servicer(
                inference_pb2_grpc.add_FleetServiceServicer_to_server,
                FleetServicer(deployments),
                "maas.inference.v1.FleetService",
            ),
        ],
        authenticate=internal_token_authenticator(settings.internal_token)
        if settings.internal_token
        else None,
        max_message_bytes=settings.max_message_bytes,
        tls=server_tls(settings),
    )
    return App(spec, on_start=on_start, on_stop=on_stop)
