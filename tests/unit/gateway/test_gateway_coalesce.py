"""Coalescing: concurrent ModelInfer calls for the same Triton model joined into one batched
Triton call. The pure parts (join_key, merge, split), the Coalescer with fake sends (no gRPC),
and the real gateway in front of a slow fake Triton, which echoes input "x" as output "y", so
that every caller can check that the rows it got back are its own."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.gateway.coalesce import Coalescer, Lane, join_key, merge, split
from tests.unit.gateway.gateway_fakes import gateway_stack
from tests.unit.gateway.test_gateway_predict import predict_request

Request = service_pb2.ModelInferRequest
Response = service_pb2.ModelInferResponse


def infer_request(rows: int, start: float = 0.0, model: str = "m", request_id: str = "") -> Request:
    """A call of `rows` rows of two FP32 values each, every value distinct from `start` on."""
    request = Request(model_name=model, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[rows, 2])
    request.raw_input_contents.append(np.arange(start, start + rows * 2, dtype=np.float32).tobytes())
    return request


def echo(request: Request) -> Response:
    """What the fake Triton answers: input 0 back as output "y"."""
    response = Response(model_name=request.model_name, id=request.id)
    first = request.inputs[0]
    response.outputs.add(name="y", datatype=first.datatype, shape=first.shape)
    response.raw_output_contents.append(request.raw_input_contents[0])
    return response


# join_key


def test_same_shaped_calls_share_a_key_whatever_their_rows():
    two, five = join_key("m", infer_request(2)), join_key("m", infer_request(5, start=50))
    assert two is not None and five is not None
    assert two[0] == five[0] and (two[1], five[1]) == (2, 5)


def test_another_model_dims_datatype_or_outputs_make_another_key():
    key = join_key("m", infer_request(1))[0]
    assert join_key("other", infer_request(1))[0] != key
    wider = infer_request(1)
    wider.inputs[0].shape[:] = [1, 3]
    assert join_key("m", wider)[0] != key
    integers = infer_request(1)
    integers.inputs[0].datatype = "INT32"
    assert join_key("m", integers)[0] != key
    asking = infer_request(1)
    asking.outputs.add(name="y")
    assert join_key("m", asking)[0] != key


def _typed() -> Request:
    request = Request(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([1.0, 2.0])
    return request


def _bytes() -> Request:
    request = Request(model_name="m")
    request.inputs.add(name="x", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(b"\x02\x00\x00\x00hi")
    return request


def _request_parameter() -> Request:
    request = infer_request(1)
    request.parameters["priority"].int64_param = 1
    return request


def _input_parameter() -> Request:
    request = infer_request(1)
    request.inputs[0].parameters["shared_memory_region"].string_param = "region"
    return request


def _output_parameter() -> Request:
    request = infer_request(1)
    request.outputs.add(name="y").parameters["classification"].int64_param = 3
    return request


def _disagreeing_batch() -> Request:
    request = infer_request(2)
    request.inputs.add(name="z", datatype="FP32", shape=[3, 2])
    request.raw_input_contents.append(np.zeros((3, 2), np.float32).tobytes())
    return request


def _no_rows() -> Request:
    request = infer_request(1)
    request.inputs[0].shape[:] = [0, 2]
    return request


@pytest.mark.parametrize(
    "make",
    [_typed, _bytes, _request_parameter, _input_parameter, _output_parameter, _disagreeing_batch, _no_rows],
)
def test_calls_that_must_go_alone_have_no_key(make):
    assert join_key("m", make()) is None


# merge and split


def test_merge_concatenates_every_inputs_rows_in_order():
    calls = []
    for rows, start in ((1, 0), (3, 100), (2, 200)):
        request = infer_request(rows, start)
        request.inputs.add(name="z", datatype="INT64", shape=[rows])
        request.raw_input_contents.append(np.full(rows, start, np.int64).tobytes())
        request.outputs.add(name="y")
        calls.append(request)
    # merge reads only each waiting call's request and rows.
    merged = merge([SimpleNamespace(request=r, rows=r.inputs[0].shape[0]) for r in calls])
    assert merged.model_name == "m"
    assert [(t.name, t.datatype, list(t.shape)) for t in merged.inputs] == [
        ("x", "FP32", [6, 2]),
        ("z", "INT64", [6]),
    ]
    for index in range(2):
        assert merged.raw_input_contents[index] == b"".join(r.raw_input_contents[index] for r in calls)
    assert [o.name for o in merged.outputs] == ["y"]


def _joined_answer(total: int) -> tuple[Response, np.ndarray, np.ndarray]:
    y = np.arange(total * 3, dtype=np.float32).reshape(total, 3)
    z = np.arange(total, dtype=np.int64) * 10
    response = Response(model_name="m", model_version="4")
    response.parameters["sequence_end"].bool_param = True
    response.outputs.add(name="y", datatype="FP32", shape=[total, 3])
    response.outputs.add(name="z", datatype="INT64", shape=[total])
    response.raw_output_contents.extend([y.tobytes(), z.tobytes()])
    return response, y, z


def test_split_gives_each_call_its_rows_of_every_output():
    response, y, z = _joined_answer(6)
    parts = split(response, [1, 3, 2])
    assert len(parts) == 3
    offset = 0
    for part, rows in zip(parts, [1, 3, 2], strict=True):
        assert (part.model_name, part.model_version) == ("m", "4")
        assert part.parameters["sequence_end"].bool_param
        assert [(t.name, t.datatype, list(t.shape)) for t in part.outputs] == [
            ("y", "FP32", [rows, 3]),
            ("z", "INT64", [rows]),
        ]
        assert part.raw_output_contents[0] == y[offset : offset + rows].tobytes()
        assert part.raw_output_contents[1] == z[offset : offset + rows].tobytes()
        offset += rows


def _first_dim_not_the_total(response: Response) -> None:
    response.outputs[0].shape[:] = [5, 3]


def _no_batch_dim(response: Response) -> None:
    response.outputs[1].ClearField("shape")


def _no_raw_contents(response: Response) -> None:
    del response.raw_output_contents[1]


def _bytes_not_cut_by_rows(response: Response) -> None:
    response.raw_output_contents[1] += b"\0"


@pytest.mark.parametrize(
    "spoil", [_first_dim_not_the_total, _no_batch_dim, _no_raw_contents, _bytes_not_cut_by_rows]
)
def test_split_refuses_an_answer_it_cannot_cut_by_rows(spoil):
    response, _, _ = _joined_answer(6)
    spoil(response)
    with pytest.raises(ValueError):
        split(response, [1, 3, 2])


# The Coalescer, with fake sends


class FakeModel:
    """A lane's two ways to Triton, recording what took which: `send` (a joined batch) and each
    call's `alone`. Both wait for `gate`, so that a test holds calls in flight."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.sent: list[Request] = []
        self.alone_ids: list[str] = []
        self.alone_errors: dict[str, Exception] = {}  # request id -> what its alone path raises
        self.joined_answer = echo  # what Triton answers a joined batch
        self.joined_error: Exception | None = None

    async def send(self, request: Request, timeout: float) -> Response:
        self.sent.append(request)
        await self.gate.wait()
        if self.joined_error is not None:
            raise self.joined_error
        return self.joined_answer(request)

    def alone(self, request: Request):
        async def call() -> Response:
            self.alone_ids.append(request.id)
            await self.gate.wait()
            if request.id in self.alone_errors:
                raise self.alone_errors[request.id]
            return echo(request)

        return call

    def lane(self, key: str = "m", max_rows: int = 8, depth: int = 1) -> Lane:
        return Lane(key, max_rows, depth, self.send)


