"""In-process fakes of the gateway's backends (registry, inference, trainer, Triton) and a
helper that starts the real gateway in front of them. Used only by the gateway's unit tests."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from maas.common.v1 import common_pb2
from maas.gateway.v1 import admin_pb2, admin_pb2_grpc, billing_pb2_grpc
from maas.inference.v1 import inference_pb2, inference_pb2_grpc
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common.interceptors import TENANT_KEY
from services.common.server import running
from services.gateway.config import GatewaySettings
from services.gateway.server import bootstrap_admin, create_app

TOKEN = "internal-test-token"


def closed_address() -> str:
    """An address nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


class FakeRegistry(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self) -> None:
        self.metadata: list[dict] = []  # invocation metadata of every call
        self.time_remaining: list[float | None] = []
        self.download_cancelled = asyncio.Event()
        self.upload_ended = asyncio.Event()
        # tenant -> (day, bytes) samples GetStorageUsage answers within the days asked for.
        self.storage: dict[str, list[tuple[str, int]]] = {}
        self.kek_rotations = 0

    def _record(self, context: grpc.aio.ServicerContext) -> str:
        metadata = dict(context.invocation_metadata())
        self.metadata.append(metadata)
        self.time_remaining.append(context.time_remaining())
        return metadata.get(TENANT_KEY, "")

    async def GetModel(self, request, context):
        tenant = self._record(context)
        if request.name == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "model 'missing' not found")
        if request.name == "busy":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "registry is busy compacting, retry later")
        if request.name == "slow":
            await asyncio.sleep(5)
        return registry_pb2.GetModelResponse(model=registry_pb2.Model(name=request.name, description=tenant))

    async def CreateModel(self, request, context):
        tenant = self._record(context)
        model = registry_pb2.Model(name=request.name, description=tenant)
        return registry_pb2.CreateModelResponse(model=model)

    async def UploadVersion(self, request_iterator, context):
        tenant = self._record(context)
        header = None
        digest = hashlib.sha256()
        size = 0
        try:
            async for message in request_iterator:
                if header is None:
                    header = message.header
                    if header.model == "bad":
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model 'bad' has no signature")
                    continue
                digest.update(message.chunk)
                size += len(message.chunk)
        finally:
            # A cancelled client stream reaches a handler as the end of its requests.
            self.upload_ended.set()
        version = registry_pb2.Version(
            model=header.model, version=1, sha256=digest.hexdigest(), size_bytes=size, precision=tenant
        )
        return registry_pb2.UploadVersionResponse(version=version)

    async def DownloadVersion(self, request, context):
        tenant = self._record(context)
        if request.model == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "model 'missing' not found")
        yield registry_pb2.DownloadVersionResponse(
            version=registry_pb2.Version(model=request.model, version=request.version, precision=tenant)
        )
        if request.model == "endless":
            try:
                while True:
                    yield registry_pb2.DownloadVersionResponse(chunk=b"x" * 1024)
                    await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                self.download_cancelled.set()
                raise
        for chunk in (b"abc", b"def"):
            yield registry_pb2.DownloadVersionResponse(chunk=chunk)


    async def GetStorageUsage(self, request, context):
        tenant = self._record(context)
        days = [
            registry_pb2.StorageUsageDay(day=day, bytes=size)
            for day, size in self.storage.get(tenant, [])
            if request.start_day <= day <= request.end_day
        ]
        return registry_pb2.GetStorageUsageResponse(days=days)

    async def RotateKek(self, request, context):
        self._record(context)
        self.kek_rotations += 1
        return registry_pb2.RotateKekResponse(
            rewrapped_keys=7, kek_id=f"kek-{self.kek_rotations}", previous_kek_id=f"kek-{self.kek_rotations - 1}"
        )


