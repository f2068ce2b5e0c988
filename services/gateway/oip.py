"""The standard Open Inference Protocol (inference.GRPCInferenceService) on the gateway, so
that stock tritonclient works against it. Model names are deployment names in the caller's
tenant; inference goes straight to the deployment's Triton: ModelInfer for tensor models,
ModelStreamInfer (tritonclient's start_stream / async_stream_infer) for text generation."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from maas.common.v1 import common_pb2
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from services.common.errors import InvalidArgument, MaasError, NotFound
from services.common.generation import generate_response_of_stream, generation_of_infer, streamed_tokens
from services.common.interceptors import REQUEST_ID_KEY
from services.common.logs import request_id_var
from services.common.oip import headers_of_infer
from services.common.serving import TENSOR_TASKS, check_task, task_of_route
from services.common.tensors import BY_PROTO
from services.gateway.auth import Caller, current_caller
from services.gateway.cache import ResponseCache, infer_key, may_use_cache
from services.gateway.generate import Generation, TokenAccount, error_response
from services.gateway.monitoring_log import PredictionLog
from services.gateway.routes import LiveRoute, RouteTable
from services.gateway.usage import REQUESTS, Meter

SERVER_NAME = "maas-gateway"
SERVICE = "inference.GRPCInferenceService"
PLATFORM = "maas"
BATCH_DIM = -1


class OipServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        routes: RouteTable,
        cache: ResponseCache,
        meter: Meter,
        generation: Generation,
        predictions: PredictionLog,
    ) -> None:
        self.routes = routes
        self.cache = cache
        self.meter = meter
        self.generation = generation
        self.predictions = predictions

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        # Ready once the gateway knows where the deployments are served.
        return service_pb2.ServerReadyResponse(ready=self.routes.synced)

    async def ServerMetadata(self, request, context):
        version = importlib.metadata.version("maas")
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=version)

    async def ModelReady(self, request, context):
        live = self.routes.get(current_caller().tenant, request.name)
        ready = live is not None and live.serving and request.version in ("", str(live.route.version))
        return service_pb2.ModelReadyResponse(ready=ready)

    async def ModelMetadata(self, request, context):
        live = self._find(request.name, request.version)
        return service_pb2.ModelMetadataResponse(
            name=request.name,
            versions=[str(live.route.version)],
            platform=PLATFORM,
            inputs=_tensor_metadata(live.route.signature.inputs),
            outputs=_tensor_metadata(live.route.signature.outputs),
        )

    async def ModelConfig(self, request, context):
        # Enough of Triton's model config for tools such as perf_analyzer to shape their requests.
        live = self._find(request.name, request.version)
        config = model_config_pb2.ModelConfig(
            name=request.name, platform=PLATFORM, max_batch_size=live.route.max_batch_size
        )
        # With batching on, Triton's dims leave out the batch dimension, as a signature does.
        batch = [] if live.route.max_batch_size > 0 else [BATCH_DIM]
        for spec in live.route.signature.inputs:
            config.input.add(name=spec.name, data_type=_config_type(spec), dims=[*batch, *spec.shape])
        for spec in live.route.signature.outputs:
            config.output.add(name=spec.name, data_type=_config_type(spec), dims=[*batch, *spec.shape])
        return service_pb2.ModelConfigResponse(config=config)

    async def ModelInfer(self, request, context):
        caller = current_caller()
        try:
            response, cache_hit, tier = await self._infer(caller.tenant, request, context)
        except Exception:
            self.meter.add(caller.tenant, caller.key_id, errors=1)
            raise
        self.meter.add(
            caller.tenant,
            caller.key_id,
            cache_hits=cache_hit,
            input_bytes=request.ByteSize(),
            output_bytes=response.ByteSize(),
        )
        self.meter.bill(caller.tenant, REQUESTS, tier)
        return response

    async def _infer(
        self, tenant: str, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> tuple[service_pb2.ModelInferResponse, int, str]:
        """The answer, whether the cache gave it, and the price tier of the version that did."""
        deployment = request.model_name
        live = await self.routes.wait_ready(tenant, deployment, context.time_remaining())
        _check_version(live, request.model_version)
        check_task(deployment, task_of_route(live.route.task), TENSOR_TASKS, "ModelInfer")
        _refuse_shared_memory(request)
        live.signature.validate(headers_of_infer(request), [output.name for output in request.outputs])
        target = live.target(request_id_var.get())
        cache_key = None
        if may_use_cache(
            live.route.triton_model,
            live.route.cacheable,
            target.triton_model,
            context.invocation_metadata() or (),
        ):
            cache_key = infer_key(tenant, live.route, request)
            cached = await self.cache.get(cache_key)
            if cached is not None:
                response = service_pb2.ModelInferResponse.FromString(cached)
                response.id = request.id
                self._answered(context, tenant, live, target.version, request, response)
                return response, 1, target.tier
        request.model_name = target.triton_model
        request.model_version = ""
        response = await self.routes.infer(live, target, request, context)
        response.model_name = deployment
        response.model_version = str(target.version)
        if cache_key is not None:
            # Stored without the caller's request id; a hit answers with its own.
            request_id, response.id = response.id, ""
            self.cache.put(cache_key, response.SerializeToString())
            response.id = request_id
        self._answered(context, tenant, live, target.version, request, response)
        return response, 0, target.tier

    def _answered(
        self,
        context: grpc.aio.ServicerContext,
        tenant: str,
        live: LiveRoute,
        version: int,
        request: service_pb2.ModelInferRequest,
        response: service_pb2.ModelInferResponse,
    ) -> None:
        """The request id the answer was served (and logged) with, for the caller's feedback."""
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id_var.get()),))
        self.predictions.offer(tenant, live.route.deployment, live.route.model, version, request, response)

    async def ModelStreamInfer(self, request_iterator, context):
        """Generation requests on one stream, served concurrently; like Triton, a refused request
        gets a response with its error_message and the stream goes on."""
        caller = current_caller()
        responses: asyncio.Queue[service_pb2.ModelStreamInferResponse | None] = asyncio.Queue()

        async def serve(request: service_pb2.ModelInferRequest) -> None:
            try:
                async for response in self._stream_one(caller, request, context):
                    responses.put_nowait(response)
            except MaasError as error:
                responses.put_nowait(error_response(request, error))

        async def read_all() -> None:
            async with asyncio.TaskGroup() as group:
                async for request in request_iterator:
                    group.create_task(serve(request))

        reader = asyncio.create_task(read_all())
        reader.add_done_callback(lambda _: responses.put_nowait(None))
        try:
            while (response := await responses.get()) is not None:
                yield response
            await reader  # raises what went wrong reading or serving, if anything did
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _stream_one(
        self, caller: Caller, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        deployment = request.model_name
        prompt, sampling = generation_of_infer(request)
        live, target = await self.generation.route(caller, deployment, context, "ModelStreamInfer")
        _check_version(live, request.model_version)
        # Forwarded as sent (its id and Triton's own parameters kept), to the version's Triton model.
        request.model_name, request.model_version = target.triton_model, ""
        async with self.generation.budget(caller, TokenAccount(prompt, sampling), target.tier, context) as account:
            async for response in self.routes.stream(live, target, request, context):
                if response.error_message:
                    account.billable = False  # the model refused or failed it, in the stream
                else:
                    message = generate_response_of_stream(response, deployment, target.version)
                    account.saw(message, streamed_tokens(response))
                response.infer_response.model_name = deployment
                response.infer_response.model_version = str(target.version)
                yield response

    def _find(self, deployment: str, version: str) -> LiveRoute:
        live = self.routes.find(current_caller().tenant, deployment)
        _check_version(live, version)
        return live


def _check_version(live: LiveRoute, version: str) -> None:
    if version not in ("", str(live.route.version)):
        raise NotFound(
            f"deployment {live.route.deployment!r} serves version {live.route.version}, "
            f"not {version[:20]!r}; leave the model version empty"
        )


def _refuse_shared_memory(request: service_pb2.ModelInferRequest) -> None:
    # Regions live on the Triton host, which callers of the gateway do not share.
    for tensor in (*request.inputs, *request.outputs):
        if "shared_memory_region" in tensor.parameters:
            raise InvalidArgument(
                f"tensor {tensor.name[:80]!r} refers to a shared memory region; shared memory is not "
                "available through the gateway: send the data in the request"
            )


def _tensor_metadata(
    specs: Iterable[common_pb2.TensorSpec],
) -> list[service_pb2.ModelMetadataResponse.TensorMetadata]:
    return [
        service_pb2.ModelMetadataResponse.TensorMetadata(
            name=spec.name, datatype=BY_PROTO[spec.datatype].triton, shape=[BATCH_DIM, *spec.shape]
        )
        for spec in specs
    ]


def _config_type(spec: common_pb2.TensorSpec) -> int:
    return model_config_pb2.DataType.Value(BY_PROTO[spec.datatype].config)


def _not_exposed(name: str, streaming: bool) -> Callable[..., Any]:
    message = (
        f"{name} is not exposed through the gateway: it serves health, metadata, config and ModelInfer; "
        "model repository control, shared memory, statistics, trace and log settings stay internal"
    )
    if streaming:

        async def refuse_stream(self: Any, requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
            yield  # unreachable; makes this an async generator, as the interceptor requires

        return refuse_stream

    async def refuse(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return refuse


# Every other method of the service answers UNIMPLEMENTED, including ones a newer protocol adds.
for _method in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
    if _method.name not in vars(OipServicer):
        setattr(OipServicer, _method.name, _not_exposed(_method.name, _method.server_streaming))
