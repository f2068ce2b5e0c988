"""The one-file form of a Hugging Face language model that the registry stores
(ARTIFACT_FORMAT_SAFETENSORS): every weight of the directory's *.safetensors files, and in the
header's __metadata__ the text files the model needs besides its weights. Nothing in it is code,
and nothing is ever unpickled.

The Triton runner (services/inference/runner/llm.py) reads the same keys; it cannot import this
module, so the names are repeated there."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

# __metadata__ key -> the file of a model directory it holds (the chat template also comes
# from tokenizer_config.json's "chat_template" when there is no chat_template.jinja).
CONFIG_KEY = "maas.hf.config"
TOKENIZER_KEY = "maas.hf.tokenizer"
TOKENIZER_CONFIG_KEY = "maas.hf.tokenizer_config"
CHAT_TEMPLATE_KEY = "maas.hf.chat_template"
GENERATION_CONFIG_KEY = "maas.hf.generation_config"
TEXT_FILES = {
    CONFIG_KEY: "config.json",
    TOKENIZER_KEY: "tokenizer.json",
    TOKENIZER_CONFIG_KEY: "tokenizer_config.json",
    CHAT_TEMPLATE_KEY: "chat_template.jinja",
    GENERATION_CONFIG_KEY: "generation_config.json",
}
REQUIRED_KEYS = (CONFIG_KEY, TOKENIZER_KEY)
# safetensors' own limit on a header, which here also carries the tokenizer.
MAX_HEADER_BYTES = 100 * 1024 * 1024
COPY_CHUNK_BYTES = 4 * 1024 * 1024


def texts_of(directory: Path) -> dict[str, str]:
    """The directory's text files by metadata key (the ones present)."""
    texts = {key: (directory / name).read_text(encoding="utf-8")
             for key, name in TEXT_FILES.items() if (directory / name).is_file()}
    if CHAT_TEMPLATE_KEY not in texts and TOKENIZER_CONFIG_KEY in texts:
        template = json.loads(texts[TOKENIZER_CONFIG_KEY]).get("chat_template")
        if isinstance(template, str):
            texts[CHAT_TEMPLATE_KEY] = template
    return texts


def pack(weight_files: list[Path], texts: dict[str, str], destination: Path) -> int:
    """Writes one safetensors file holding every tensor of `weight_files` (their names must not
    repeat) and `texts` as metadata; streams the tensor bytes, so memory stays small whatever the
    model's size. Returns the number of parameters."""
    entries: list[tuple[str, dict, Path, int]] = []  # name, header entry, source file, source offset
    for path in weight_files:
        header, data_start = read_header(path)
        for name, entry in check_tensors(header, path.stat().st_size - data_start, path.name).items():
            entries.append((name, entry, path, data_start))
    names = [name for name, *_ in entries]
    if len(set(names)) != len(names):
        raise ValueError("the weight files name one tensor twice")
    header: dict = {"__metadata__": {"format": "pt", **texts}}
    offset, parameters = 0, 0
    for name, entry, _, _ in sorted(entries, key=lambda item: item[0]):
        begin, end = entry["data_offsets"]
        header[name] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
        count = 1
        for size in entry["shape"]:
            count *= size
        parameters += count
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with destination.open("wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for _, entry, path, data_start in sorted(entries, key=lambda item: item[0]):
            begin, end = entry["data_offsets"]
            for chunk in _read_range(path, data_start + begin, end - begin):
                out.write(chunk)
    return parameters


def read_header(path: Path, name: str = "") -> tuple[dict, int]:
    """A safetensors file's header and where its data starts; ValueError when it is not one. Its
    messages call the file `name` (default: its file name)."""
    name = name or path.name
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{name} is not a safetensors file: too short")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{name}'s safetensors header claims {length} bytes, over {MAX_HEADER_BYTES}")
        raw = file.read(length)
    if len(raw) != length:
        raise ValueError(f"{name} is cut short inside its safetensors header")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # deep nesting exhausts the parser's recursion
        raise ValueError(f"{name}'s safetensors header is not JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{name}'s safetensors header is not a JSON object")
    return header, 8 + length


def _read_range(path: Path, start: int, size: int) -> Iterator[bytes]:
    with path.open("rb") as file:
        file.seek(start)
        while size > 0:
            chunk = file.read(min(COPY_CHUNK_BYTES, size))
            if not chunk:
                raise ValueError(f"{path.name} is cut short inside its tensor data")
            size -= len(chunk)
            yield chunk


# The decoder-only architectures an imported language model may have (config.json "architectures"),
# and the model_type each must come with.
SUPPORTED_ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
# Per model_type: the config keys that hold the context length (first present wins), and the input
# embedding every checkpoint of the family has, [vocab_size, hidden].
CONTEXT_LENGTH_KEYS = {"gpt2": ("n_positions", "n_ctx"), "llama": ("max_position_embeddings",),
                       "qwen2": ("max_position_embeddings",)}
EMBEDDING_WEIGHTS = {"gpt2": "transformer.wte.weight", "llama": "model.embed_tokens.weight",
                     "qwen2": "model.embed_tokens.weight"}
# safetensors' dtypes: bytes per element and the torch name the metadata uses.
DTYPES = {
    "BOOL": (1, "bool"), "U8": (1, "uint8"), "I8": (1, "int8"), "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"), "I16": (2, "int16"), "U16": (2, "uint16"), "F16": (2, "float16"),
    "BF16": (2, "bfloat16"), "I32": (4, "int32"), "U32": (4, "uint32"), "F32": (4, "float32"),
    "I64": (8, "int64"), "U64": (8, "uint64"), "F64": (8, "float64"),
}
PRECISIONS = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}


