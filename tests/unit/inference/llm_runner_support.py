"""What the tests of the imported-model runner share: its modules importable as the version
directory holds them (top-level `decoder`, `batching`, `chat`, `sampling`), and tiny models
packed into the one safetensors file the registry stores."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from sdk.maas.hf_format import pack, texts_of
from services.inference.repository import RUNNER_DIR
from tests.support.hf_models import hf_model_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Last on the path: the runner's modules never shadow an installed package.
if str(RUNNER_DIR) not in sys.path:
    sys.path.append(str(RUNNER_DIR))
batching, chat, decoder, sampling = (importlib.import_module(name) for name in ("batching", "chat", "decoder", "sampling"))


def packed(directory: Path, destination: Path | None = None) -> Path:
    """The model directory as the registry stores it."""
    destination = destination or directory.with_suffix(".safetensors")
    pack(sorted(directory.glob("*.safetensors")), texts_of(directory), destination)
    return destination


def qwen2_dir(parent: Path, seed: int = 0, **shape) -> Path:
    """A small random Qwen2 (q/k/v biases, tied head, rope_theta not the default) with the
    Shakespeare tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer_source = hf_model_dir(parent / "tokenizer", "gpt2", n_layer=1)
    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=1, max_position_embeddings=256, rope_theta=50_000.0,
                 tie_word_embeddings=True, **shape)
    config = Qwen2Config(vocab_size=2048 + 3, eos_token_id=2050, **sizes)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # Random biases, so that a decoder forgetting them is caught.
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.normal_(0, 0.5)
    path = parent / f"qwen2-{seed}"
    model.save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((tokenizer_source / name).read_bytes())
    return path


def model_dir(parent: Path, family: str, **shape) -> Path:
    return qwen2_dir(parent, **shape) if family == "qwen2" else hf_model_dir(parent, family, **shape)
