"""Text generation on the gateway: maas.inference.v1.InferenceService/Generate and the Open
Inference Protocol's ModelStreamInfer, both streamed straight from the deployment's Triton
(a decoupled model) after auth, validation and a token reservation.

Tokens: before the call the prompt's UTF-8 length plus max_tokens are reserved against the tenant's
token limits and quotas; afterwards the reservation is settled to what was used (the counts of
the last response, or, when the client cancels or its deadline passes, the prompt plus the tokens
streamed so far) and metered. Cancelling the client's call cancels the Triton stream, and the
runner stops at the next token.

Billing: a generation that finished, or that the caller cancelled or whose deadline ended it, bills
one request, its prompt tokens (input) and the tokens streamed (output), under the price tier of
the version that answered. One refused before it reached the model (validation, limits, a
deployment not serving), or that failed in the model or on its way back, bills nothing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from maas.inference.v1 import inference_pb2
from tritonclient.grpc import service_pb2

from services.common.errors import MaasError
from services.common.generation import (
    Sampling,
    generate_response_of_stream,
    is_final,
    prompt_of_generate,
    sampling_of_generate,
    stream_request,
    streamed_tokens,
)
from services.common.logs import request_id_var
from services.common.serving import GENERATE, MODEL_VERSION_KEY, check_task, task_of_route
from services.common.validation import check_name
from services.gateway.admission import Admission
from services.gateway.audit import outcome
from services.gateway.auth import Caller, current_caller
from services.gateway.routes import LiveRoute, RouteTable, Target
from services.gateway.usage import INPUT_TOKENS, OUTPUT_TOKENS, REQUESTS, Meter

log = logging.getLogger(__name__)

SERVICE = "maas.inference.v1.InferenceService"
GENERATE_PATH = f"/{SERVICE}/Generate"


class TokenAccount:
    """One generation's tokens: what was reserved, and what the stream shows was used."""

    def __init__(self, prompt: str, sampling: Sampling) -> None:
        # A token is at least one byte (a character model's token is one character), so the
        # prompt's UTF-8 length bounds its tokens. A conversation's prompt is its JSON list, whose
        # syntax (some 30 bytes a message) bounds what the chat template adds around each message.
        prompt_bytes = len(prompt.encode())
        self.reserved = prompt_bytes + sampling.max_tokens
        # Until a response counts them: the bound (a generation cut short before is billed so).
        self.prompt_tokens = prompt_bytes
        self.completion_tokens = 0
        self.finished = False
        # False once the generation failed (in the model or on its way back): it is not billed.
        self.billable = True

    def saw(self, message: inference_pb2.GenerateResponse, tokens: int) -> None:
        """A streamed message, holding `tokens` tokens of text."""
        if is_final(message):
            self.prompt_tokens, self.completion_tokens = message.prompt_tokens, message.completion_tokens
            self.finished = True
            return
        if message.prompt_tokens:  # counted by a runner that sends it early
            self.prompt_tokens = message.prompt_tokens
        self.completion_tokens += tokens

    @property
    def used(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Generation:
    """What Generate and ModelStreamInfer share: the route and the token budget."""

    def __init__(self, routes: RouteTable, admission: Admission, meter: Meter) -> None:
        self.routes = routes
        self.admission = admission
        self.meter = meter

    async def route(
        self, caller: Caller, deployment: str, context: grpc.aio.ServicerContext, call: str
    ) -> tuple[LiveRoute, Target]:
        name = check_name("deployment", deployment)
        live = await self.routes.wait_ready(caller.tenant, name, context.time_remaining())
        check_task(name, task_of_route(live.route.task), (GENERATE,), call)
        return live, live.target(request_id_var.get())

    @contextlib.asynccontextmanager
    async def budget(
        self, caller: Caller, account: TokenAccount, tier: str, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[TokenAccount]:
        """Reserve the account's tokens, then settle and meter what was used, however it ends
        (finished, failed, cancelled by the client, past its deadline), and bill it under `tier`
        unless it failed."""
        await self.admission.reserve_tokens(caller.tenant, caller.key_id, caller.rate_limit, account.reserved)
        failed = False
        try:
            yield account
        except asyncio.CancelledError:
            raise
        except Exception as error:
            failed = True
            # The caller's own deadline ending the stream is the caller's doing, as a cancel is.
            account.billable = account.billable and _past_callers_deadline(error, context)
            raise
        finally:
            if account.billable:  # before the await below, which a second cancel may interrupt
                self.meter.bill(caller.tenant, REQUESTS, tier)
                self.meter.bill(caller.tenant, INPUT_TOKENS, tier, account.prompt_tokens)
                self.meter.bill(caller.tenant, OUTPUT_TOKENS, tier, account.completion_tokens)
            # Shielded: a cancelled call must still settle, or its reservation would stay counted.
            await asyncio.shield(
                self.admission.settle_tokens(
                    caller.tenant, caller.key_id, caller.rate_limit, account.reserved, account.used
                )
            )
            if failed:
                self.meter.add(caller.tenant, caller.key_id, errors=1)


class GenerateHandler:
    """InferenceService/Generate."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation

    async def generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        caller = current_caller()
        (prompt, chat), sampling = prompt_of_generate(request), sampling_of_generate(request)
        live, target = await self.generation.route(caller, request.deployment, context, "Generate")
        context.set_trailing_metadata(((MODEL_VERSION_KEY, str(target.version)),))
        triton_request = stream_request(prompt, sampling, target.triton_model, request_id_var.get(), chat)
        async with self.generation.budget(caller, TokenAccount(prompt, sampling), target.tier, context) as account:
            async for response in self.generation.routes.stream(live, target, triton_request, context):
                message = generate_response_of_stream(response, live.route.model, target.version)
                account.saw(message, streamed_tokens(response))
                yield message


def add_to_server(handler: GenerateHandler, server: grpc.aio.Server) -> None:
    """Mount Generate alone; Predict and the proxy serve the rest of InferenceService."""
    method = grpc.unary_stream_rpc_method_handler(
        handler.generate,
        request_deserializer=inference_pb2.GenerateRequest.FromString,
        response_serializer=inference_pb2.GenerateResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Generate": method}),))


def _past_callers_deadline(error: Exception, context: grpc.aio.ServicerContext) -> bool:
    """Whether the call ended DEADLINE_EXCEEDED by a deadline the caller set (without one, the
    gateway's own timeout ended it: a failure)."""
    return context.time_remaining() is not None and outcome(error, context) == "DEADLINE_EXCEEDED"


def error_response(request: service_pb2.ModelInferRequest, error: MaasError) -> service_pb2.ModelStreamInferResponse:
    """A refused request inside an Open Inference Protocol stream, as Triton reports one."""
    response = service_pb2.ModelStreamInferResponse(error_message=str(error))
    response.infer_response.id = request.id
    response.infer_response.model_name = request.model_name
    return response
