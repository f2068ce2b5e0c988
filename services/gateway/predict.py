"""maas.inference.v1.InferenceService/Predict served by the gateway itself: route lookup,
validation against the signature, the request cache for cacheable deployments, then one
direct ModelInfer to Triton. Until the route stream has delivered a table, Predict goes
through the inference service instead."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError
from maas.inference.v1 import inference_pb2

from services.common.errors import InvalidArgument
from services.common.interceptors import REQUEST_ID_KEY
from services.common.logs import request_id_var
from services.common.oip import headers_of_predict, infer_request_of_predict, predict_response_of_infer
from services.common.serving import MODEL_VERSION_KEY, TENSOR_TASKS, check_task, task_of_route
from services.common.validation import check_name
from services.gateway.auth import current_caller
from services.gateway.cache import ResponseCache, may_use_cache, predict_key
from services.gateway.monitoring_log import PredictionLog
from services.gateway.proxy import Proxy
from services.gateway.routes import RouteTable
from services.gateway.usage import REQUESTS, UNKNOWN_TIER, Meter

SERVICE = "maas.inference.v1.InferenceService"
PREDICT_PATH = f"/{SERVICE}/Predict"


class PredictHandler:
    def __init__(
        self, routes: RouteTable, proxy: Proxy, cache: ResponseCache, meter: Meter, predictions: PredictionLog
    ) -> None:
        self.routes = routes
        self.proxy = proxy
        self.cache = cache
        self.meter = meter
        self.predictions = predictions

    async def predict(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        caller = current_caller()
        try:
            response, cache_hit, tier = await self._predict(caller.tenant, request, context)
        except Exception:
            self.meter.add(caller.tenant, caller.key_id, errors=1)
            raise
        self.meter.add(
            caller.tenant,
            caller.key_id,
            cache_hits=cache_hit,
            input_bytes=len(request),
            output_bytes=len(response),
        )
        self.meter.bill(caller.tenant, REQUESTS, tier)
        return response

    async def _predict(
        self, tenant: str, request: bytes, context: grpc.aio.ServicerContext
    ) -> tuple[bytes, int, str]:
        """The answer, whether the cache gave it, and the price tier of the version that did."""
        # Raw bytes in and out, so that the fallback forwards the request untouched.
        try:
            message = inference_pb2.PredictRequest.FromString(request)
        except DecodeError:
            raise InvalidArgument("the request is not a valid maas.inference.v1.PredictRequest") from None
        name = check_name("deployment", message.deployment)
        if not self.routes.synced and self.routes.get(tenant, name) is None:
            return await self.proxy.forward_unary(PREDICT_PATH, request, context), 0, UNKNOWN_TIER
        live = await self.routes.wait_ready(tenant, name, context.time_remaining())
        check_task(name, task_of_route(live.route.task), TENSOR_TASKS, "Predict")
        live.signature.validate(headers_of_predict(message), message.output_names)
        target = live.target(request_id_var.get())
        cache_key = None
        if may_use_cache(
            live.route.triton_model,
            live.route.cacheable,
            target.triton_model,
            context.invocation_metadata() or (),
        ):
            cache_key = predict_key(tenant, live.route, message)
            cached = await self.cache.get(cache_key)
            if cached is not None:
                _say_version(context, target.version)
                self.predictions.offer(tenant, name, live.route.model, target.version, message, cached)
                return cached, 1, target.tier
        infer_request = infer_request_of_predict(message, target.triton_model, request_id_var.get())
        response = await self.routes.infer(live, target, infer_request, context)
        answer = predict_response_of_infer(response, live.route.model, target.version).SerializeToString()
        if cache_key is not None:
            self.cache.put(cache_key, answer)
        _say_version(context, target.version)
        self.predictions.offer(tenant, name, live.route.model, target.version, message, answer)
        return answer, 0, target.tier


def _say_version(context: grpc.aio.ServicerContext, version: int) -> None:
    """The version that answered, and the request id the answer was served (and logged) with:
    feedback refers to it."""
    context.set_trailing_metadata(((MODEL_VERSION_KEY, str(version)), (REQUEST_ID_KEY, request_id_var.get())))


def add_to_server(handler: PredictHandler, server: grpc.aio.Server) -> None:
    """Mount Predict alone; the proxy serves the rest of InferenceService."""
    method = grpc.unary_unary_rpc_method_handler(handler.predict)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Predict": method}),))
