"""maas.inference.v1.InferenceService/Predict served by the gateway itself: route lookup,
validation against the signature, then one direct ModelInfer to Triton. Until the route
stream has delivered a table, Predict goes through the inference service instead."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from maas.inference.v1 import inference_pb2
from services.common.errors import InvalidArgument
from services.common.logs import request_id_var
from services.common.oip import headers_of_predict, infer_request_of_predict, predict_response_of_infer
from services.common.validation import check_name
from services.gateway.auth import current_caller
from services.gateway.proxy import Proxy
from services.gateway.routes import RouteTable, infer

SERVICE = "maas.inference.v1.InferenceService"
PREDICT_PATH = f"/{SERVICE}/Predict"


class PredictHandler:
    def __init__(self, routes: RouteTable, proxy: Proxy) -> None:
        self.routes = routes
        self.proxy = proxy

    async def predict(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        # Raw bytes in and out, so that the fallback forwards the request untouched.
        try:
            message = inference_pb2.PredictRequest.FromString(request)
        except DecodeError:
            raise InvalidArgument("the request is not a valid maas.inference.v1.PredictRequest") from None
        tenant = current_caller().tenant
        name = check_name("deployment", message.deployment)
        if not self.routes.synced and self.routes.get(tenant, name) is None:
            return await self.proxy.forward_unary(PREDICT_PATH, request, context)
        live = self.routes.find_ready(tenant, name)
        live.signature.validate(headers_of_predict(message), message.output_names)
        infer_request = infer_request_of_predict(message, live.route.triton_model, request_id_var.get())
        response = await infer(live, infer_request, context, self.routes.default_timeout)
        return predict_response_of_infer(response, live.route.model, live.route.version).SerializeToString()


def add_to_server(handler: PredictHandler, server: grpc.aio.Server) -> None:
    """Mount Predict alone; the proxy serves the rest of InferenceService."""
    method = grpc.unary_unary_rpc_method_handler(handler.predict)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Predict": method}),))
