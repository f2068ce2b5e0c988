"""The imported-model decoder (runner/decoder.py) against transformers on the same weights: the
logits of a prefill and of the decoding steps after it, with sequences of different lengths in
different cache slots decoding in one batch; and the configs it refuses."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from tests.unit.inference.llm_runner_support import decoder, model_dir, packed

TOLERANCE = 1e-4
CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def family(request, tmp_path_factory):
    directory = model_dir(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, directory, packed(directory)


def reference_logits(directory, tokens: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]


def test_prefill_and_decoding_steps_match_transformers(family):
    name, directory, artifact = family
    loaded = decoder.load(str(artifact), CPU)
    assert loaded.shape.family == ("gpt2" if name == "gpt2" else "llama")
    torch.manual_seed(1)
    tokens = torch.randint(0, loaded.shape.vocab_size, (20,)).tolist()
    expected = reference_logits(directory, tokens)
    cache = decoder.KVCache(loaded.shape, slots=3, length=32, dtype=torch.float32, device=CPU)
    prefill = loaded.decoder.forward(torch.tensor([tokens[:12]]), torch.tensor([1]), torch.tensor([0]), cache)
    assert torch.allclose(prefill[0], expected[11], atol=TOLERANCE)
    for position in range(12, 20):
        step = loaded.decoder.forward(torch.tensor([[tokens[position]]]), torch.tensor([1]),
                                      torch.tensor([position]), cache)
        assert torch.allclose(step[0], expected[position], atol=TOLERANCE), position


def test_sequences_of_different_lengths_decode_together(family):
    _, directory, artifact = family
    loaded = decoder.load(str(artifact), CPU)
    torch.manual_seed(2)
    first = torch.randint(0, loaded.shape.vocab_size, (9,)).tolist()
    second = torch.randint(0, loaded.shape.vocab_size, (4,)).tolist()
    cache = decoder.KVCache(loaded.shape, slots=4, length=16, dtype=torch.float32, device=CPU)
    loaded.decoder.forward(torch.tensor([first[:-1]]), torch.tensor([3]), torch.tensor([0]), cache)
    loaded.decoder.forward(torch.tensor([second[:-1]]), torch.tensor([0]), torch.tensor([0]), cache)
    batch = loaded.decoder.forward(torch.tensor([[first[-1]], [second[-1]]]), torch.tensor([3, 0]),
                                   torch.tensor([8, 3]), cache)
    assert torch.allclose(batch[0], reference_logits(directory, first)[-1], atol=TOLERANCE)
    assert torch.allclose(batch[1], reference_logits(directory, second)[-1], atol=TOLERANCE)


def test_metadata_texts_come_with_the_model(family):
    _, directory, artifact = family
    loaded = decoder.load(str(artifact), CPU)
    assert json.loads(loaded.texts[decoder.CONFIG_KEY]) == json.loads((directory / "config.json").read_text())
    assert decoder.TOKENIZER_KEY in loaded.texts


LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8,
             intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32)


@pytest.mark.parametrize(
    ("config", "refusal"),
    [
        ({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling 'llama3'"),
        ({**LLAMA, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "rope scaling 'yarn'"),
        ({**LLAMA, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True},
         "sliding-window"),
        ({**LLAMA, "hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({**LLAMA, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "model_type 'mistral'"),
        ({**LLAMA, "architectures": ["LlamaForSequenceClassification"]}, "not served"),
        (dict(model_type="gpt2", n_embd=8, n_head=2, n_layer=1, n_positions=8, vocab_size=10,
              scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_unsupported_configs_are_refused_by_name(config, refusal):
    with pytest.raises(decoder.UnsupportedModel, match=refusal):
        decoder.shape_of(config)


def write_safetensors(path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def test_a_missing_weight_or_header_is_refused(tmp_path):
    config = json.dumps(LLAMA)
    write_safetensors(tmp_path / "partial.safetensors",
                      {decoder.CONFIG_KEY: config, decoder.TOKENIZER_KEY: "{}"},
                      {"model.embed_tokens.weight": torch.zeros(10, 8)})
    with pytest.raises(decoder.UnsupportedModel, match="no weight 'model.norm.weight'"):
        decoder.load(str(tmp_path / "partial.safetensors"), CPU)
    write_safetensors(tmp_path / "bare.safetensors", {}, {"x": torch.zeros(1)})
    with pytest.raises(decoder.UnsupportedModel, match="not an imported model"):
        decoder.load(str(tmp_path / "bare.safetensors"), CPU)


def test_a_pickle_is_never_loaded(tmp_path):
    """A torch.save file renamed .safetensors is refused by the header parser, not unpickled."""
    torch.save({"x": torch.zeros(1)}, tmp_path / "pickled.safetensors")
    raw = (tmp_path / "pickled.safetensors").read_bytes()
    assert struct.unpack("<Q", raw[:8])[0] > len(raw)  # nonsense as a header length
    with pytest.raises(Exception, match="(?i)header"):
        decoder.load(str(tmp_path / "pickled.safetensors"), CPU)
