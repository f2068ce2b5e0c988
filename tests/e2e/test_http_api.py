"""End to end through the real stack's HTTP port: the trainer's tiny character GPT, deployed
as a decoupled Triton model, answers the OpenAI completions API (curl, plain HTTP, streaming);
chat on a model without a chat template is a 400; a client that hangs up stops the decoding; a
token quota answers 429 with Retry-After; the digits MLP answers stock tritonclient.http (binary
and JSON tensors); every refusal is in OpenAI's error shape."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as triton_http
from maas import Client
from maas.gateway.v1 import admin_pb2
from maas.inference.v1 import inference_pb2

from tests.support.digits import SIGNATURE

pytestmark = pytest.mark.slow

TENANT = "http-writers"
PROMPT = "ROMEO:\n"


@pytest.fixture(scope="module")
def key(stack, digits) -> str:
    with Client(stack.gateway, stack.admin_key) as admin:
        admin.create_tenant(TENANT)
        plaintext = admin.create_api_key(TENANT, "developer")[1]
    with Client(stack.gateway, plaintext) as maas:
        job = maas.train(
            "tiny-gpt", "gpt", "shakespeare", epochs=1, max_samples=20_000, batch_size=64, block_size=32,
            embedding_dim=32, num_layers=1, num_heads=2, learning_rate=3e-3, device="cpu", seed=0,
        )
        assert maas.wait_job(job.id, timeout=600).result.version == 1
        maas.create_deployment("bard", "tiny-gpt", version=1)
        maas.create_model("digits")
        maas.upload_version("digits", digits.path, format="torchscript", signature=SIGNATURE)
        maas.create_deployment("digits", "digits", version=1)
        assert maas.wait_ready("bard", timeout=180).task == inference_pb2.SERVING_TASK_GENERATE
        maas.wait_ready("digits", timeout=180)
    return plaintext


def post(stack, key: str, path: str, body: dict) -> tuple[int, dict, dict]:
    request = urllib.request.Request(
        stack.http + path,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, _lower(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, _lower(error.headers), json.loads(error.read())


def _lower(headers) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_a_completion(stack, key):
    body = json.dumps({"model": "bard", "prompt": PROMPT, "max_tokens": 20, "seed": 1, "stream": True})
    result = subprocess.run(
        ["curl", "-sS", "-N", f"{stack.http}/v1/completions", "-H", f"Authorization: Bearer {key}",
         "-H", "Content-Type: application/json", "-d", body],
        capture_output=True, text=True, timeout=60, check=True,
    )
    events = [line.removeprefix("data: ") for line in result.stdout.split("\n\n") if line.strip()]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len("".join(chunk["choices"][0]["text"] for chunk in chunks)) >= 20


def test_the_same_seed_gives_the_same_completion_as_grpc(stack, key):
    status, headers, answer = post(stack, key, "/v1/completions",
                                   {"model": "bard", "prompt": PROMPT, "max_tokens": 30, "seed": 7})
    assert status == 200 and answer["object"] == "text_completion"
    with Client(stack.gateway, key) as maas:
        streamed = list(maas.generate("bard", PROMPT, max_tokens=30, seed=7))
    assert answer["choices"][0]["text"] == "".join(r.text for r in streamed[:-1])
    assert answer["usage"]["completion_tokens"] == 30 == streamed[-1].completion_tokens


def test_chat_on_a_model_without_a_chat_template_is_a_400(stack, key):
    status, _, answer = post(stack, key, "/v1/chat/completions",
                             {"model": "bard", "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"model": "bard", "prompt": PROMPT, "n": 3}, 400),
        ({"model": "bard", "prompt": PROMPT, "top_p": 2}, 400),
        ({"model": "nothing-here", "prompt": PROMPT}, 404),
        ({"model": "digits", "prompt": PROMPT}, 400),
    ],
)
def test_refusals_are_in_openai_shape(stack, key, body, status):
    got, _, answer = post(stack, key, "/v1/completions", body)
    assert got == status and set(answer["error"]) == {"message", "type", "param", "code"}


def test_a_client_that_hangs_up_stops_the_decoding(stack, key):
    body = {"model": "bard", "prompt": PROMPT, "max_tokens": 2048, "stream": True}
    request = urllib.request.Request(
        stack.http + "/v1/completions", data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with Client(stack.gateway, stack.admin_key) as admin:
        before = sum(row.tokens for row in admin.get_usage(TENANT))
        with urllib.request.urlopen(request, timeout=60) as response:
            response.readline()  # the first token arrived: hang up
        deadline, used = time.monotonic() + 30, 0
        while time.monotonic() < deadline:
            time.sleep(1)
            used = sum(row.tokens for row in admin.get_usage(TENANT)) - before
            if used:
                break
        # Settled to what streamed before the hang-up, far from the 2048 a whole run makes.
        assert 0 < used < 1000


def test_a_token_quota_answers_429_with_retry_after(stack, key):
    with Client(stack.gateway, stack.admin_key) as admin:
        admin.set_quota(admin_pb2.Quota(tenant=TENANT, tokens_per_day=1))
        time.sleep(1.5)  # the gateway rereads quotas every second
        try:
            status, headers, answer = post(stack, key, "/v1/completions",
                                           {"model": "bard", "prompt": PROMPT, "max_tokens": 50})
        finally:
            admin.set_quota(admin_pb2.Quota(tenant=TENANT))
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert answer["error"]["type"] == "rate_limit_error"


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_http_predicts_the_digits(stack, key, digits, binary):
    with triton_http.InferenceServerClient(stack.http.removeprefix("http://")) as client:
        headers = {"Authorization": f"Bearer {key}"}
        assert client.is_model_ready("digits", headers=headers)
        x = triton_http.InferInput("x", [8, 64], "FP32")
        x.set_data_from_numpy(digits.test_x[:8], binary_data=binary)
        output = triton_http.InferRequestedOutput("logits", binary_data=binary)
        logits = client.infer("digits", [x], outputs=[output], headers=headers).as_numpy("logits")
    np.testing.assert_allclose(logits, digits.reference(digits.test_x[:8]), rtol=1e-4, atol=1e-4)


def test_maas_status_shows_the_http_port(stack, key):
    shown = stack.maas("status", check=False)
    assert "gateway http" in shown.stdout and "LISTENING" in shown.stdout, shown.stdout
