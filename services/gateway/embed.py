"""maas.inference.v1.InferenceService/Embed served by the gateway itself: route lookup, the task and
text checks, the request cache for cacheable deployments, then ModelInfer straight to Triton (several
at once when the texts outnumber the deployment's max_batch_size). Until the route stream has
delivered a table, Embed goes through the inference service instead.

Usage: the tokens the model read (prompt tokens) are metered, and billed as embedding tokens, when
Triton computed the answer; a cache hit counts (and is billed) as a request, not as tokens."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf.message import DecodeError
from maas.inference.v1 import inference_pb2

from services.common.embedding import EmbeddingModel, check_texts
from services.common.errors import InvalidArgument
from services.common.logs import request_id_var
from services.common.serving import EMBED, MODEL_VERSION_KEY, TASK_NAMES, check_task
from services.common.validation import check_name
from services.gateway.auth import current_caller
from services.gateway.cache import ResponseCache, embed_key, may_use_cache
from services.gateway.predict import SERVICE
from services.gateway.proxy import Proxy
from services.gateway.routes import RouteTable
from services.gateway.usage import EMBEDDING_TOKENS, REQUESTS, UNKNOWN_TIER, Meter

EMBED_PATH = f"/{SERVICE}/Embed"


class EmbedHandler:
    def __init__(self, routes: RouteTable, proxy: Proxy, cache: ResponseCache, meter: Meter) -> None:
        self.routes = routes
        self.proxy = proxy
        self.cache = cache
        self.meter = meter

    async def embed(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        caller = current_caller()
        try:
            response, cache_hit, tokens, tier = await self._embed(caller.tenant, request, context)
        except Exception:
            self.meter.add(caller.tenant, caller.key_id, errors=1)
            raise
        self.meter.add(
            caller.tenant,
            caller.key_id,
            cache_hits=cache_hit,
            tokens=tokens,
            input_bytes=len(request),
            output_bytes=len(response),
        )
        self.meter.bill(caller.tenant, REQUESTS, tier)
        self.meter.bill(caller.tenant, EMBEDDING_TOKENS, tier, tokens)
        return response

    async def _embed(
        self, tenant: str, request: bytes, context: grpc.aio.ServicerContext
    ) -> tuple[bytes, int, int, str]:
        """The answer, whether the cache gave it, the tokens the model read, and the price tier of
        the version that answered."""
        # Raw bytes in and out, so that the fallback forwards the request untouched.
        try:
            message = inference_pb2.EmbedRequest.FromString(request)
        except DecodeError:
            raise InvalidArgument("the request is not a valid maas.inference.v1.EmbedRequest") from None
        name = check_name("deployment", message.deployment)
        texts = check_texts(message.texts)
        if not self.routes.synced and self.routes.get(tenant, name) is None:
            answer = await self.proxy.forward_unary(EMBED_PATH, request, context)
            return answer, 0, inference_pb2.EmbedResponse.FromString(answer).prompt_tokens, UNKNOWN_TIER
        live = await self.routes.wait_ready(tenant, name, context.time_remaining())
        check_task(name, TASK_NAMES.get(live.route.task, ""), (EMBED,), "Embed")
        model = EmbeddingModel.of(name, live.route.signature)
        target = live.target(request_id_var.get())
        context.set_trailing_metadata(((MODEL_VERSION_KEY, str(target.version)),))
        cache_key = None
        if may_use_cache(
            live.route.triton_model,
            live.route.cacheable,
            target.triton_model,
            context.invocation_metadata() or (),
        ):
            cache_key = embed_key(tenant, live.route, texts)
            cached = await self.cache.get(cache_key)
            if cached is not None:
                return cached, 1, 0, target.tier
        requests = model.requests(texts, target.triton_model, live.route.max_batch_size, request_id_var.get())
        answers = await asyncio.gather(*(self.routes.infer(live, target, r, context) for r in requests))
        response = model.response(answers, live.route.model, target.version)
        answer = response.SerializeToString()
        if cache_key is not None:
            self.cache.put(cache_key, answer)
        return answer, 0, response.prompt_tokens, target.tier


def add_to_server(handler: EmbedHandler, server: grpc.aio.Server) -> None:
    """Mount Embed alone; Predict, Generate and the proxy serve the rest of InferenceService."""
    method = grpc.unary_unary_rpc_method_handler(handler.embed)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Embed": method}),))
