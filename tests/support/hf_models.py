"""Small Hugging Face model directories built here, since nothing can be downloaded: a GPT-2 and a
Llama with random weights (seeded), saved with save_pretrained(safe_serialization=True), and a
byte-level BPE tokenizer trained on the Shakespeare corpus, with a chat template.

`hf_model_dir(tmp, "gpt2")` writes one and returns its path; the tokenizer is trained once per
process (a second or two) and reused."""

from __future__ import annotations

import functools
from pathlib import Path

# A ChatML-style template, as Qwen2 models ship: every message, then the assistant's turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCABULARY_SIZE = 2048
# Small enough to build in a second, big enough to be a real transformer of each family.
SHAPES = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256),
}


@functools.cache
def shakespeare_tokenizer():
    """A byte-level BPE (as GPT-2, Llama 3 and Qwen2 use) trained on the plays."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from services.trainer.data import shakespeare_text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCABULARY_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = shakespeare_text()[:2_000_000]
    tokenizer.train_from_iterator((text[i:i + 10_000] for i in range(0, len(text), 10_000)), trainer)
    return tokenizer


def hf_model_dir(parent: Path, family: str = "gpt2", *, seed: int = 0, chat_template: bool = True,
                 **shape: int) -> Path:
    """A model directory of `family` ("gpt2" or "llama") under `parent`; `shape` overrides SHAPES."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=shakespeare_tokenizer(), bos_token="<|endoftext|>",
                                        eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
                                        unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    bos = tokenizer.convert_tokens_to_ids(tokenizer.bos_token)
    sizes = {**SHAPES[family], **shape}
    torch.manual_seed(seed)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), bos_token_id=bos, eos_token_id=eos, **sizes))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), bos_token_id=bos, eos_token_id=eos,
                                             tie_word_embeddings=False, **sizes))
    else:
        raise ValueError(f"no {family!r} family here: gpt2 or llama")
    path = parent / f"{family}-{seed}"
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
