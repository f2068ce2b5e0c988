"""End to end through the real stack: a tiny character-level GPT trained on Shakespeare by the
trainer, deployed on Triton as a decoupled model, streams text through the gateway's Generate
(SDK and `maas generate --stream`) and its Open Inference Protocol ModelStreamInfer (stock
tritonclient); cancel and deadlines stop Triton generating; tokens count in usage and quotas."""

from __future__ import annotations

import queue
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from maas import Client
from maas.errors import ApiError
from maas.gateway.v1 import admin_pb2
from maas.inference.v1 import inference_pb2

pytestmark = pytest.mark.slow

TENANT = "writers"
DEPLOYMENT = "bard"
PROMPT = "ROMEO:\n"


@pytest.fixture(scope="module")
def key(stack) -> str:
    with Client(stack.gateway, stack.admin_key) as admin:
        admin.create_tenant(TENANT)
        plaintext = admin.create_api_key(TENANT, "developer")[1]
    with Client(stack.gateway, plaintext) as maas:
        # A few hundred steps on a slice of the corpus: enough to be Shakespeare-shaped, fast.
        job = maas.train(
            "tiny-gpt", "gpt", "shakespeare", epochs=1, max_samples=20_000, batch_size=64, block_size=32,
            embedding_dim=32, num_layers=1, num_heads=2, learning_rate=3e-3, device="cpu", seed=0,
        )
        finished = maas.wait_job(job.id, timeout=600)
        assert finished.result.version == 1, finished
        maas.create_deployment(DEPLOYMENT, "tiny-gpt", version=1)
        deployment = maas.wait_ready(DEPLOYMENT, timeout=180)
        assert deployment.task == inference_pb2.SERVING_TASK_GENERATE
    return plaintext


@pytest.fixture
def maas(stack, key):
    with Client(stack.gateway, key) as client:
        yield client


def text_of(responses) -> tuple[str, inference_pb2.GenerateResponse]:
    responses = list(responses)
    return "".join(r.text for r in responses[:-1]), responses[-1]


def test_tokens_stream_in_order_with_the_version_named(maas, key):
    request = inference_pb2.GenerateRequest(deployment=DEPLOYMENT, prompt=PROMPT, max_tokens=200, seed=3)
    call = maas.inference.Generate(request, metadata=(("authorization", f"Bearer {key}"),), timeout=60)
    arrivals, messages = [], []
    for message in call:
        arrivals.append(time.perf_counter())
        messages.append(message)
    *tokens, final = messages
    # A message holds the tokens sampled while the previous one travelled (one character each).
    assert 2 <= len(tokens) <= 200 and sum(len(m.text) for m in tokens) == 200 and final.text == ""
    assert final.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert (final.prompt_tokens, final.completion_tokens) == (len(PROMPT), 200)
    assert (final.model, final.version) == ("tiny-gpt", 1)
    assert dict(call.trailing_metadata())["x-maas-model-version"] == "1"
    # Streamed, not sent at the end: the first token arrives well before the last.
    assert arrivals[-1] - arrivals[0] > 0.05


def test_the_same_seed_gives_the_same_text(maas):
    first, _ = text_of(maas.generate(DEPLOYMENT, PROMPT, max_tokens=40, seed=11))
    again, _ = text_of(maas.generate(DEPLOYMENT, PROMPT, max_tokens=40, seed=11))
    other, _ = text_of(maas.generate(DEPLOYMENT, PROMPT, max_tokens=40, seed=12))
    assert first == again and first != other


def test_generation_stops_before_a_stop_sequence(maas):
    greedy, final = text_of(maas.generate(DEPLOYMENT, PROMPT, max_tokens=60, temperature=0))
    assert final.finish_reason == inference_pb2.FINISH_REASON_LENGTH and len(greedy) == 60
    stop = greedy[20:22]
    cut = greedy.find(stop)
    stopped, final = text_of(maas.generate(DEPLOYMENT, PROMPT, max_tokens=60, temperature=0, stop=[stop]))
    assert stopped == greedy[:cut]
    assert final.finish_reason == inference_pb2.FINISH_REASON_STOP
    assert final.completion_tokens == cut + len(stop)


def test_cancel_and_deadline_stop_triton_generating(maas):
    started = time.perf_counter()
    text_of(maas.generate(DEPLOYMENT, PROMPT, max_tokens=200, temperature=0))
    per_token = (time.perf_counter() - started) / 200
    # A one-instance model serves one stream at a time: had Triton kept generating the 2048
    # tokens of the cancelled call, the next call would wait for them.
    stream = maas.generate(DEPLOYMENT, PROMPT, max_tokens=2048)
    for _ in range(5):
        next(stream)
    stream.close()
    started = time.perf_counter()
    text_of(maas.generate(DEPLOYMENT, PROMPT, max_tokens=5))
    assert time.perf_counter() - started < 2048 * per_token / 3

    # A deadline at a quarter of what the 2048 tokens take, however fast this machine decodes.
    with pytest.raises(ApiError) as caught:
        text_of(maas.generate(DEPLOYMENT, PROMPT, max_tokens=2048, timeout=max(0.05, 2048 * per_token / 4)))
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    started = time.perf_counter()
    text_of(maas.generate(DEPLOYMENT, PROMPT, max_tokens=5))
    assert time.perf_counter() - started < 2048 * per_token / 3


