"""A local Hugging Face model directory turned into a registry version, on the client.

`import_hf(client, "path/to/dir", model="mine")` reads config.json and decides:

- a decoder-only language model (GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM): its
  *.safetensors weights (one file or shards), tokenizer and chat template are packed into one
  safetensors file (maas.hf_format) and uploaded as a SAFETENSORS version with the text-generation
  signature and task `language`;
- an encoder (BertModel, plain or as a sentence-transformers directory): exported to ONNX with mean
  pooling and L2 normalisation, checked against sentence-transformers (maas.pretrained), and
  uploaded as an embedding version.

Nothing is unpickled and no code of the directory runs: pickled weights (pytorch_model.bin ...) are
refused, as is a config with auto_map. The directory is checked before anything heavy is imported.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from maas import hf_format
from maas.common.v1 import common_pb2

if TYPE_CHECKING:
    from maas.client import Client
    from maas.registry.v1 import registry_pb2

LANGUAGE, EMBEDDING = "language", "embedding"
# Files torch.save / pickle write: never opened here.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"
ENCODER_ARCHITECTURES = ("BertModel",)
# The sentence-transformers modules an embedding directory may list (modules.json): the exported
# graph is exactly these, and sentence-transformers imports whatever class a module names.
SENTENCE_TRANSFORMERS_MODULES = ("Transformer", "Pooling", "Normalize")
SAFE_SERIALIZATION = "model.save_pretrained(dir, safe_serialization=True)"
# The text-generation signature (services/common/generation.py GENERATION_INPUTS/OUTPUTS; the
# SDK does not import the services, a test checks the two agree).
_BYTES, _INT64 = common_pb2.DATA_TYPE_BYTES, common_pb2.DATA_TYPE_INT64
GENERATION_SIGNATURE = common_pb2.Signature(
    inputs=[common_pb2.TensorSpec(name="prompt", datatype=_BYTES, shape=[1])],
    outputs=[
        common_pb2.TensorSpec(name="text", datatype=_BYTES, shape=[1]),
        common_pb2.TensorSpec(name="tokens", datatype=_INT64, shape=[1]),
        common_pb2.TensorSpec(name="finish_reason", datatype=_BYTES, shape=[1]),
        common_pb2.TensorSpec(name="prompt_tokens", datatype=_INT64, shape=[1]),
        common_pb2.TensorSpec(name="completion_tokens", datatype=_INT64, shape=[1]),
    ],
)


class ModelDirectoryError(ValueError):
    """The directory is not a model that can be imported; the message says what to change."""


@dataclass(frozen=True)
class ModelDirectory:
    """A checked model directory: what it is and the files to read."""

    path: Path
    kind: str  # LANGUAGE or EMBEDDING
    architecture: str
    weight_files: tuple[Path, ...]


@dataclass(frozen=True)
class PreparedVersion:
    """A file ready to upload, with its header fields."""

    path: Path
    kind: str
    format: str
    signature: common_pb2.Signature
    metadata: dict[str, str]
    precision: str
    description: str


def inspect(directory: str | Path) -> ModelDirectory:
    """Checks the directory's layout and config without loading any weights."""
    path = Path(directory)
    if not path.is_dir():
        raise ModelDirectoryError(f"{path} is not a directory: pass a Hugging Face model directory")
    config = _config(path)
    weight_files = _weight_files(path)
    if not (path / "tokenizer.json").is_file():
        raise ModelDirectoryError(
            f"{path} has no tokenizer.json: save the fast tokenizer with tokenizer.save_pretrained(dir)"
        )
    for name in ("tokenizer_config.json", "generation_config.json"):
        if (path / name).is_file():
            _json_file(path / name)
    architectures = config.get("architectures")
    architecture = architectures[0] if isinstance(architectures, list) and len(architectures) == 1 else None
    if architecture in ENCODER_ARCHITECTURES:
        _check_sentence_transformers_modules(path)
        return ModelDirectory(path, EMBEDDING, architecture, weight_files)
    if architecture not in hf_format.SUPPORTED_ARCHITECTURES:
        raise ModelDirectoryError(
            f"config.json's architectures are {str(architectures)[:200]}; importable are the language models "
            f"{', '.join(hf_format.SUPPORTED_ARCHITECTURES)} and the embedding encoders {', '.join(ENCODER_ARCHITECTURES)}"
        )
    try:
        hf_format.check_config((path / "config.json").read_text(encoding="utf-8"))
    except ValueError as error:
        raise ModelDirectoryError(str(error)) from None
    return ModelDirectory(path, LANGUAGE, architecture, weight_files)


def prepare(
    directory: str | Path, scratch: Path, log: Callable[[str], None] = lambda _: None
) -> PreparedVersion:
    """The version to upload for `directory`, written under `scratch`."""
    found = inspect(directory)
    if found.kind == EMBEDDING:
        return _prepare_embedding(found, scratch, log)
    log(f"packing {found.architecture} from {len(found.weight_files)} safetensors file(s)")
    packed = scratch / "model.safetensors"
    hf_format.pack(list(found.weight_files), hf_format.texts_of(found.path), packed)
    # The same description the registry derives from the uploaded file.
    header, data_start = hf_format.read_header(packed)
    metadata = {**hf_format.describe(header, packed.stat().st_size - data_start, packed.name), "task": LANGUAGE}
    return PreparedVersion(
        packed, LANGUAGE, "safetensors", GENERATION_SIGNATURE, metadata,
        hf_format.precision_of(metadata["dtype"]), f"language model ({found.architecture}, imported from {found.path.name})",
    )


