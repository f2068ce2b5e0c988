"""The trainer's calls to the inference service, each on behalf of a retraining run's tenant:
which version a deployment serves, and its canaries (retrain.RetrainInference)."""

from __future__ import annotations

import grpc
from maas.inference.v1 import inference_pb2, inference_pb2_grpc

from services.common.channels import internal_metadata
from services.common.remote_errors import domain_error
from services.trainer.retrain import DeploymentInfo

STATES = {
    inference_pb2.DEPLOYMENT_STATE_LOADING: "LOADING",
    inference_pb2.DEPLOYMENT_STATE_READY: "READY",
    inference_pb2.DEPLOYMENT_STATE_FAILED: "FAILED",
}


class InferenceLink:
    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self._stub = inference_pb2_grpc.InferenceServiceStub(channel)
        self._token = token

    async def get_deployment(self, tenant: str, name: str) -> DeploymentInfo:
        request = inference_pb2.GetDeploymentRequest(name=name)
        try:
            found = (await self._stub.GetDeployment(request, metadata=internal_metadata(self._token, tenant))).deployment
        except grpc.aio.AioRpcError as error:
            raise domain_error("inference", error) from None
        canary = found.canary if found.HasField("canary") else None
        return DeploymentInfo(
            name=found.name,
            model=found.model,
            resolved_version=found.resolved_version,
            alias=found.alias if found.WhichOneof("target") == "alias" else "",
            canary_version=canary.version if canary else 0,
            canary_state=STATES.get(canary.state, "") if canary else "",
            canary_message=canary.message if canary else "",
            message=found.message,
        )

    async def start_canary(self, tenant: str, name: str, version: int, weight: int, max_error_rate: float) -> None:
        request = inference_pb2.StartCanaryRequest(
            name=name, version=version, weight_percent=weight, max_error_rate=max_error_rate
        )
        await self._call(self._stub.StartCanary, request, tenant)

    async def promote_canary(self, tenant: str, name: str) -> None:
        await self._call(self._stub.PromoteCanary, inference_pb2.PromoteCanaryRequest(name=name), tenant)

    async def rollback_canary(self, tenant: str, name: str) -> None:
        await self._call(self._stub.RollbackCanary, inference_pb2.RollbackCanaryRequest(name=name), tenant)

    async def _call(self, method, request, tenant: str) -> None:  # type: ignore[no-untyped-def]
        try:
            await method(request, metadata=internal_metadata(self._token, tenant))
        except grpc.aio.AioRpcError as error:
            raise domain_error("inference", error) from None
