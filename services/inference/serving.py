"""The inference service's own data path (Predict, Embed, Generate for internal callers): the
route, a cold-start wait within the caller's deadline, the canary's share, one Triton call, and
errors that name the deployment, never Triton's internal model or the paths on this host."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path

from maas.inference.v1 import inference_pb2
from tritonclient.grpc import service_pb2

from services.common.embedding import EmbeddingModel, check_texts
from services.common.errors import MaasError, Unavailable, not_found
from services.common.generation import (
    generate_response_of_stream,
    prompt_of_generate,
    sampling_of_generate,
    stream_request,
)
from services.common.logs import request_id_var
from services.common.oip import headers_of_predict, infer_request_of_predict, predict_response_of_infer
from services.common.serving import EMBED, GENERATE, TENSOR_TASKS, check_task
from services.common.traffic import goes_to_canary
from services.common.validation import check_name
from services.inference.nodes import NodeSet
from services.inference.routes import Route, RouteTable
from services.inference.store import SCALED_TO_ZERO
from services.inference.triton import Triton

# Triton's names for a deployment's revisions and their instances (converge.triton_model_name):
# internal, so messages a caller reads name the deployment instead.
TRITON_MODEL_NAME = re.compile(r"m_[0-9a-f]{32}_[0-9a-f]{8}(?:_\d+)*")


def public_message(message: str, deployment_name: str, repository_roots: Iterable[Path]) -> str:
    """`message` as a caller may read it: Triton's model names and the model repositories' paths
    on this host replaced by the deployment's name."""
    for root in repository_roots:
        message = message.replace(str(root), "<models>")
    return TRITON_MODEL_NAME.sub(deployment_name, message)


class Serving:
    def __init__(
        self,
        routes: RouteTable,
        nodes: NodeSet,
        predict_timeout: float,
        cold_start_wait: float,
        wake: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self.routes = routes
        self.nodes = nodes
        # Called when a request finds its deployment scaled to zero.
        self.wake = wake
        # Upper bound of a call that carries no deadline of its own.
        self.predict_timeout = predict_timeout
        # How long a call without a deadline of its own waits for a loading deployment.
        self.cold_start_wait = cold_start_wait

    async def predict(
        self, tenant: str, request: inference_pb2.PredictRequest, timeout: float | None = None
    ) -> inference_pb2.PredictResponse:
        route = await self._route(tenant, request.deployment, timeout)
        serving, compiled = route.serving, route.compiled
        assert serving is not None and compiled is not None  # _route returns only then
        check_task(request.deployment, serving.task, TENSOR_TASKS, "Predict")
        compiled.validate(headers_of_predict(request), request.output_names)
        triton_model, version = _target(route)
        infer = infer_request_of_predict(request, triton_model, request_id_var.get())
        with self._public_errors(request.deployment):
            response = await self._infer(route, infer, self._budget(timeout))
        return predict_response_of_infer(response, serving.model, version)

    async def embed(
        self, tenant: str, request: inference_pb2.EmbedRequest, timeout: float | None = None
    ) -> inference_pb2.EmbedResponse:
        texts = check_texts(request.texts)
        route = await self._route(tenant, request.deployment, timeout)
        serving = route.serving
        assert serving is not None  # _route returns only then
        check_task(request.deployment, serving.task, (EMBED,), "Embed")
        model = EmbeddingModel.of(request.deployment, serving.signature)
        triton_model, version = _target(route)
        requests = model.requests(texts, triton_model, serving.max_batch_size, request_id_var.get())
        budget = self._budget(timeout)
        with self._public_errors(request.deployment):
            answers = await asyncio.gather(*(self._infer(route, r, budget) for r in requests))
        return model.response(answers, serving.model, version)

    async def generate(
        self, tenant: str, request: inference_pb2.GenerateRequest, timeout: float | None = None
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Text from a generation deployment, one message per token; leaving the iteration
        early (a cancelled caller) cancels the Triton stream."""
        (prompt, chat), sampling = prompt_of_generate(request), sampling_of_generate(request)
        route = await self._route(tenant, request.deployment, timeout)
        serving = route.serving
        assert serving is not None  # _route returns only then
        check_task(request.deployment, serving.task, (GENERATE,), "Generate")
        triton_model, version = _target(route)
        infer = stream_request(prompt, sampling, triton_model, request_id_var.get(), chat)
        triton = self._client(self._replica(route, triton_model))
        with self._public_errors(request.deployment):
            async for response in triton.stream(infer, self._budget(timeout)):
                yield generate_response_of_stream(response, serving.model, version)

    async def _route(self, tenant: str, name: str, timeout: float | None) -> Route:
        """The deployment's route once it serves (waiting out a cold start), or NOT_FOUND."""
        route = self.routes.get(tenant, name)
        if route is None:
            check_name("deployment", name)
            raise not_found("deployment", name, self.routes.names(tenant))
        if route.ready:
            return route
        if self.wake is not None and route.deployment.state == SCALED_TO_ZERO:
            await self.wake(tenant, name)
        # Give up a little before the caller's deadline, so that it hears why.
        wait = timeout - min(0.1, timeout / 10) if timeout is not None else self.cold_start_wait
        return await self.routes.serving(tenant, name, wait)

    async def _infer(
        self, route: Route, request: service_pb2.ModelInferRequest, timeout: float
    ) -> service_pb2.ModelInferResponse:
        """One ModelInfer on a replica; retried once on another when the first is unavailable
        (its node died, or the model is unloading there)."""
        first = self._replica(route, request.model_name)
        try:
            return await self._client(first).infer(request, timeout)
        except Unavailable:
            others = [n for n in route.ready_nodes(request.model_name) if n != first]
            if not others:
                raise
            return await self._client(random.choice(others)).infer(request, timeout)

    def _replica(self, route: Route, triton_model: str) -> str:
        """The node of one ready replica of the model, picked at random."""
        ready = route.ready_nodes(triton_model)
        if not ready:
            raise Unavailable(f"deployment {route.deployment.name!r} has no ready replica right now; retry shortly")
        return random.choice(ready)

    def _client(self, node: str) -> Triton:
        return self.nodes.named(node).triton

    def _budget(self, timeout: float | None) -> float:
        return timeout if timeout is not None else self.predict_timeout

    @contextlib.contextmanager
    def _public_errors(self, deployment_name: str) -> Iterator[None]:
        try:
            yield
        except MaasError as error:
            roots = [node.repository.root for node in self.nodes]
            public = public_message(str(error), deployment_name, roots)
            if public == str(error):
                raise
            renamed = type(error)(public)
            renamed.trailing_metadata = error.trailing_metadata
            raise renamed from None


def _target(route: Route) -> tuple[str, int]:
    """The Triton model and version of this request: the canary's for its share of requests."""
    canary, serving = route.canary, route.serving
    assert serving is not None
    if canary is not None and goes_to_canary(request_id_var.get(), canary.weight):
        return canary.triton_model, canary.version
    return serving.triton_model, serving.resolved_version
