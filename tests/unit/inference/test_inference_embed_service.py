"""The inference service's own Embed (for internal callers): an embedding version deploys with the
embedding runner; texts are checked, split by max_batch_size and merged in order."""

from __future__ import annotations

import numpy as np
import pytest
from maas.inference.v1 import inference_pb2
from maas.registry.v1 import registry_pb2

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.inference.deployments import DeploymentSpec
from services.inference.store import READY
from tests.support.embedding import DIMENSIONS, embedding_answer, embedding_signature, tokens_of, vector_of
from tests.unit.inference.inference_fakes import TENANT
from tests.unit.inference.test_inference_service import wait_state


@pytest.fixture
async def minilm(deployments, registry, triton):
    version = registry.add(
        "minilm",
        1,
        artifact=b"onnx bytes",
        fmt=registry_pb2.ARTIFACT_FORMAT_ONNX,
        signature=embedding_signature(),
    )
    version.metadata.update({"task": "embedding", "dimensions": str(DIMENSIONS)})
    await deployments.create(
        TENANT, DeploymentSpec(name="minilm", model="minilm", version=1, max_batch_size=3)
    )
    ready = await wait_state(deployments, "minilm", READY)
    sent = []

    async def infer(request, timeout):
        sent.append(request)
        return embedding_answer(request)

    triton.infer = infer
    return ready, sent


async def test_embedding_version_deploys_with_the_embedding_runner(deployments, repository, minilm):
    ready, _ = minilm
    model_dir = repository.path(ready.triton_model)
    assert "TOKENIZER_PROP" in (model_dir / "1" / "model.py").read_text()
    assert (model_dir / "1" / "model.onnx").read_bytes() == b"onnx bytes"
    assert "dynamic_batching" in (model_dir / "config.pbtxt").read_text()


async def test_embed_splits_by_max_batch_size_and_merges_in_order(deployments, minilm):
    _, sent = minilm
    texts = ["one", "two words", "three more words", "four", "five"]
    response = await deployments.serving.embed(TENANT, inference_pb2.EmbedRequest(deployment="minilm", texts=texts))
    assert [list(r.inputs[0].shape) for r in sent] == [[3, 1], [2, 1]]
    got = np.frombuffer(response.embeddings.raw, np.float32).reshape(tuple(response.embeddings.shape))
    np.testing.assert_array_equal(got, np.stack([vector_of(t) for t in texts]))
    assert response.prompt_tokens == sum(tokens_of(t) for t in texts)
    assert (response.model, response.version) == ("minilm", 1)


async def test_embed_refuses_bad_calls(deployments, minilm):
    _, sent = minilm
    with pytest.raises(InvalidArgument, match="texts is empty"):
        await deployments.serving.embed(TENANT, inference_pb2.EmbedRequest(deployment="minilm"))
    with pytest.raises(InvalidArgument, match=r"texts\[0\] is empty"):
        await deployments.serving.embed(TENANT, inference_pb2.EmbedRequest(deployment="minilm", texts=[""]))
    with pytest.raises(NotFound):
        await deployments.serving.embed(TENANT, inference_pb2.EmbedRequest(deployment="absent", texts=["hi"]))
    with pytest.raises(NotFound):  # tenant-scoped
        await deployments.serving.embed("other", inference_pb2.EmbedRequest(deployment="minilm", texts=["hi"]))
    await deployments.create(TENANT, DeploymentSpec(name="digits", model="digits", version=1))
    await wait_state(deployments, "digits", READY)
    with pytest.raises(FailedPrecondition, match="use Predict"):
        await deployments.serving.embed(TENANT, inference_pb2.EmbedRequest(deployment="digits", texts=["hi"]))
    assert sent == []