def start(coalescer: Coalescer, lane: Lane, model: FakeModel, request: Request) -> asyncio.Task[Response]:
    rows = request.inputs[0].shape[0]
    return asyncio.create_task(coalescer.infer(lane, request, rows, 5.0, model.alone(request)))


async def within(awaitable):
    """A call never answered fails the test instead of hanging it."""
    async with asyncio.timeout(1):
        return await awaitable


async def settle() -> None:
    # Everything is in this event loop: a few turns let every started call reach its wait.
    for _ in range(10):
        await asyncio.sleep(0)


def rows_of(request: Request) -> int:
    return request.inputs[0].shape[0]


async def test_calls_queued_behind_one_in_flight_go_out_as_one_batch_each_getting_its_rows():
    model, coalescer = FakeModel(), Coalescer()
    lane = model.lane()
    first_request = infer_request(1, request_id="first")
    first = start(coalescer, lane, model, first_request)
    await asyncio.sleep(0)  # one turn: the first call is already on its way, unwaited
    assert model.alone_ids == ["first"]

    requests = [
        infer_request(rows, start=100 * number, request_id=f"call-{number}")
        for number, rows in enumerate([1, 3, 2, 1, 1])  # 8 rows: exactly max_rows
    ]
    queued = [start(coalescer, lane, model, request) for request in requests]
    await settle()
    assert model.sent == [] and model.alone_ids == ["first"] and not any(t.done() for t in queued)

    model.gate.set()
    assert await within(first) == echo(first_request)
    answers = await within(asyncio.gather(*queued))
    (joined,) = model.sent
    assert rows_of(joined) == 8
    assert joined.raw_input_contents[0] == b"".join(r.raw_input_contents[0] for r in requests)
    assert answers == [echo(request) for request in requests]  # own rows, shape and id, in order
    assert model.alone_ids == ["first"]


