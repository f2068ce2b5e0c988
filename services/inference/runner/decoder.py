"""Decoder-only language models of the GPT-2 and Llama/Qwen2 families in plain torch, with a key/value
cache laid out by slot: each sequence in flight owns a slot, so that sequences of different lengths
decode together in one forward and join or leave between steps (runner/batching.py).

Weights load by their Hugging Face names from the one safetensors file the registry stores
(sdk/maas/hf_format.py: config, tokenizer and chat template ride in its header metadata), with
safetensors.safe_open: nothing is unpickled. This file ships into the model's version directory,
so it imports nothing of the platform.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention

# __metadata__ keys of the one-file artifact (sdk/maas/hf_format.py, which this file cannot import).
CONFIG_KEY = "maas.hf.config"
TOKENIZER_KEY = "maas.hf.tokenizer"
TOKENIZER_CONFIG_KEY = "maas.hf.tokenizer_config"
CHAT_TEMPLATE_KEY = "maas.hf.chat_template"
GENERATION_CONFIG_KEY = "maas.hf.generation_config"

GPT2, LLAMA = "gpt2", "llama"
# model_type -> family; Qwen2 is a Llama with q/k/v biases.
FAMILIES = {"gpt2": GPT2, "llama": LLAMA, "qwen2": LLAMA}
ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


class UnsupportedModel(ValueError):
    """The config asks for an architecture or a feature this decoder does not implement."""


@dataclass(frozen=True)
class Shape:
    family: str
    model_type: str
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    context_length: int
    norm_eps: float
    tied: bool
    intermediate: int = 0
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    # The trainer's character GPT: a GPT-2 with erf GELU and a biased output head.
    exact_gelu: bool = False
    head_bias: bool = False

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


def shape_of(config: dict) -> Shape:
    """The model's shape from its config.json; UnsupportedModel for anything not implemented."""
    model_type = config.get("model_type") or ARCHITECTURES.get((config.get("architectures") or [""])[0], "")
    if model_type not in FAMILIES:
        raise UnsupportedModel(
            f"model_type {model_type!r} ({config.get('architectures')}) is not served: "
            f"the runner decodes {sorted(FAMILIES)}"
        )
    architectures = config.get("architectures") or []
    if any(name not in ARCHITECTURES for name in architectures):
        raise UnsupportedModel(f"architectures {architectures} are not served: the runner decodes {sorted(ARCHITECTURES)}")
    tied = bool(config.get("tie_word_embeddings", model_type == "gpt2"))
    if FAMILIES[model_type] == GPT2:
        for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if config.get(flag):
                raise UnsupportedModel(f"GPT-2 with {flag} is not served")
        if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UnsupportedModel(f"GPT-2 activation {config['activation_function']!r} is not served (gelu_new)")
        hidden, heads = int(config["n_embd"]), int(config["n_head"])
        return Shape(
            family=GPT2, model_type=model_type, vocab_size=int(config["vocab_size"]), hidden=hidden,
            layers=int(config["n_layer"]), heads=heads, kv_heads=heads, head_dim=hidden // heads,
            context_length=int(config["n_positions"]), norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
            tied=tied, intermediate=int(config.get("n_inner") or 4 * hidden),
        )
    if config.get("hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act {config['hidden_act']!r} is not served (silu)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise UnsupportedModel(f"rope scaling {rope_type!r} is not served: only plain rotary embeddings are")
    if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or []):
        raise UnsupportedModel("sliding-window attention is not served")
    if int(config.get("pretraining_tp", 1)) != 1:
        raise UnsupportedModel("pretraining_tp other than 1 is not served")
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    qwen = model_type == "qwen2"
    return Shape(
        family=LLAMA, model_type=model_type, vocab_size=int(config["vocab_size"]), hidden=hidden,
        layers=int(config["num_hidden_layers"]), heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        context_length=int(config["max_position_embeddings"]), norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tied=tied, intermediate=int(config["intermediate_size"]),
        rope_theta=float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0),
        qkv_bias=qwen or bool(config.get("attention_bias")), out_bias=bool(config.get("attention_bias")) and not qwen,
        mlp_bias=bool(config.get("mlp_bias")),
    )


class KVCache:
    """Keys and values of every layer, [slots, kv_heads, length, head_dim] each, preallocated."""

    def __init__(self, shape: Shape, slots: int, length: int, dtype: torch.dtype, device: torch.device) -> None:
        self.slots, self.length = slots, length
        size = (slots, shape.kv_heads, length, shape.head_dim)
        self.keys = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]
        self.values = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]


