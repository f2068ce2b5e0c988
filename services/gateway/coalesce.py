"""Coalescing: calls for the same Triton model that queue behind calls in flight go to Triton
together, as one ModelInfer with a larger batch, and each gets its own rows of the answer.

A hop that makes one Triton call per call pays gRPC's client cost per call, and Triton its
per-request cost; joined calls pay them once per batch. The first calls go out at once, with no
added wait: a lane lets `depth` calls (or batches) be in flight to the model, and only calls
arriving while that many are out wait, for the next one to return, and then go out together. A
call is joined only with calls of the same shape (inputs, their datatypes and dims past the
batch, the outputs asked for); anything else, and every failure of a joined batch, goes alone
through the normal path, so that errors, retries and deadlines stay per call."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from prometheus_client import Histogram
from tritonclient.grpc import service_pb2

Response = service_pb2.ModelInferResponse
Request = service_pb2.ModelInferRequest

JOINED = Histogram(
    "maas_gateway_coalesced_calls",
    "Calls sent to Triton together in one ModelInfer",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)


@dataclass(frozen=True)
class Lane:
    """Where a joinable call goes: its model and shape (the key), how many rows one Triton call
    may carry, how many calls may be out at once, and how to send a joined batch."""

    key: Hashable
    max_rows: int
    depth: int
    send: Callable[[Request, float], Awaitable[Response]]


@dataclass(eq=False)
class _Waiting:
    request: Request
    rows: int
    timeout: float
    # The call's own rows of the answer, or None: go alone (the joined batch failed).
    answer: asyncio.Future[Response | None]


class _Queue:
    def __init__(self) -> None:
        self.in_flight = 0
        self.waiting: deque[_Waiting] = deque()


class Coalescer:
    def __init__(self) -> None:
        self._queues: dict[Hashable, _Queue] = {}
        self._sending: set[asyncio.Task[None]] = set()

    async def infer(
        self,
        lane: Lane,
        request: Request,
        rows: int,
        timeout: float,
        alone: Callable[[], Awaitable[Response]],
    ) -> Response:
        queue = self._queues.get(lane.key)
        if queue is None:
            queue = self._queues[lane.key] = _Queue()
        if queue.in_flight < lane.depth or rows > lane.max_rows:
            queue.in_flight += 1
            try:
                return await alone()
            finally:
                queue.in_flight -= 1
                self._next(lane, queue)
        waiting = _Waiting(request, rows, timeout, asyncio.get_running_loop().create_future())
        queue.waiting.append(waiting)
        try:
            answer = await waiting.answer
        finally:
            waiting.answer.cancel()  # a call cancelled while it waits is left out of the batch
        return answer if answer is not None else await alone()

    def _next(self, lane: Lane, queue: _Queue) -> None:
        """Send what waits, as one batch, if the lane has room; forget an idle lane."""
        if queue.in_flight >= lane.depth:
            return
        batch: list[_Waiting] = []
        rows = 0
        while queue.waiting:
            if queue.waiting[0].answer.done():  # cancelled while it waited
                queue.waiting.popleft()
            elif rows + queue.waiting[0].rows <= lane.max_rows:
                waiting = queue.waiting.popleft()
                batch.append(waiting)
                rows += waiting.rows
            else:
                break
        if not batch:
            if not queue.waiting and queue.in_flight == 0:
                self._queues.pop(lane.key, None)
            return
        queue.in_flight += 1
        task = asyncio.create_task(self._send(lane, queue, batch), name="coalesced-infer")
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, lane: Lane, queue: _Queue, batch: list[_Waiting]) -> None:
        try:
            JOINED.observe(len(batch))
            if len(batch) == 1:
                answers = [await lane.send(batch[0].request, batch[0].timeout)]
            else:
                response = await lane.send(merge(batch), max(w.timeout for w in batch))
                answers = split(response, [w.rows for w in batch])
            for waiting, answer in zip(batch, answers, strict=True):
                answer.id = waiting.request.id
                if not waiting.answer.done():
                    waiting.answer.set_result(answer)
        except Exception:  # noqa: BLE001 - each call goes alone, and hears its own error there
            for waiting in batch:
                if not waiting.answer.done():
                    waiting.answer.set_result(None)
        finally:
            queue.in_flight -= 1
            self._next(lane, queue)

    async def close(self) -> None:
        for task in list(self._sending):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def join_key(triton_model: str, request: Request) -> tuple[Hashable, int] | None:
    """(the lane key, the call's rows) of a call that may be joined with others of the same key;
    None for one that must go alone: typed (not raw) contents, BYTES tensors, parameters that
    may change how Triton runs it (sequences, priorities, shared memory), inputs that disagree
    on the batch size."""
    inputs = request.inputs
    if not inputs or request.parameters or len(request.raw_input_contents) != len(inputs):
        return None
    rows = inputs[0].shape[0] if inputs[0].shape else 0
    if rows < 1:
        return None
    shapes = []
    for tensor in inputs:
        if tensor.datatype == "BYTES" or tensor.parameters or not tensor.shape or tensor.shape[0] != rows:
            return None
        shapes.append((tensor.name, tensor.datatype, tuple(tensor.shape[1:])))
    outputs = []
    for output in request.outputs:
        if output.parameters:
            return None
        outputs.append(output.name)
    return (triton_model, tuple(shapes), tuple(outputs)), rows


def merge(batch: list[_Waiting]) -> Request:
    """One request carrying every call's rows, in order."""
    first = batch[0].request
    merged = Request(model_name=first.model_name)
    total = sum(w.rows for w in batch)
    for index, tensor in enumerate(first.inputs):
        merged.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=[total, *tensor.shape[1:]])
        merged.raw_input_contents.append(b"".join(w.request.raw_input_contents[index] for w in batch))
    merged.outputs.extend(first.outputs)
    return merged


def split(response: Response, rows: list[int]) -> list[Response]:
    """Each call's rows of a joined answer; ValueError when the answer cannot be cut by rows
    (an output without the batch dimension, or without raw contents)."""
    total = sum(rows)
    if len(response.raw_output_contents) != len(response.outputs):
        raise ValueError("an output came without raw contents")
    parts = [Response(model_name=response.model_name, model_version=response.model_version) for _ in rows]
    for part in parts:
        for name, value in response.parameters.items():
            part.parameters[name].CopyFrom(value)
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if not tensor.shape or tensor.shape[0] != total or len(raw) % total:
            raise ValueError(f"output {tensor.name!r} cannot be split by rows")
        row_bytes = len(raw) // total
        offset = 0
        for part, count in zip(parts, rows, strict=True):
            part.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=[count, *tensor.shape[1:]])
            part.raw_output_contents.append(raw[offset * row_bytes : (offset + count) * row_bytes])
            offset += count
    return parts