async def test_a_lane_lets_depth_calls_out_before_any_waits():
    model, coalescer = FakeModel(), Coalescer()
    lane = model.lane(depth=2)
    calls = [start(coalescer, lane, model, infer_request(1, request_id=f"call-{n}")) for n in range(3)]
    await settle()
    assert model.alone_ids == ["call-0", "call-1"] and model.sent == []
    model.gate.set()
    await within(asyncio.gather(*calls))
    assert [r.id for r in model.sent] == ["call-2"]  # a batch of one goes as the call itself


async def test_a_call_cancelled_while_it_waits_is_left_out_of_the_batch():
    model, coalescer = FakeModel(), Coalescer()
    lane = model.lane()
    first = start(coalescer, lane, model, infer_request(1, request_id="first"))
    kept_a, dropped, kept_b = (infer_request(1, start=10 * n, request_id=f"call-{n}") for n in range(3))
    calls = [start(coalescer, lane, model, request) for request in (kept_a, dropped, kept_b)]
    await settle()
    calls[1].cancel()
    await settle()
    model.gate.set()
    await within(first)
    assert await within(calls[0]) == echo(kept_a) and await within(calls[2]) == echo(kept_b)
    with pytest.raises(asyncio.CancelledError):
        await calls[1]
    (joined,) = model.sent
    assert rows_of(joined) == 2
    assert joined.raw_input_contents[0] == kept_a.raw_input_contents[0] + kept_b.raw_input_contents[0]


def _failing(model: FakeModel) -> None:
    model.joined_error = RuntimeError("the batch failed")


def _unsplittable(model: FakeModel) -> None:
    def one_row(request: Request) -> Response:
        response = echo(request)
        response.outputs[0].shape[0] = 1  # an answer without the batch dimension
        return response

    model.joined_answer = one_row


@pytest.mark.parametrize("spoil", [_failing, _unsplittable])
async def test_when_the_joined_batch_fails_each_call_goes_alone_and_hears_its_own_answer(spoil):
    model, coalescer = FakeModel(), Coalescer()
    spoil(model)
    model.alone_errors["call-1"] = RuntimeError("call-1's own error")
    lane = model.lane()
    first = start(coalescer, lane, model, infer_request(1, request_id="first"))
    requests = [infer_request(2, start=10 * n, request_id=f"call-{n}") for n in range(3)]
    calls = [start(coalescer, lane, model, request) for request in requests]
    await settle()
    model.gate.set()
    await within(first)
    answers = await within(asyncio.gather(*calls, return_exceptions=True))
    assert len(model.sent) == 1  # the joined try, then no other batch
    assert Counter(model.alone_ids) == Counter(["first", "call-0", "call-1", "call-2"])
    assert answers[0] == echo(requests[0]) and answers[2] == echo(requests[2])
    assert isinstance(answers[1], RuntimeError) and str(answers[1]) == "call-1's own error"


async def test_a_batch_never_exceeds_max_rows_and_the_excess_waits_for_the_next_send():
    model, coalescer = FakeModel(), Coalescer()
    lane = model.lane(max_rows=4)
    first = start(coalescer, lane, model, infer_request(1, request_id="first"))
    requests = [infer_request(rows, start=10 * n, request_id=f"call-{n}") for n, rows in enumerate([2, 2, 1])]
    calls = [start(coalescer, lane, model, request) for request in requests]
    await settle()
    model.gate.set()
    await within(first)
    assert await within(asyncio.gather(*calls)) == [echo(request) for request in requests]
    assert [rows_of(sent) for sent in model.sent] == [4, 1]
    assert model.sent[1] == requests[2]