class Decoder:
    """forward(tokens [B, T], slots [B], starts [B]) -> logits [B, V] of each row's last token:
    row b holds the tokens at positions starts[b] .. starts[b]+T-1 of the sequence in slot
    slots[b], whose earlier positions are in the cache already. Prefill is T = the longest prompt
    with a row per prompt, shorter ones padded at the end and their logits taken at `lasts`
    (the padding's keys land in the cache past the prompt, where decoding overwrites them before
    any query can see them); a decoding step is T = 1 with a row per sequence in flight."""

    def __init__(self, shape: Shape, weights: dict[str, torch.Tensor], device: torch.device) -> None:
        self.shape = shape
        self.device = device
        self.weights = weights
        self.dtype = next(iter(weights.values())).dtype
        self.weight_bytes = sum(tensor.numel() * tensor.element_size() for tensor in weights.values())
        if shape.family == LLAMA:
            exponents = torch.arange(0, shape.head_dim, 2, dtype=torch.float32, device=device) / shape.head_dim
            self.inverse_frequencies = 1.0 / (shape.rope_theta ** exponents)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor, cache: KVCache,
                lasts: torch.Tensor | None = None) -> torch.Tensor:
        rows, count = tokens.shape
        positions = starts[:, None] + torch.arange(count, device=self.device)[None, :]  # [B, T]
        end = int(positions.max()) + 1
        # Query at position p sees cached keys 0..p of its own slot.
        visible = torch.arange(end, device=self.device)[None, None, :] <= positions[:, :, None]  # [B, T, end]
        mask = visible[:, None, :, :]
        # Rows in consecutive slots read the cache through a view; others through a gathered copy.
        first = int(slots[0])
        consecutive = bool(torch.equal(slots, torch.arange(first, first + rows, device=slots.device)))
        window = slice(first, first + rows) if consecutive else slots
        w = self.weights
        if self.shape.family == GPT2:
            x = F.embedding(tokens, w["transformer.wte.weight"]) + F.embedding(positions, w["transformer.wpe.weight"])
            rotary = None
        else:
            x = F.embedding(tokens, w["model.embed_tokens.weight"])
            angles = positions[..., None].float() * self.inverse_frequencies  # [B, T, D/2]
            angles = torch.cat([angles, angles], dim=-1)
            rotary = (angles.cos().to(x.dtype)[:, None], angles.sin().to(x.dtype)[:, None])
        for layer in range(self.shape.layers):
            if self.shape.family == GPT2:
                x = self._gpt2_block(layer, x, slots, positions, mask, end, cache, window)
            else:
                x = self._llama_block(layer, x, slots, positions, mask, end, cache, rotary, window)
        last = x[:, -1] if lasts is None else x[torch.arange(rows, device=self.device), lasts]
        if self.shape.family == GPT2:
            last = F.layer_norm(last, (self.shape.hidden,), w["transformer.ln_f.weight"], w["transformer.ln_f.bias"],
                                self.shape.norm_eps)
            return F.linear(last, w["transformer.wte.weight"] if self.shape.tied else w["lm_head.weight"],
                            w.get("lm_head.bias"))
        last = _rms_norm(last, w["model.norm.weight"], self.shape.norm_eps)
        return F.linear(last, w["model.embed_tokens.weight"] if self.shape.tied else w["lm_head.weight"])

    def _attend(self, layer, q, k, v, slots, positions, mask, end, cache: KVCache, window) -> torch.Tensor:
        """q [B, H, T, D], k and v [B, KV, T, D] of the new tokens: stored at their positions in
        their slots, then attended with the cached ones."""
        keys, values = cache.keys[layer], cache.values[layer]
        rows = slots[:, None].expand_as(positions)
        keys[rows, :, positions] = k.transpose(1, 2)
        values[rows, :, positions] = v.transpose(1, 2)
        k_all, v_all = keys[window, :, :end], values[window, :, :end]
        groups = self.shape.heads // self.shape.kv_heads
        if groups > 1:
            k_all = k_all.repeat_interleave(groups, dim=1)
            v_all = v_all.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)

    def _gpt2_block(self, layer, x, slots, positions, mask, end, cache, window) -> torch.Tensor:
        w, s = self.weights, self.shape
        p = f"transformer.h.{layer}."
        rows, count, _ = x.shape
        h = F.layer_norm(x, (s.hidden,), w[p + "ln_1.weight"], w[p + "ln_1.bias"], s.norm_eps)
        # GPT-2's Conv1D keeps weights as [in, out].
        qkv = torch.addmm(w[p + "attn.c_attn.bias"], h.reshape(-1, s.hidden), w[p + "attn.c_attn.weight"])
        q, k, v = qkv.view(rows, count, 3, s.heads, s.head_dim).permute(2, 0, 3, 1, 4)
        attended = self._attend(layer, q, k, v, slots, positions, mask, end, cache, window)
        attended = attended.transpose(1, 2).reshape(-1, s.hidden)
        x = x + torch.addmm(w[p + "attn.c_proj.bias"], attended, w[p + "attn.c_proj.weight"]).view_as(x)
        h = F.layer_norm(x, (s.hidden,), w[p + "ln_2.weight"], w[p + "ln_2.bias"], s.norm_eps).reshape(-1, s.hidden)
        h = F.gelu(torch.addmm(w[p + "mlp.c_fc.bias"], h, w[p + "mlp.c_fc.weight"]),
                   approximate="none" if s.exact_gelu else "tanh")
        return x + torch.addmm(w[p + "mlp.c_proj.bias"], h, w[p + "mlp.c_proj.weight"]).view_as(x)

    def _llama_block(self, layer, x, slots, positions, mask, end, cache, rotary, window) -> torch.Tensor:
        w, s = self.weights, self.shape
        p = f"model.layers.{layer}."
        rows, count, _ = x.shape
        h = _rms_norm(x, w[p + "input_layernorm.weight"], s.norm_eps)
        q = F.linear(h, w[p + "self_attn.q_proj.weight"], w.get(p + "self_attn.q_proj.bias"))
        k = F.linear(h, w[p + "self_attn.k_proj.weight"], w.get(p + "self_attn.k_proj.bias"))
        v = F.linear(h, w[p + "self_attn.v_proj.weight"], w.get(p + "self_attn.v_proj.bias"))
        q = q.view(rows, count, s.heads, s.head_dim).transpose(1, 2)
        k = k.view(rows, count, s.kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(rows, count, s.kv_heads, s.head_dim).transpose(1, 2)
        cos, sin = rotary
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        attended = self._attend(layer, q, k, v, slots, positions, mask, end, cache, window)
        attended = attended.transpose(1, 2).reshape(rows, count, s.heads * s.head_dim)
        x = x + F.linear(attended, w[p + "self_attn.o_proj.weight"], w.get(p + "self_attn.o_proj.bias"))
        h = _rms_norm(x, w[p + "post_attention_layernorm.weight"], s.norm_eps)
        gate = F.linear(h, w[p + "mlp.gate_proj.weight"], w.get(p + "mlp.gate_proj.bias"))
        up = F.linear(h, w[p + "mlp.up_proj.weight"], w.get(p + "mlp.up_proj.bias"))
        return x + F.linear(F.silu(gate) * up, w[p + "mlp.down_proj.weight"], w.get(p + "mlp.down_proj.bias"))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def required_names(shape: Shape) -> list[str]:
    """Every weight the decoder reads, by its Hugging Face name."""
    if shape.family == GPT2:
        names = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]
        for layer in range(shape.layers):
            p = f"transformer.h.{layer}."
            names += [p + part + suffix for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc",
                                                     "mlp.c_proj") for suffix in (".weight", ".bias")]
    else:
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        for layer in range(shape.layers):
            p = f"model.layers.{layer}."
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            names += [p + f"self_attn.{part}_proj.weight" for part in "qkvo"]
            names += [p + f"mlp.{part}_proj.weight" for part in ("gate", "up", "down")]
            if shape.qkv_bias:
                names += [p + f"self_attn.{part}_proj.bias" for part in "qkv"]
            if shape.out_bias:
                names.append(p + "self_attn.o_proj.bias")
            if shape.mlp_bias:
                names += [p + f"mlp.{part}_proj.bias" for part in ("gate", "up", "down")]
    if not shape.tied:
        names.append("lm_head.weight")
    if shape.head_bias:
        names.append("lm_head.bias")
    return names


