"""SAFETENSORS uploads: a Hugging Face language model packed by maas.hf_format passes and the
registry says what it is; hostile files (lying header lengths, overlapping or runaway offsets,
custom code in the config, a file cut short ...) are refused by their header alone, with a
message naming what is wrong."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from maas import hf_format

from services.common.errors import InvalidArgument
from services.registry.artifacts import check_safetensors
from tests.support.hf_models import CHAT_TEMPLATE, shakespeare_tokenizer

VOCABULARY, HIDDEN, POSITIONS = 32, 8, 16
GPT2_CONFIG = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": VOCABULARY,
               "n_embd": HIDDEN, "n_positions": POSITIONS}


def tokenizer_text() -> str:
    return shakespeare_tokenizer().to_str()


def texts(config: dict | None = None, **changes: str) -> dict[str, str]:
    found = {hf_format.CONFIG_KEY: json.dumps(config or GPT2_CONFIG), hf_format.TOKENIZER_KEY: tokenizer_text(),
             hf_format.TOKENIZER_CONFIG_KEY: json.dumps({"eos_token": "<|im_end|>"}),
             hf_format.CHAT_TEMPLATE_KEY: CHAT_TEMPLATE, **changes}
    return {key: value for key, value in found.items() if value is not None}


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"transformer.wte.weight": rng.standard_normal((VOCABULARY, HIDDEN), dtype=np.float32),
            "transformer.wpe.weight": rng.standard_normal((POSITIONS, HIDDEN), dtype=np.float32),
            "transformer.ln_f.weight": np.ones(HIDDEN, dtype=np.float32)}


def safetensors_bytes(header: dict, data: bytes, *, length: int | None = None) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


def packed(metadata: dict[str, str] | None = None, arrays: dict[str, np.ndarray] | None = None,
           **entry_changes: dict) -> tuple[dict, bytes]:
    """A header and data as hf_format.pack writes them; entry_changes replace tensors' entries."""
    header: dict = {"__metadata__": metadata if metadata is not None else texts()}
    data, offset = b"", 0
    for name, array in (arrays or tensors()).items():
        raw = array.tobytes()
        header[name] = {"dtype": {"float32": "F32", "float16": "F16"}[str(array.dtype)], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    for name, entry in entry_changes.items():
        header[name.replace("__", ".")] = entry
    return header, data


def checked(tmp_path: Path, data: bytes) -> dict[str, str]:
    path = tmp_path / "upload.part"
    path.write_bytes(data)
    return check_safetensors(path)


def refused(tmp_path: Path, data: bytes, match: str) -> str:
    with pytest.raises(InvalidArgument, match=match) as caught:
        checked(tmp_path, data)
    assert "upload.part" not in str(caught.value), "the message names the temp file, not the artifact"
    return str(caught.value)


def test_a_packed_model_passes_and_the_registry_says_what_it_is(tmp_path: Path) -> None:
    derived = checked(tmp_path, safetensors_bytes(*packed()))
    assert derived == {"architecture": "GPT2LMHeadModel", "model_type": "gpt2",
                       "parameters": str(VOCABULARY * HIDDEN + POSITIONS * HIDDEN + HIDDEN),
                       "context_length": str(POSITIONS), "dtype": "float32", "task": "language"}


def test_the_real_pack_of_each_family_passes(tmp_path: Path) -> None:
    from tests.support.hf_models import hf_model_dir

    for family, architecture in (("gpt2", "GPT2LMHeadModel"), ("llama", "LlamaForCausalLM")):
        directory = hf_model_dir(tmp_path, family)
        destination = tmp_path / f"{family}.safetensors"
        parameters = hf_format.pack(sorted(directory.glob("*.safetensors")), hf_format.texts_of(directory),
                                    destination)
        derived = check_safetensors(destination)
        assert derived["architecture"] == architecture
        assert derived["parameters"] == str(parameters)
        assert derived["context_length"] == "256"


def test_half_precision_is_read_from_the_tensors(tmp_path: Path) -> None:
    arrays = {name: array.astype(np.float16) for name, array in tensors().items()}
    assert checked(tmp_path, safetensors_bytes(*packed(arrays=arrays)))["dtype"] == "float16"


def test_a_header_length_of_2_to_the_63_is_refused_unread(tmp_path: Path) -> None:
    header, data = packed()
    refused(tmp_path, safetensors_bytes(header, data, length=2**63), f"claims {2**63} bytes, over")


def test_a_header_longer_than_the_file_is_cut_short(tmp_path: Path) -> None:
    header, data = packed()
    refused(tmp_path, safetensors_bytes(header, b"", length=len(json.dumps(header)) + 1000), "cut short inside")


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2, 3]", b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe"])
def test_a_header_that_is_not_a_json_object_is_refused(tmp_path: Path, raw: bytes) -> None:
    refused(tmp_path, struct.pack("<Q", len(raw)) + raw, "not (JSON|a JSON object)")


def test_a_file_shorter_than_its_length_prefix_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, b"\x01\x02", "too short")


def test_overlapping_offsets_are_refused(tmp_path: Path) -> None:
    header, data = packed(transformer__ln_f__weight={"dtype": "F32", "shape": [HIDDEN], "data_offsets": [0, 4 * HIDDEN]})
    refused(tmp_path, safetensors_bytes(header, data), "overlaps the tensor before it")


