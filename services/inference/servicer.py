"""gRPC face of the inference service: proto <-> domain only."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from maas.inference.v1 import inference_pb2, inference_pb2_grpc

from services.common.channels import MAX_REPLICAS_KEY, tenant_of
from services.common.serving import MODEL_VERSION_KEY, TASK_VALUES
from services.inference.caps import replica_memory_mb
from services.inference.converge import wanted_replicas
from services.inference.deployments import Deployments, DeploymentSpec
from services.inference.load import LoadReporter
from services.inference.nodes import Node, NodeSet
from services.inference.routes import Route
from services.inference.store import Deployment, ScalingEvent

DEVICE_NAMES = {
    inference_pb2.DEVICE_UNSPECIFIED: "",
    inference_pb2.DEVICE_AUTO: "AUTO",
    inference_pb2.DEVICE_CPU: "CPU",
    inference_pb2.DEVICE_GPU: "GPU",
}
DEVICE_VALUES = {name: value for value, name in DEVICE_NAMES.items() if name}
STATE_VALUES = {
    "LOADING": inference_pb2.DEPLOYMENT_STATE_LOADING,
    "READY": inference_pb2.DEPLOYMENT_STATE_READY,
    "FAILED": inference_pb2.DEPLOYMENT_STATE_FAILED,
    "PENDING": inference_pb2.DEPLOYMENT_STATE_PENDING,
    "SCALED_TO_ZERO": inference_pb2.DEPLOYMENT_STATE_SCALED_TO_ZERO,
}
NODE_STATE_VALUES = {
    "READY": inference_pb2.NODE_STATE_READY,
    "DRAINING": inference_pb2.NODE_STATE_DRAINING,
    "DOWN": inference_pb2.NODE_STATE_DOWN,
}
# Set by the gateway from the tenant's quota: the most replicas its deployments may reserve.



def spec_of(message: inference_pb2.Deployment) -> DeploymentSpec:
    target = message.WhichOneof("target")
    return DeploymentSpec(
        name=message.name,
        model=message.model,
        version=message.version if target == "version" else None,
        alias=message.alias if target == "alias" else None,
        instances=message.instances,
        max_batch_size=message.max_batch_size,
        # An enum value this build does not know is passed on as such and refused by the domain.
        device=DEVICE_NAMES.get(message.device, f"#{message.device}"),
        cacheable=message.cacheable,
        execution_limit_seconds=message.execution_limit_seconds,
        min_replicas=message.min_replicas if message.HasField("min_replicas") else None,
        max_replicas=message.max_replicas,
        target_in_flight=message.target_in_flight,
    )


def replica_cap_of(context: grpc.aio.ServicerContext) -> int:
    """The tenant's own replica cap the gateway asserted; 0 when it set none."""
    for key, value in context.invocation_metadata() or ():
        if key == MAX_REPLICAS_KEY:
            return int(value) if value.isdigit() else 0
    return 0


def _timestamp(value) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def scaling_event_message(event: ScalingEvent) -> inference_pb2.ScalingEvent:
    return inference_pb2.ScalingEvent(
        time=_timestamp(event.time),
        from_replicas=event.from_replicas,
        to_replicas=event.to_replicas,
        reason=event.reason,
    )


def deployment_message(
    deployment: Deployment, route: Route | None = None, events: Iterable[ScalingEvent] = ()
) -> inference_pb2.Deployment:
    """The deployment as callers see it; with its route, its replicas where they are now."""
    message = inference_pb2.Deployment(
        name=deployment.name,
        model=deployment.model,
        resolved_version=deployment.resolved_version,
        instances=deployment.instances,
        max_batch_size=deployment.max_batch_size,
        device=DEVICE_VALUES[deployment.device],
        cacheable=deployment.cacheable,
        state=STATE_VALUES[deployment.state],
        message=deployment.message,
        signature=deployment.signature,
        create_time=_timestamp(deployment.create_time),
        update_time=_timestamp(deployment.update_time),
        task=TASK_VALUES[deployment.task],
        precision=deployment.precision,
        tier=deployment.tier,
        execution_limit_seconds=deployment.execution_limit_seconds,
        min_replicas=deployment.min_replicas,
        max_replicas=deployment.max_replicas,
        target_in_flight=deployment.target_in_flight,
        desired_replicas=wanted_replicas(deployment),
        scaling_events=[scaling_event_message(event) for event in events],
    )
    if route is not None:
        message.replicas.extend(
            inference_pb2.Replica(
                node=replica.node,
                version=replica.version,
                state=STATE_VALUES[replica.state],
                canary=replica.canary,
            )
            for replica in sorted(route.replicas.values(), key=lambda r: (r.canary, r.node))
        )
        if route.shortfall and deployment.state == "READY":
            message.message = f"{message.message}; " if message.message else ""
            message.message += f"short of replicas: {route.shortfall}"
    if deployment.version is not None:
        message.version = deployment.version
    else:
        message.alias = deployment.alias or ""
    if (canary := deployment.canary) is not None:
        message.canary.CopyFrom(
            inference_pb2.Canary(
                version=canary.version,
                weight_percent=canary.weight,
                max_error_rate=canary.max_error_rate,
                state=STATE_VALUES[canary.state],
                message=canary.message,
                tier=canary.tier,
            )
        )
    return message