def check_tensors(header: dict, data_bytes: int, name: str = "the file") -> dict[str, dict]:
    """The tensors of a parsed header, checked against the `data_bytes` after it: known dtypes,
    shapes whose size is the bytes given, and byte ranges that tile the data exactly (no gap, no
    overlap, nothing past the end), as safetensors itself requires. ValueError names what is wrong."""
    tensors = {key: entry for key, entry in header.items() if key != "__metadata__"}
    if not tensors:
        raise ValueError(f"{name} holds no tensors")
    for key, entry in tensors.items():
        where = f"{name}: tensor {key[:120]!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{where} is not a dtype, shape and data_offsets entry")
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{where} has the unknown dtype {str(entry['dtype'])[:20]!r}; known: {', '.join(DTYPES)}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(_is_count(size) for size in shape):
            raise ValueError(f"{where} has the shape {str(shape)[:80]}, not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise ValueError(f"{where} has the data_offsets {str(offsets)[:80]}, not [begin, end]")
        count = 1
        for size in shape:
            count *= size
        if count * DTYPES[entry["dtype"]][0] != offsets[1] - offsets[0]:
            raise ValueError(f"{where} of shape {shape} and dtype {entry['dtype']} needs "
                             f"{count * DTYPES[entry['dtype']][0]} bytes, its data_offsets span {offsets[1] - offsets[0]}")
    end = 0
    for key, entry in sorted(tensors.items(), key=lambda item: item[1]["data_offsets"]):
        begin, stop = entry["data_offsets"]
        if begin != end:
            problem = "overlaps the tensor before it" if begin < end else f"leaves a gap of {begin - end} bytes"
            raise ValueError(f"{name}: tensor {key[:120]!r} starts at byte {begin} of the data and {problem}")
        end = stop
    if end != data_bytes:
        problem = "is cut short" if end > data_bytes else f"has {data_bytes - end} bytes after its last tensor"
        raise ValueError(f"{name} {problem}: its tensors span {end} bytes of data, the file has {data_bytes}")
    return tensors


def check_config(text: str) -> dict:
    """config.json of a supported decoder-only model, parsed; ValueError says why it is not one."""
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"config.json is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError("config.json is not a JSON object")
    if "auto_map" in config:
        raise ValueError("config.json has auto_map: the model needs its own Python code (trust_remote_code), "
                         "which is never run here")
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    architectures = config.get("architectures")
    if (not isinstance(architectures, list) or len(architectures) != 1
            or architectures[0] not in SUPPORTED_ARCHITECTURES):
        raise ValueError(f"config.json's architectures are {str(architectures)[:200]}; supported: {supported}")
    model_type = SUPPORTED_ARCHITECTURES[architectures[0]]
    if config.get("model_type") != model_type:
        raise ValueError(f"config.json says {architectures[0]} with model_type "
                         f"{str(config.get('model_type'))[:40]!r}; that architecture is model_type {model_type!r}")
    if not _is_count(config.get("vocab_size")) or not config["vocab_size"]:
        raise ValueError("config.json has no vocab_size")
    if _context_length(config) is None:
        raise ValueError(f"config.json has no context length ({' or '.join(CONTEXT_LENGTH_KEYS[model_type])})")
    return config


def describe(header: dict, data_bytes: int, name: str = "the file") -> dict[str, str]:
    """Checks a packed model's header (its tensors tile `data_bytes`; its metadata holds a supported
    config and a tokenizer; the weights are its family's) and returns what it is, as version
    metadata: architecture, model_type, parameters, context_length, dtype."""
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{name}'s __metadata__ is not a map of strings")
    missing = [TEXT_FILES[key] for key in REQUIRED_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"{name} lacks {' and '.join(missing)} in its metadata ({', '.join(REQUIRED_KEYS)}): "
                         "pack the model with maas.hf_format or `maas models import-hf`")
    config = check_config(metadata[CONFIG_KEY])
    for key in (TOKENIZER_KEY, TOKENIZER_CONFIG_KEY, GENERATION_CONFIG_KEY):
        if key in metadata:
            try:
                json.loads(metadata[key])
            except (ValueError, RecursionError) as exc:
                raise ValueError(f"{TEXT_FILES[key]} in {name}'s metadata is not JSON: {exc}") from None
    tensors = check_tensors(header, data_bytes, name)
    model_type = config["model_type"]
    embedding = tensors.get(EMBEDDING_WEIGHTS[model_type])
    if embedding is None or len(embedding["shape"]) != 2 or embedding["shape"][0] != config["vocab_size"]:
        raise ValueError(f"{name} is no {config['architectures'][0]}: it lacks {EMBEDDING_WEIGHTS[model_type]} "
                         f"of shape [vocab_size {config['vocab_size']}, hidden]")
    parameters = 0
    for entry in tensors.values():
        count = 1
        for size in entry["shape"]:
            count *= size
        parameters += count
    dtypes = sorted({entry["dtype"] for entry in tensors.values()})
    return {
        "architecture": config["architectures"][0],
        "model_type": model_type,
        "parameters": str(parameters),
        "context_length": str(_context_length(config)),
        "dtype": "+".join(DTYPES[dtype][1] for dtype in dtypes),
    }


def precision_of(dtype: str) -> str:
    """The precision tag of a described dtype: fp32, fp16 or bf16, else "mixed"."""
    by_name = {DTYPES[key][1]: tag for key, tag in PRECISIONS.items()}
    return by_name.get(dtype, "mixed")


def _context_length(config: dict) -> int | None:
    for key in CONTEXT_LENGTH_KEYS[config["model_type"]]:
        if _is_count(config.get(key)) and config[key] > 0:
            return config[key]
    return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