class FakeInference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self) -> None:
        self.predicts: list[inference_pb2.PredictRequest] = []
        self.metadata: list[dict] = []
        # tenant -> the rows GetReplicaUsage answers within the days asked for.
        self.replica_usage: dict[str, list[inference_pb2.ReplicaUsageRow]] = {}

    async def GetReplicaUsage(self, request, context):
        metadata = dict(context.invocation_metadata())
        self.metadata.append(metadata)
        rows = [
            row
            for row in self.replica_usage.get(metadata.get(TENANT_KEY, ""), [])
            if request.start_day <= row.day <= request.end_day
        ]
        return inference_pb2.GetReplicaUsageResponse(rows=rows)

    async def GetDeployment(self, request, context):
        metadata = dict(context.invocation_metadata())
        self.metadata.append(metadata)
        deployment = inference_pb2.Deployment(name=request.name, message=metadata.get(TENANT_KEY, ""))
        return inference_pb2.GetDeploymentResponse(deployment=deployment)

    async def Predict(self, request, context):
        self.predicts.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        return inference_pb2.PredictResponse(model="served-by-inference", version=7)


class FakeRouting(inference_pb2_grpc.RoutingServiceServicer):
    """WatchRoutes sends the current table on connect and after every publish; Wake records
    what it was asked to wake."""

    def __init__(self, routes: list[inference_pb2.Route], available: bool = True) -> None:
        self.routes = routes
        self.available = available
        self.metadata: list[dict] = []
        self.wakes: list[inference_pb2.WakeRequest] = []
        self.wake_metadata: list[dict] = []
        self._subscribers: set[asyncio.Queue] = set()

    async def Wake(self, request, context):
        self.wakes.append(request)
        self.wake_metadata.append(dict(context.invocation_metadata()))
        return inference_pb2.WakeResponse()

    def publish(self, routes: list[inference_pb2.Route]) -> None:
        self.routes = routes
        for queue in self._subscribers:
            queue.put_nowait(routes)

    def end_streams(self) -> None:
        for queue in self._subscribers:
            queue.put_nowait(None)

    async def WatchRoutes(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        if not self.available:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "inference is starting")
        queue: asyncio.Queue = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            routes = self.routes
            while routes is not None:
                yield inference_pb2.WatchRoutesResponse(routes=routes)
                routes = await queue.get()
        finally:
            self._subscribers.discard(queue)


class FakeFleet(inference_pb2_grpc.FleetServiceServicer):
    """Two nodes; DrainNode and ResumeNode change the named one's state; unknown names are
    NOT_FOUND."""

    def __init__(self) -> None:
        self.nodes = {
            name: inference_pb2.Node(
                name=name, address=f"127.0.0.1:{port}", state=inference_pb2.NODE_STATE_READY
            )
            for name, port in (("triton-0", 8001), ("triton-1", 8011))
        }
        self.metadata: list[dict] = []

    async def _node(self, name: str, context) -> inference_pb2.Node:
        self.metadata.append(dict(context.invocation_metadata()))
        if name not in self.nodes:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"node {name!r} not found")
        return self.nodes[name]

    async def ListNodes(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        return inference_pb2.ListNodesResponse(nodes=self.nodes.values())

    async def DrainNode(self, request, context):
        node = await self._node(request.name, context)
        node.state = inference_pb2.NODE_STATE_DRAINING
        return inference_pb2.DrainNodeResponse(node=node)

    async def ResumeNode(self, request, context):
        node = await self._node(request.name, context)
        node.state = inference_pb2.NODE_STATE_READY
        return inference_pb2.ResumeNodeResponse(node=node)


# What Triton says when a model is not loaded on it (never was, or is being unloaded).
NOT_LOADED = "Request for unknown model: '{model}' is not found"


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """ModelInfer echoes each input back as output "y"; "broken" fails like a crashing model.
    As a replica that cannot serve: `unavailable` answers every call UNAVAILABLE (a node going
    away), `not_loaded` as Triton does for a model it does not have. `delay` seconds pass before
    each answer (FakeGenerator: before each token)."""

    def __init__(self) -> None:
        self.requests: list[service_pb2.ModelInferRequest] = []
        self.unavailable = False
        self.not_loaded = False
        self.delay = 0.0

    async def ModelInfer(self, request, context):
        self.requests.append(request)
        if self.unavailable:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")
        if self.not_loaded:
            await context.abort(grpc.StatusCode.NOT_FOUND, NOT_LOADED.format(model=request.model_name))
        await asyncio.sleep(self.delay)
        if "--broken--" in request.model_name:
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"Failed to process the request for model '{request.model_name}': boom",
            )
        response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
        first = request.inputs[0]
        response.outputs.add(name="y", datatype=first.datatype, shape=first.shape)
        response.raw_output_contents.append(request.raw_input_contents[0])
        return response