def route_message(route: Route, nodes: NodeSet) -> inference_pb2.Route:
    served = route.served
    addresses = _addresses(route, served.triton_model, nodes)
    message = inference_pb2.Route(
        tenant=served.tenant,
        deployment=served.name,
        model=served.model,
        version=served.resolved_version,
        triton_model=served.triton_model,
        # For readers that know one address only.
        triton_address=addresses[0] if addresses else "",
        replica_addresses=addresses,
        signature=served.signature,
        max_batch_size=served.max_batch_size,
        cacheable=route.deployment.cacheable,
        ready=route.ready,
        task=TASK_VALUES[served.task],
        scaled_to_zero=not route.ready and wanted_replicas(route.deployment) == 0,
        tier=served.tier,
    )
    if route.last_scaling is not None:
        message.last_scaling_event.CopyFrom(scaling_event_message(route.last_scaling))
    canary_addresses = _addresses(route, route.canary.triton_model, nodes) if route.canary else []
    if route.ready and route.canary is not None and canary_addresses:
        message.canary.CopyFrom(
            inference_pb2.CanaryRoute(
                version=route.canary.version,
                triton_model=route.canary.triton_model,
                weight_percent=route.canary.weight,
                replica_addresses=canary_addresses,
                tier=route.canary.tier,
            )
        )
    return message


def _addresses(route: Route, triton_model: str, nodes: NodeSet) -> list[str]:
    found = (nodes.get(name) for name in route.ready_nodes(triton_model))
    return [node.address for node in found if node is not None]