def upload(
    client: Client,
    prepared: PreparedVersion,
    model: str,
    *,
    alias: str = "",
    progress: Callable[[int], None] | None = None,
) -> registry_pb2.Version:
    """Upload a prepared version as a new version of `model` (created if missing)."""
    from maas.errors import ApiError

    created = False
    try:
        client.create_model(model, prepared.description)
        created = True
    except ApiError as error:
        if error.code.name != "ALREADY_EXISTS":
            raise
    try:
        version = client.upload_version(
            model, prepared.path, format=prepared.format, signature=prepared.signature,
            metadata=prepared.metadata, precision=prepared.precision, progress=progress,
        )
    except ApiError:
        if created:  # the model was made for this upload alone: no empty model is left behind
            client.delete_model_if_empty(model)
        raise
    if alias:
        client.set_alias(model, alias, version.version)
    return version


def import_hf(
    client: Client,
    directory: str | Path,
    model: str,
    *,
    alias: str = "",
    log: Callable[[str], None] = lambda _: None,
    progress: Callable[[int], None] | None = None,
) -> registry_pb2.Version:
    """Check, pack or export, and upload `directory` as a new version of `model`."""
    with tempfile.TemporaryDirectory(prefix="maas-import-hf-") as scratch:
        prepared = prepare(directory, Path(scratch), log)
        return upload(client, prepared, model, alias=alias, progress=progress)


def _prepare_embedding(found: ModelDirectory, scratch: Path, log: Callable[[str], None]) -> PreparedVersion:
    from maas.pretrained import export_sentence_encoder

    # Everything is local: nothing may be fetched from a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    exported = export_sentence_encoder(found.path, scratch, log, source=f"import-hf:{found.path.name}")
    log(f"export matches sentence-transformers (max abs diff {exported.max_abs_diff:.1e})")
    return PreparedVersion(
        exported.path, EMBEDDING, "onnx", exported.signature, exported.metadata, "fp32",
        f"sentence embeddings ({found.architecture}, imported from {found.path.name})",
    )


def _config(path: Path) -> dict:
    if not (path / "config.json").is_file():
        raise ModelDirectoryError(f"{path} has no config.json: it is not a Hugging Face model directory")
    config = _json_file(path / "config.json")
    if not isinstance(config, dict):
        raise ModelDirectoryError(f"{path / 'config.json'} is not a JSON object")
    if "auto_map" in config:
        raise ModelDirectoryError(
            "config.json has auto_map: the model needs its own Python code (trust_remote_code), which is never "
            "run here; only architectures built into transformers can be imported"
        )
    return config


def _weight_files(path: Path) -> tuple[Path, ...]:
    """The safetensors files holding the weights: the index's shards, else every *.safetensors."""
    if (path / INDEX_FILE).is_file():
        index = _json_file(path / INDEX_FILE)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelDirectoryError(f"{INDEX_FILE} has no weight_map of tensor names to shard files")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            # Shards sit beside the index: a path elsewhere is not part of this directory.
            if Path(shard).name != shard or not shard.endswith(".safetensors"):
                raise ModelDirectoryError(f"{INDEX_FILE} names the shard {shard[:200]!r}, not a .safetensors file "
                                          "in the model directory")
            if not (path / shard).is_file():
                raise ModelDirectoryError(f"the shard {shard} that {INDEX_FILE} names is missing from {path}")
        _check_index_matches(path, weight_map)
        return tuple(path / shard for shard in shards)
    weights = tuple(sorted(path.glob("*.safetensors")))
    if weights:
        return weights
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelDirectoryError(
            f"{path} holds its weights as pickles ({', '.join(pickles[:5])}), which are never loaded here: "
            f"convert them to safetensors first, e.g. {SAFE_SERIALIZATION} after loading the model where you "
            "trust the file"
        )
    raise ModelDirectoryError(f"{path} has no *.safetensors weights (save them with {SAFE_SERIALIZATION})")


def _check_index_matches(path: Path, weight_map: dict[str, str]) -> None:
    """Every tensor the index names is in its shard, and the shards hold nothing else."""
    held: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        try:
            header, _ = hf_format.read_header(path / shard)
        except ValueError as error:
            raise ModelDirectoryError(str(error)) from None
        held.update({name: shard for name in header if name != "__metadata__"})
    for name, shard in sorted(weight_map.items()):
        if held.get(name) != shard:
            where = f"it is in {held[name]}" if name in held else "no shard holds it"
            raise ModelDirectoryError(f"{INDEX_FILE} puts the tensor {name[:120]!r} in {shard}, but {where}")
    if extra := sorted(set(held) - set(weight_map)):
        raise ModelDirectoryError(f"{held[extra[0]]} holds the tensor {extra[0][:120]!r}, which {INDEX_FILE} "
                                  "does not list")


def _check_sentence_transformers_modules(path: Path) -> None:
    """sentence-transformers imports the class each module of modules.json names: only its own
    Transformer (at the directory's root), Pooling and Normalize are let through."""
    if not (path / "modules.json").is_file():
        return
    modules = _json_file(path / "modules.json")
    if not isinstance(modules, list):
        raise ModelDirectoryError("modules.json is not a list of sentence-transformers modules")
    for module in modules:
        kind = module.get("type") if isinstance(module, dict) else None
        package, _, name = str(kind).rpartition(".")
        if not package.startswith("sentence_transformers.") or name not in SENTENCE_TRANSFORMERS_MODULES:
            raise ModelDirectoryError(
                f"modules.json lists the module {str(kind)[:120]!r}; an embedding model may have "
                f"sentence-transformers' {', '.join(SENTENCE_TRANSFORMERS_MODULES)} only"
            )
        if name == "Transformer" and module.get("path") != "":
            raise ModelDirectoryError("modules.json puts the Transformer in a subfolder; it must be the "
                                      "directory itself (path \"\")")


def _json_file(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:
        raise ModelDirectoryError(f"{path.name} is not JSON: {error}") from None