async def test_calls_for_different_keys_neither_wait_for_nor_join_each_other():
    model, coalescer = FakeModel(), Coalescer()
    lanes = {key: model.lane(key) for key in ("a", "b")}
    firsts = [
        start(coalescer, lanes[k], model, infer_request(1, model=k, request_id=f"{k}-first")) for k in "ab"
    ]
    await settle()
    assert model.alone_ids == ["a-first", "b-first"]  # b did not queue behind a
    requests = [
        infer_request(1, start=10 * n, model=key, request_id=f"{key}-{n}") for key in "ab" for n in range(2)
    ]
    calls = [start(coalescer, lanes[r.model_name], model, r) for r in requests]
    await settle()
    model.gate.set()
    await within(asyncio.gather(*firsts))
    assert await within(asyncio.gather(*calls)) == [echo(request) for request in requests]
    assert sorted((sent.model_name, rows_of(sent)) for sent in model.sent) == [("a", 2), ("b", 2)]
    for sent in model.sent:
        own = [r.raw_input_contents[0] for r in requests if r.model_name == sent.model_name]
        assert sent.raw_input_contents[0] == b"".join(own)


# Through the real gateway


@pytest.fixture
async def stack(tmp_path):
    # Coalescing is on by default; a slow Triton keeps the first call in flight while the rest queue.
    async with gateway_stack(tmp_path) as started:
        await started.wait_for_routes()
        started.triton.delay = 0.2
        yield started


def rows_of_values(values: list[np.ndarray]) -> list[bytes]:
    return sorted(row.tobytes() for array in values for row in array)


async def test_concurrent_predicts_reach_triton_joined_and_each_gets_its_own_rows(stack):
    counts = [1, 2, 1, 3, 1, 2, 1, 1, 2, 1]
    values = [
        np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) + 100 * number
        for number, rows in enumerate(counts)
    ]
    answers = await asyncio.gather(
        *(
            stack.inference_stub.Predict(predict_request("mlp", v), metadata=stack.auth("reader"), timeout=5)
            for v in values
        )
    )
    for answer, sent in zip(answers, values, strict=True):
        (y,) = answer.outputs
        assert list(y.shape) == list(sent.shape)
        np.testing.assert_array_equal(np.frombuffer(y.raw, np.float32).reshape(sent.shape), sent)

    received = stack.triton.requests
    assert len(received) < len(counts)
    assert all(rows_of(request) <= 8 for request in received)  # the route's max_batch_size
    # Every row reached Triton exactly once.
    got = [np.frombuffer(r.raw_input_contents[0], np.float32).reshape(-1, 4) for r in received]
    assert rows_of_values(got) == rows_of_values(values)


async def test_concurrent_open_inference_protocol_calls_each_get_their_own_id_and_rows(stack):
    oip = service_pb2_grpc.GRPCInferenceServiceStub(stack.channel)
    requests = []
    for number, rows in enumerate([1, 2, 1, 1, 3, 1, 2, 1]):
        request = Request(model_name="mlp", id=f"caller-{number}")
        request.inputs.add(name="x", datatype="FP32", shape=[rows, 4])
        request.raw_input_contents.append(np.full((rows, 4), number, np.float32).tobytes())
        requests.append(request)
    answers = await asyncio.gather(
        *(oip.ModelInfer(r, metadata=stack.auth("reader"), timeout=5) for r in requests)
    )
    for answer, request in zip(answers, requests, strict=True):
        assert answer.id == request.id
        assert (answer.model_name, answer.model_version) == ("mlp", "1")
        assert list(answer.outputs[0].shape) == list(request.inputs[0].shape)
        assert answer.raw_output_contents[0] == request.raw_input_contents[0]
    assert len(stack.triton.requests) < len(requests)


async def test_a_failing_joined_batch_leaves_each_call_to_hear_its_own_error(stack):
    calls = [
        stack.inference_stub.Predict(
            predict_request("broken", np.full((1, 4), number, np.float32)),
            metadata=(*stack.auth("reader"), ("x-request-id", f"call-{number}")),
            timeout=5,
        )
        for number in range(5)
    ]
    errors = await asyncio.gather(*calls, return_exceptions=True)
    for error in errors:
        assert isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.INTERNAL
        assert "'broken'" in error.details()
    # A joined try (no caller's id), then every call once with its own id.
    received = Counter(request.id for request in stack.triton.requests)
    assert received.pop("") >= 1
    assert received == Counter(f"call-{number}" for number in range(5))