def node_message(node: Node, routes: Iterable[Route]) -> inference_pb2.Node:
    placed = [r for route in routes for r in route.replicas.values() if r.node == node.name]
    used_memory = sum(
        replica_memory_mb(route.served) for route in routes for r in route.replicas.values() if r.node == node.name
    )
    message = inference_pb2.Node(
        name=node.name,
        address=node.address,
        state=NODE_STATE_VALUES[node.state],
        model_slots=node.capacity.model_slots,
        memory_mb=node.capacity.memory_mb,
        gpus=node.capacity.gpus,
        replicas=len(placed),
        free_slots=max(0, node.capacity.model_slots - len(placed)),
        free_memory_mb=max(0, node.capacity.memory_mb - used_memory),
        message=node.message,
    )
    if node.last_contact is not None:
        message.last_contact.CopyFrom(_timestamp(node.last_contact))
    return message


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, deployments: Deployments, loads: LoadReporter) -> None:
        self.deployments = deployments
        self.loads = loads

    async def CreateDeployment(self, request, context):
        created = await self.deployments.create(
            tenant_of(context), spec_of(request.deployment), replica_cap_of(context)
        )
        return inference_pb2.CreateDeploymentResponse(deployment=self._message(created))

    async def GetDeployment(self, request, context):
        found = await self.deployments.get(tenant_of(context), request.name)
        events = await self.deployments.scaling_events(found)
        return inference_pb2.GetDeploymentResponse(deployment=self._message(found, events))

    async def ListDeployments(self, request, context):
        rows, token = await self.deployments.list_page(
            tenant_of(context), request.page_size, request.page_token
        )
        return inference_pb2.ListDeploymentsResponse(
            deployments=[self._message(row) for row in rows], next_page_token=token
        )

    async def UpdateDeployment(self, request, context):
        updated = await self.deployments.update(
            tenant_of(context), spec_of(request.deployment), request.update_mask.paths, replica_cap_of(context)
        )
        return inference_pb2.UpdateDeploymentResponse(deployment=self._message(updated))

    async def DeleteDeployment(self, request, context):
        await self.deployments.delete(tenant_of(context), request.name)
        return inference_pb2.DeleteDeploymentResponse()

    async def StartCanary(self, request, context):
        updated = await self.deployments.rollouts.start_canary(
            tenant_of(context), request.name, request.version, request.weight_percent, request.max_error_rate
        )
        return inference_pb2.StartCanaryResponse(deployment=self._message(updated))

    async def PromoteCanary(self, request, context):
        promoted = await self.deployments.rollouts.promote_canary(tenant_of(context), request.name)
        return inference_pb2.PromoteCanaryResponse(deployment=self._message(promoted))

    async def RollbackCanary(self, request, context):
        updated = await self.deployments.rollouts.rollback_canary(tenant_of(context), request.name)
        return inference_pb2.RollbackCanaryResponse(deployment=self._message(updated))

    async def GetDeploymentLoad(self, request, context):
        load = await self.loads.get(tenant_of(context), request.name)
        deployment = load.deployment
        return inference_pb2.GetDeploymentLoadResponse(
            name=deployment.name,
            instances=deployment.instances,
            max_batch_size=deployment.max_batch_size,
            versions=[
                inference_pb2.VersionLoad(
                    version=v.version,
                    pending_requests=v.pending_requests,
                    success_count=v.success_count,
                    failure_count=v.failure_count,
                    execution_count=v.execution_count,
                    average_batch_size=v.average_batch_size,
                    average_queue_ms=v.average_queue_ms,
                    average_compute_ms=v.average_compute_ms,
                )
                for v in load.versions
            ],
        )

    async def GetReplicaUsage(self, request, context):
        """Internal: the gateway's billing asks for the tenant it bills."""
        rows = await self.deployments.replica_meter.usage(tenant_of(context), request.start_day, request.end_day)
        return inference_pb2.GetReplicaUsageResponse(
            rows=[
                inference_pb2.ReplicaUsageRow(
                    day=row.day, deployment=row.deployment, tier=row.tier, replica_seconds=row.replica_seconds
                )
                for row in rows
            ]
        )

    async def Predict(self, request, context):
        response = await self.deployments.serving.predict(tenant_of(context), request, context.time_remaining())
        context.set_trailing_metadata(((MODEL_VERSION_KEY, str(response.version)),))
        return response

    async def Generate(self, request, context):
        version = None
        async for response in self.deployments.serving.generate(tenant_of(context), request, context.time_remaining()):
            if version is None:
                version = response.version
                context.set_trailing_metadata(((MODEL_VERSION_KEY, str(version)),))
            yield response

    async def Embed(self, request, context):
        response = await self.deployments.serving.embed(tenant_of(context), request, context.time_remaining())
        context.set_trailing_metadata(((MODEL_VERSION_KEY, str(response.version)),))
        return response

    def _message(self, deployment: Deployment, events: Iterable[ScalingEvent] = ()) -> inference_pb2.Deployment:
        route = self.deployments.routes.get(deployment.tenant, deployment.name)
        return deployment_message(deployment, route, events)


class RoutingServicer(inference_pb2_grpc.RoutingServiceServicer):
    """Internal: every tenant's routes, for the gateway's direct path to Triton."""

    def __init__(self, deployments: Deployments) -> None:
        self.deployments = deployments

    async def WatchRoutes(self, request, context) -> AsyncIterator[inference_pb2.WatchRoutesResponse]:
        nodes = self.deployments.nodes
        async for routes in self.deployments.routes.watch():
            yield inference_pb2.WatchRoutesResponse(routes=[route_message(route, nodes) for route in routes])

    async def Wake(self, request, context):
        await self.deployments.autoscaler.wake(request.tenant, request.deployment)
        return inference_pb2.WakeResponse()


class FleetServicer(inference_pb2_grpc.FleetServiceServicer):
    """Internal: the nodes, for the gateway's AdminService (platform admins)."""

    def __init__(self, deployments: Deployments) -> None:
        self.deployments = deployments

    async def ListNodes(self, request, context):
        routes = self.deployments.routes.all()
        return inference_pb2.ListNodesResponse(nodes=[node_message(node, routes) for node in self.deployments.nodes])

    async def DrainNode(self, request, context):
        node = self.deployments.nodes.cordon(request.name, True)
        await self.deployments.converger.capacity_changed()
        return inference_pb2.DrainNodeResponse(node=node_message(node, self.deployments.routes.all()))

    async def ResumeNode(self, request, context):
        node = self.deployments.nodes.cordon(request.name, False)
        await self.deployments.converger.capacity_changed()
        return inference_pb2.ResumeNodeResponse(node=node_message(node, self.deployments.routes.all()))