@pytest.mark.parametrize(
    ("fields", "code", "complaint"),
    [
        ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "must not be empty"),
        ({"prompt": "ROMEO: 🙂"}, grpc.StatusCode.INVALID_ARGUMENT, "characters the model does not know"),
        ({"top_p": 2.0}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        ({"max_tokens": 5000}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"stop": ["a"] * 9}, grpc.StatusCode.INVALID_ARGUMENT, "at most 8"),
        ({"deployment": "nowhere"}, grpc.StatusCode.NOT_FOUND, "not found"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(maas, fields, code, complaint):
    arguments = {"deployment": DEPLOYMENT, "prompt": PROMPT, **fields}
    with pytest.raises(ApiError) as caught:
        text_of(maas.generate(arguments.pop("deployment"), arguments.pop("prompt"), **arguments))
    assert caught.value.code is code and complaint in caught.value.details


def test_predict_on_a_generation_deployment_says_to_call_generate(maas):
    with pytest.raises(ApiError) as caught:
        maas.predict(DEPLOYMENT, {"tokens": np.zeros((1, 4), np.int64)})
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION and "Generate" in caught.value.details


def test_maas_generate_streams_from_the_command_line(stack, maas, key):
    expected, _ = text_of(maas.generate(DEPLOYMENT, PROMPT, max_tokens=30, seed=5))
    env = dict(stack.env, MAAS_API_KEY=key)
    result = stack.maas("generate", DEPLOYMENT, PROMPT, "--stream", "--max-tokens", "30", "--seed", "5", env=env)
    assert result.stdout.rstrip("\n") == expected.rstrip("\n")
    assert "30 tokens" in result.stderr and "finished: length" in result.stderr


def test_stock_tritonclient_streams_through_the_gateway(stack, maas, key):
    expected, _ = text_of(maas.generate(DEPLOYMENT, PROMPT, max_tokens=12, temperature=0))
    results: queue.Queue = queue.Queue()
    client = triton_grpc.InferenceServerClient(stack.gateway)
    try:
        client.start_stream(lambda result, error: results.put((result, error)),
                            headers={"authorization": f"Bearer {key}"})
        prompt = triton_grpc.InferInput("prompt", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([PROMPT.encode()], dtype=np.object_))
        client.async_stream_infer(DEPLOYMENT, [prompt], request_id="r1",
                                  parameters={"max_tokens": 12, "temperature": 0.0})
        pieces = []
        while True:
            result, error = results.get(timeout=30)
            assert error is None, error
            response = result.get_response()
            assert (response.model_name, response.model_version, response.id) == (DEPLOYMENT, "1", "r1")
            if result.as_numpy("finish_reason") is not None:
                assert result.as_numpy("completion_tokens")[0] == 12
                break
            pieces.append(result.as_numpy("text")[0].decode())
        assert "".join(pieces) == expected

        client.async_stream_infer(DEPLOYMENT, [prompt], parameters={"top_p": 3.0})
        result, error = results.get(timeout=30)
        assert result is None and "top_p" in str(error)
    finally:
        client.stop_stream()
        client.close()


def test_tokens_count_in_usage_and_against_the_quota(stack, maas):
    _, final = text_of(maas.generate(DEPLOYMENT, PROMPT, max_tokens=10))
    with Client(stack.gateway, stack.admin_key) as admin:
        deadline = time.monotonic() + 30
        while sum(row.tokens for row in admin.get_usage(TENANT)) < final.prompt_tokens + 10:
            assert time.monotonic() < deadline, "the tokens never reached the usage report"
            time.sleep(0.5)
        # Room for a small call, not for one that may generate 2048 tokens.
        admin.set_quota(admin_pb2.Quota(tenant=TENANT, tokens_per_day=300))
        time.sleep(1.5)  # the gateway rereads quotas every second
        try:
            text_of(maas.generate(DEPLOYMENT, PROMPT, max_tokens=20))
            with pytest.raises(ApiError) as caught:
                text_of(maas.generate(DEPLOYMENT, PROMPT, max_tokens=2048))
            assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens" in caught.value.details
        finally:
            admin.set_quota(admin_pb2.Quota(tenant=TENANT))