class FakeGenerator(FakeTriton):
    """Also a decoupled text model: ModelStreamInfer answers one token ("a", "b", ...) per
    response, every `delay` seconds, up to max_tokens or `stop_after` tokens (finish "stop"),
    then a last response with the counts; a prompt holding "~" is refused as invalid input.
    `fail_after` tokens, the stream fails UNAVAILABLE (a node dying mid-stream)."""

    def __init__(self, delay: float = 0.0, stop_after: int = 0) -> None:
        super().__init__()
        self.delay = delay
        self.stop_after = stop_after
        self.fail_after: int | None = None
        self.streams: list[service_pb2.ModelInferRequest] = []
        self.cancelled = asyncio.Event()

    async def ModelStreamInfer(self, request_iterator, context):
        async for request in request_iterator:
            self.streams.append(request)
            if self.unavailable:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")
            if self.not_loaded:
                # Triton reports a stream's per-request errors in the stream, not as its status.
                yield service_pb2.ModelStreamInferResponse(
                    error_message=NOT_LOADED.format(model=request.model_name)
                )
                continue
            prompt = request.raw_input_contents[0][4:].decode()
            if "~" in prompt:
                yield service_pb2.ModelStreamInferResponse(error_message="invalid input: '~' is not known")
                continue
            max_tokens = request.parameters["max_tokens"].int64_param
            count = min(max_tokens, self.stop_after or max_tokens)
            try:
                for index in range(count):
                    if index == self.fail_after:
                        await context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")
                    await asyncio.sleep(self.delay)
                    yield _generated(request.id, text=chr(ord("a") + index % 26))
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            reason = "stop" if count < max_tokens else "length"
            yield _generated(
                request.id, text="", finish_reason=reason, prompt_tokens=len(prompt), completion_tokens=count
            )


def _generated(request_id: str, **outputs) -> service_pb2.ModelStreamInferResponse:
    response = service_pb2.ModelStreamInferResponse()
    response.infer_response.id = request_id  # Triton echoes the request's id
    for name, value in outputs.items():
        if isinstance(value, str):
            response.infer_response.outputs.add(name=name, datatype="BYTES", shape=[1])
            encoded = value.encode()
            response.infer_response.raw_output_contents.append(len(encoded).to_bytes(4, "little") + encoded)
        else:
            response.infer_response.outputs.add(name=name, datatype="INT64", shape=[1])
            response.infer_response.raw_output_contents.append(value.to_bytes(8, "little", signed=True))
    return response


def signature() -> common_pb2.Signature:
    return common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=[4])],
        outputs=[common_pb2.TensorSpec(name="y", datatype=common_pb2.DATA_TYPE_FP32, shape=[4])],
    )


def route(
    tenant: str,
    deployment: str,
    triton_address: str,
    ready: bool = True,
    cacheable: bool = False,
    version: int = 1,
    task: int = inference_pb2.SERVING_TASK_PREDICT,
    replica_addresses: Sequence[str] = (),
    scaled_to_zero: bool = False,
) -> inference_pb2.Route:
    return inference_pb2.Route(
        tenant=tenant,
        deployment=deployment,
        model="digits",
        version=version,
        triton_model=f"{tenant}--{deployment}--{version}",
        triton_address=triton_address,
        signature=signature(),
        max_batch_size=8,
        ready=ready,
        cacheable=cacheable,
        task=task,
        replica_addresses=replica_addresses,
        scaled_to_zero=scaled_to_zero,
    )


async def serve(*mounts) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    for add_to_server, servicer in mounts:
        add_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@dataclass
