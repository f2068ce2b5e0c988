"""gRPC face of the inference service: proto <-> domain only."""

from __future__ import annotations

from collections.abc import AsyncIterator

from google.protobuf.timestamp_pb2 import Timestamp
from maas.inference.v1 import inference_pb2, inference_pb2_grpc

from services.common.channels import tenant_of
from services.common.serving import MODEL_VERSION_KEY, TASK_VALUES
from services.inference.deployments import Deployments, DeploymentSpec
from services.inference.load import LoadReporter
from services.inference.routes import Route
from services.inference.store import Deployment

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
}


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
    )


def _timestamp(value) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def deployment_message(deployment: Deployment) -> inference_pb2.Deployment:
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
        execution_limit_seconds=deployment.execution_limit_seconds,
    )
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
            )
        )
    return message


def route_message(route: Route, triton_address: str) -> inference_pb2.Route:
    served = route.served
    message = inference_pb2.Route(
        tenant=served.tenant,
        deployment=served.name,
        model=served.model,
        version=served.resolved_version,
        triton_model=served.triton_model,
        triton_address=triton_address,
        signature=served.signature,
        max_batch_size=served.max_batch_size,
        cacheable=route.deployment.cacheable,
        ready=route.ready,
        task=TASK_VALUES[served.task],
    )
    if route.ready and route.canary is not None:
        message.canary.CopyFrom(
            inference_pb2.CanaryRoute(
                version=route.canary.version,
                triton_model=route.canary.triton_model,
                weight_percent=route.canary.weight,
            )
        )
    return message


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, deployments: Deployments, loads: LoadReporter) -> None:
        self.deployments = deployments
        self.loads = loads

    async def CreateDeployment(self, request, context):
        created = await self.deployments.create(tenant_of(context), spec_of(request.deployment))
        return inference_pb2.CreateDeploymentResponse(deployment=deployment_message(created))

    async def GetDeployment(self, request, context):
        found = await self.deployments.get(tenant_of(context), request.name)
        return inference_pb2.GetDeploymentResponse(deployment=deployment_message(found))

    async def ListDeployments(self, request, context):
        rows, token = await self.deployments.list_page(
            tenant_of(context), request.page_size, request.page_token
        )
        return inference_pb2.ListDeploymentsResponse(
            deployments=[deployment_message(row) for row in rows], next_page_token=token
        )

    async def UpdateDeployment(self, request, context):
        updated = await self.deployments.update(
            tenant_of(context), spec_of(request.deployment), request.update_mask.paths
        )
        return inference_pb2.UpdateDeploymentResponse(deployment=deployment_message(updated))

    async def DeleteDeployment(self, request, context):
        await self.deployments.delete(tenant_of(context), request.name)
        return inference_pb2.DeleteDeploymentResponse()

    async def StartCanary(self, request, context):
        updated = await self.deployments.rollouts.start_canary(
            tenant_of(context), request.name, request.version, request.weight_percent, request.max_error_rate
        )
        return inference_pb2.StartCanaryResponse(deployment=deployment_message(updated))

    async def PromoteCanary(self, request, context):
        promoted = await self.deployments.rollouts.promote_canary(tenant_of(context), request.name)
        return inference_pb2.PromoteCanaryResponse(deployment=deployment_message(promoted))

    async def RollbackCanary(self, request, context):
        updated = await self.deployments.rollouts.rollback_canary(tenant_of(context), request.name)
        return inference_pb2.RollbackCanaryResponse(deployment=deployment_message(updated))

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


class RoutingServicer(inference_pb2_grpc.RoutingServiceServicer):
    """Internal: every tenant's routes, for the gateway's direct path to Triton."""

    def __init__(self, deployments: Deployments) -> None:
        self.deployments = deployments

    async def WatchRoutes(self, request, context) -> AsyncIterator[inference_pb2.WatchRoutesResponse]:
        address = self.deployments.triton_address
        async for routes in self.deployments.routes.watch():
            yield inference_pb2.WatchRoutesResponse(
                routes=[route_message(route, address) for route in routes]
            )