# Checkpoints of the original GPT-2 name their weights without the "transformer." prefix.
_GPT2_PREFIX = "transformer."


@dataclass
class LoadedModel:
    decoder: Decoder
    shape: Shape
    texts: dict[str, str]  # the header's __metadata__: config, tokenizer, chat template, ...
    # Positions are learned up to a short context (the trainer's GPT): a sequence that fills its
    # slot goes on over the latest half of its tokens instead of ending.
    slides: bool = False


def load(path: str, device: torch.device, dtype: torch.dtype | None = None) -> LoadedModel:
    """The model in the one safetensors file at `path`. Weights compute in float32 on a CPU
    (half precision matmuls are slow there) and in their stored precision on a GPU, unless
    `dtype` says otherwise."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as weights_file:
        texts = dict(weights_file.metadata() or {})
        if CONFIG_KEY not in texts or TOKENIZER_KEY not in texts:
            raise UnsupportedModel(f"the artifact's header has no {CONFIG_KEY} or {TOKENIZER_KEY}: not an imported model")
        shape = shape_of(json.loads(texts[CONFIG_KEY]))
        stored = set(weights_file.keys())
        by_name = {}
        for name in required_names(shape):
            source = name
            if name not in stored and shape.family == GPT2 and name.removeprefix(_GPT2_PREFIX) in stored:
                source = name.removeprefix(_GPT2_PREFIX)
            if source not in stored:
                raise UnsupportedModel(f"the artifact has no weight {name!r}")
            by_name[name] = weights_file.get_tensor(source)
    stored_dtype = next(iter(by_name.values())).dtype
    target = dtype or (torch.float32 if device.type == "cpu" else stored_dtype)
    if not target.is_floating_point:
        raise UnsupportedModel(f"weights of dtype {target} are not served")
    weights = {name: tensor.to(device=device, dtype=target) for name, tensor in by_name.items()}
    return LoadedModel(Decoder(shape, weights, device), shape, texts)


# The trainer's character GPT (services/trainer/models.py, Gpt) by its TorchScript names, per
# layer and for the whole model, beside the GPT-2 name each loads as; True: a Linear weight,
# [out, in], which GPT-2's Conv1D keeps as [in, out].
_CHARACTER_GPT_LAYER = {
    "norm1.weight": ("ln_1.weight", False), "norm1.bias": ("ln_1.bias", False),
    "attention.qkv.weight": ("attn.c_attn.weight", True), "attention.qkv.bias": ("attn.c_attn.bias", False),
    "attention.proj.weight": ("attn.c_proj.weight", True), "attention.proj.bias": ("attn.c_proj.bias", False),
    "norm2.weight": ("ln_2.weight", False), "norm2.bias": ("ln_2.bias", False),
    "mlp.0.weight": ("mlp.c_fc.weight", True), "mlp.0.bias": ("mlp.c_fc.bias", False),
    "mlp.2.weight": ("mlp.c_proj.weight", True), "mlp.2.bias": ("mlp.c_proj.bias", False),
}
_CHARACTER_GPT_MODEL = {
    "tokens.weight": "transformer.wte.weight", "positions.weight": "transformer.wpe.weight",
    "norm.weight": "transformer.ln_f.weight", "norm.bias": "transformer.ln_f.bias",
    "head.weight": "lm_head.weight", "head.bias": "lm_head.bias",
}


def load_character_gpt(path: str, device: torch.device) -> LoadedModel:
    """The trainer's character GPT, a TorchScript file, as the GPT-2 it is (erf GELU, a biased
    head): its weights renamed; none of the module's code runs. UnsupportedModel for any other
    TorchScript (a quantized GPT included: its weights are packed)."""
    module = torch.jit.load(path, map_location="cpu")
    state = module.state_dict()
    prefixes = [name.removesuffix("tokens.weight") for name in state if name.endswith("tokens.weight")]
    if len(prefixes) != 1 or any("_packed_params" in name for name in state):
        raise UnsupportedModel("the TorchScript model is not the trainer's (unquantized) GPT")
    prefix = prefixes[0]
    layers = sum(1 for name in state if name.startswith(prefix + "blocks.") and name.endswith(".norm1.weight"))
    sources = {prefix + name: target for name, target in _CHARACTER_GPT_MODEL.items()}
    for layer in range(layers):
        for name, (target, linear) in _CHARACTER_GPT_LAYER.items():
            sources[f"{prefix}blocks.{layer}.{name}"] = (f"transformer.h.{layer}.{target}", linear)
    missing = sorted(name for name in sources if name not in state)
    if missing or not layers:
        raise UnsupportedModel(f"the TorchScript model is not the trainer's GPT: it has no {missing[:3] or 'blocks'}")
    weights = {}
    for source, target in sources.items():
        name, linear = target if isinstance(target, tuple) else (target, False)
        tensor = state[source].float()
        weights[name] = (tensor.t() if linear else tensor).contiguous().to(device)
    attention = dict(module.named_modules())[f"{prefix}blocks.0.attention"]
    hidden = weights["transformer.wte.weight"].shape[1]
    heads = int(attention.heads)
    shape = Shape(
        family=GPT2, model_type="maas-character-gpt", vocab_size=weights["transformer.wte.weight"].shape[0],
        hidden=hidden, layers=layers, heads=heads, kv_heads=heads, head_dim=hidden // heads,
        context_length=weights["transformer.wpe.weight"].shape[0], norm_eps=1e-5, tied=False,
        intermediate=weights["transformer.h.0.mlp.c_fc.weight"].shape[1], exact_gelu=True, head_bias=True,
    )
    return LoadedModel(Decoder(shape, weights, device), shape, {}, slides=True)