class Stack:
    """The real gateway in front of fakes, with tenants "acme" and "other" and keys for each role."""

    port: int
    channel: grpc.aio.Channel
    settings: GatewaySettings
    registry: FakeRegistry
    inference: FakeInference
    routing: FakeRouting
    triton: FakeGenerator
    triton_address: str
    fleet: FakeFleet
    keys: dict[str, str] = field(default_factory=dict)  # "admin", "reader", ... -> plaintext
    key_ids: dict[str, str] = field(default_factory=dict)

    @property
    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self.channel)

    @property
    def billing(self) -> billing_pb2_grpc.BillingServiceStub:
        return billing_pb2_grpc.BillingServiceStub(self.channel)

    @property
    def registry_stub(self) -> registry_pb2_grpc.RegistryServiceStub:
        return registry_pb2_grpc.RegistryServiceStub(self.channel)

    @property
    def inference_stub(self) -> inference_pb2_grpc.InferenceServiceStub:
        return inference_pb2_grpc.InferenceServiceStub(self.channel)

    def auth(self, who: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.keys[who]}"),)

    async def wait_for_routes(self) -> None:
        # The route watcher runs in the background; poll until its table arrived.
        for _ in range(200):
            ready = await self.oip_ready()
            if ready:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the gateway never received the routing table")

    async def oip_ready(self) -> bool:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        response = await stub.ServerReady(service_pb2.ServerReadyRequest(), metadata=self.auth("reader"))
        return response.ready


@contextlib.asynccontextmanager
async def gateway_stack(
    tmp_path: Path, *, routes_available: bool = True, redis_url: str = "", **settings_overrides
) -> AsyncIterator[Stack]:
    """`redis_url` empty: a closed port, so the gateway runs on its Redis fallbacks. A
    `registry_addr` override puts a real registry (with the internal token TOKEN) behind it."""
    registry, inference, triton, fleet = FakeRegistry(), FakeInference(), FakeGenerator(), FakeFleet()
    triton_server, triton_address = await serve(
        (service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, triton)
    )
    routing = FakeRouting(
        [
            route("acme", "mlp", triton_address),
            route("acme", "loading", triton_address, ready=False),
            route("acme", "broken", triton_address),
            route("acme", "orphan", closed_address()),
            route("other", "secret", triton_address),
            route("acme", "cached", triton_address, cacheable=True),
            route("other", "cached", triton_address, cacheable=True),
        ],
        available=routes_available,
    )
    registry_server, registry_address = await serve(
        (registry_pb2_grpc.add_RegistryServiceServicer_to_server, registry)
    )
    inference_server, inference_address = await serve(
        (inference_pb2_grpc.add_InferenceServiceServicer_to_server, inference),
        (inference_pb2_grpc.add_RoutingServiceServicer_to_server, routing),
        (inference_pb2_grpc.add_FleetServiceServicer_to_server, fleet),
    )
    settings_overrides.setdefault("trainer_addr", closed_address())
    settings_overrides.setdefault("registry_addr", registry_address)
    # The HTTP port only where a test asks for it: never the default 50080 that a running stack holds.
    settings_overrides.setdefault("gateway_http_addr", "")
    settings = GatewaySettings(
        home=tmp_path,
        gateway_addr="127.0.0.1:0",
        inference_addr=inference_address,
        internal_token=TOKEN,
        redis_url=redis_url or f"redis://{closed_address()}/0",
        **settings_overrides,
    )
    try:
        key_file = tmp_path / "admin.key"
        await bootstrap_admin(settings, key_file)
        app = await create_app(settings)
        async with running(app) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stack = Stack(
                server.port, channel, settings, registry, inference, routing, triton, triton_address, fleet
            )
            stack.keys["admin-of-admin"] = key_file.read_text().strip()
            await _onboard(stack)
            yield stack
    finally:
        for fake in (triton_server, registry_server, inference_server):
            await fake.stop(0)


async def _onboard(stack: Stack) -> None:
    admin = stack.admin
    root = stack.auth("admin-of-admin")
    for tenant in ("acme", "other"):
        await admin.CreateTenant(admin_pb2.CreateTenantRequest(name=tenant), metadata=root)
    for who, tenant, role in (
        ("reader", "acme", admin_pb2.ROLE_READER),
        ("developer", "acme", admin_pb2.ROLE_DEVELOPER),
        ("admin", "acme", admin_pb2.ROLE_ADMIN),
        ("other", "other", admin_pb2.ROLE_DEVELOPER),
    ):
        created = await admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant=tenant, role=role, description=who), metadata=root
        )
        stack.keys[who] = created.plaintext
        stack.key_ids[who] = created.api_key.id