def test_offsets_past_the_end_are_refused(tmp_path: Path) -> None:
    header, data = packed()
    message = refused(tmp_path, safetensors_bytes(header, data[:-10]), "is cut short")
    assert f"the file has {len(data) - 10}" in message


def test_a_gap_and_trailing_bytes_are_refused(tmp_path: Path) -> None:
    header, data = packed()
    refused(tmp_path, safetensors_bytes(header, data + b"\0" * 8), "8 bytes after its last tensor")
    end = header["transformer.ln_f.weight"]["data_offsets"][1]
    header["transformer.ln_f.weight"]["data_offsets"] = [end - 4 * HIDDEN + 4, end + 4]
    refused(tmp_path, safetensors_bytes(header, data + b"\0" * 4), "leaves a gap of 4 bytes")


@pytest.mark.parametrize(("entry", "match"), [
    ({"dtype": "F32", "shape": [HIDDEN + 1], "data_offsets": None}, "needs 36 bytes, its data_offsets span 32"),
    ({"dtype": "PICKLE", "shape": [HIDDEN], "data_offsets": None}, "unknown dtype 'PICKLE'"),
    ({"dtype": "F32", "shape": [-HIDDEN], "data_offsets": None}, "not a list of sizes"),
    ({"dtype": "F32", "shape": [True] * HIDDEN, "data_offsets": None}, "not a list of sizes"),
    ({"dtype": "F32", "shape": [HIDDEN], "data_offsets": "everything"}, "not \\[begin, end\\]"),
    ({"dtype": "F32", "shape": [HIDDEN], "data_offsets": None, "code": "import os"}, "not a dtype, shape"),
])
def test_malformed_tensor_entries_are_refused(tmp_path: Path, entry: dict, match: str) -> None:
    header, data = packed()
    if entry["data_offsets"] is None:
        entry["data_offsets"] = header["transformer.ln_f.weight"]["data_offsets"]
    header["transformer.ln_f.weight"] = entry
    refused(tmp_path, safetensors_bytes(header, data), match)


def test_a_config_with_auto_map_is_refused(tmp_path: Path) -> None:
    config = {**GPT2_CONFIG, "auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}
    refused(tmp_path, safetensors_bytes(*packed(texts(config))), "auto_map.*never run")


def test_unsupported_architectures_are_refused_naming_the_supported_ones(tmp_path: Path) -> None:
    config = {**GPT2_CONFIG, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    message = refused(tmp_path, safetensors_bytes(*packed(texts(config))), "MistralForCausalLM")
    assert "GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM" in message
    config = {**GPT2_CONFIG, "model_type": "llama"}
    refused(tmp_path, safetensors_bytes(*packed(texts(config))), "that architecture is model_type 'gpt2'")


def test_a_config_that_is_not_json_is_refused(tmp_path: Path) -> None:
    metadata = texts(**{hf_format.CONFIG_KEY: "{'architectures': ..."})
    refused(tmp_path, safetensors_bytes(*packed(metadata)), "config.json is not JSON")


def test_the_config_and_tokenizer_are_required(tmp_path: Path) -> None:
    refused(tmp_path, safetensors_bytes(*packed(texts(**{hf_format.TOKENIZER_KEY: None}))),
            "lacks tokenizer.json")
    refused(tmp_path, safetensors_bytes(*packed(texts(**{hf_format.CONFIG_KEY: None}))), "lacks config.json")
    header, data = packed()
    del header["__metadata__"]
    refused(tmp_path, safetensors_bytes(header, data), "lacks config.json and tokenizer.json")


def test_a_tokenizer_and_template_that_do_not_parse_are_refused(tmp_path: Path) -> None:
    metadata = texts(**{hf_format.TOKENIZER_KEY: json.dumps({"model": {"type": "Nonsense"}})})
    refused(tmp_path, safetensors_bytes(*packed(metadata)), "not a tokenizers tokenizer")
    metadata = texts(**{hf_format.CHAT_TEMPLATE_KEY: "{% for message in messages %}"})
    refused(tmp_path, safetensors_bytes(*packed(metadata)), "chat template .* not a Jinja template")


def test_metadata_that_is_not_strings_is_refused(tmp_path: Path) -> None:
    header, data = packed()
    header["__metadata__"]["maas.hf.config"] = GPT2_CONFIG
    refused(tmp_path, safetensors_bytes(header, data), "__metadata__ is not a map of strings")


def test_weights_of_another_model_are_refused(tmp_path: Path) -> None:
    arrays = {"model.embed_tokens.weight": tensors()["transformer.wte.weight"]}
    refused(tmp_path, safetensors_bytes(*packed(arrays=arrays)), "lacks transformer.wte.weight")
    arrays = {"transformer.wte.weight": np.zeros((VOCABULARY + 1, HIDDEN), dtype=np.float32)}
    refused(tmp_path, safetensors_bytes(*packed(arrays=arrays)), f"vocab_size {VOCABULARY}")


def test_a_file_without_tensors_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, safetensors_bytes({"__metadata__": texts()}, b""), "holds no tensors")
