"""`maas models import-hf` and Client.import_hf on model directories built here (no download):
a GPT-2 and a Llama pack into one safetensors file that transformers loads back to identical
logits, sharded weights (with or without their index) pack the same, a BERT encoder exports to an
ONNX embedding model; pickles, custom code, unknown architectures and broken directories are
refused with a message that says what to do."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch
from maas import hf_format
from maas.cli import _shared, app
from maas.client import Client
from maas.errors import ApiError
from maas.hf_import import EMBEDDING, GENERATION_SIGNATURE, LANGUAGE, ModelDirectoryError, inspect, prepare
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from services.common.generation import GENERATION_INPUTS, GENERATION_OUTPUTS
from services.registry.artifacts import check_safetensors
from tests.support.hf_models import CHAT_TEMPLATE, hf_model_dir

os.environ["HF_HUB_OFFLINE"] = "1"
TOKENS = torch.tensor([[5, 17, 300, 2000, 42, 7, 99, 1024]])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    parent = tmp_path_factory.mktemp("hf")
    return {family: hf_model_dir(parent, family) for family in ("gpt2", "llama")}


def copy_of(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / source.name))


def packed_tensors(directory: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    scratch = tmp_path / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    return load_file(prepare(directory, scratch).path)


def refusal(directory: Path) -> str:
    with pytest.raises(ModelDirectoryError) as refused:
        inspect(directory)
    return str(refused.value)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_packed_file_loads_back_to_identical_logits(models: dict[str, Path], tmp_path: Path, family: str) -> None:
    directory = models[family]
    prepared = prepare(directory, tmp_path)
    assert prepared.format == "safetensors" and prepared.kind == LANGUAGE and prepared.precision == "fp32"
    assert prepared.signature == GENERATION_SIGNATURE
    header, _ = hf_format.read_header(prepared.path)
    texts = header["__metadata__"]
    assert texts[hf_format.CHAT_TEMPLATE_KEY] == CHAT_TEMPLATE
    assert texts[hf_format.TOKENIZER_KEY] == (directory / "tokenizer.json").read_text()
    config = json.loads(texts[hf_format.CONFIG_KEY])

    original = AutoModelForCausalLM.from_pretrained(directory).eval()
    rebuilt = AutoModelForCausalLM.from_config(original.config).eval()
    missing, unexpected = rebuilt.load_state_dict(load_file(prepared.path), strict=False)
    # GPT-2 ties lm_head to the token embedding, so the file has no lm_head.weight.
    assert missing == (["lm_head.weight"] if config.get("tie_word_embeddings", True) else []) and unexpected == []
    rebuilt.tie_weights()
    with torch.no_grad():
        assert torch.equal(rebuilt(TOKENS).logits, original(TOKENS).logits)
    parameters = sum(p.numel() for p in original.state_dict().values() if p.data_ptr()) - (
        original.lm_head.weight.numel() if missing else 0)
    assert prepared.metadata == {
        "architecture": config["architectures"][0], "model_type": family, "parameters": str(parameters),
        "context_length": "256", "dtype": "float32", "task": LANGUAGE,
    }
    # What the registry derives from the uploaded file is what the client said.
    assert {**check_safetensors(prepared.path)} == prepared.metadata


def test_shards_pack_the_same_with_or_without_their_index(models: dict[str, Path], tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(models["llama"]).save_pretrained(sharded, max_shard_size="300KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(models["llama"] / name, sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").is_file()
    whole = packed_tensors(models["llama"], tmp_path / "whole")
    with_index = packed_tensors(sharded, tmp_path / "with-index")
    (sharded / "model.safetensors.index.json").unlink()
    without_index = packed_tensors(sharded, tmp_path / "without-index")
    for packed in (with_index, without_index):
        assert packed.keys() == whole.keys()
        assert all(torch.equal(packed[name], whole[name]) for name in whole)


def test_a_shard_missing_or_disagreeing_with_the_index_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    directory = copy_of(models["gpt2"], tmp_path)
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"transformer.wte.weight": "model-00002-of-00002.safetensors"}}))
    assert "shard model-00002-of-00002.safetensors that model.safetensors.index.json names is missing" in refusal(directory)
    index.write_text(json.dumps({"weight_map": {"transformer.nope.weight": "model.safetensors"}}))
    assert "puts the tensor 'transformer.nope.weight' in model.safetensors, but no shard holds it" in refusal(directory)
    index.write_text(json.dumps({"weight_map": {"transformer.wte.weight": "model.safetensors"}}))
    assert "holds the tensor" in refusal(directory) and "does not list" in refusal(directory)
    index.write_text(json.dumps({"weight_map": {"transformer.wte.weight": "../../etc/model.safetensors"}}))
    assert "not a .safetensors file in the model directory" in refusal(directory)
    index.write_text("{nope")
    assert "model.safetensors.index.json is not JSON" in refusal(directory)


def test_the_chat_template_may_live_in_tokenizer_config(models: dict[str, Path], tmp_path: Path) -> None:
    directory = copy_of(models["gpt2"], tmp_path)
    (directory / "chat_template.jinja").unlink()
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": CHAT_TEMPLATE}))
    header, _ = hf_format.read_header(prepare(directory, tmp_path).path)
    assert header["__metadata__"][hf_format.CHAT_TEMPLATE_KEY] == CHAT_TEMPLATE


def test_pickled_weights_are_refused_naming_the_conversion(models: dict[str, Path], tmp_path: Path) -> None:
    directory = copy_of(models["gpt2"], tmp_path)
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04never unpickled")
    message = refusal(directory)
    assert "pytorch_model.bin" in message and "model.save_pretrained(dir, safe_serialization=True)" in message
    # Beside safetensors weights, a pickle is ignored, never read.
    shutil.copy(models["gpt2"] / "model.safetensors", directory)
    assert inspect(directory).kind == LANGUAGE


def test_custom_code_and_unknown_architectures_are_refused(models: dict[str, Path], tmp_path: Path) -> None:
    directory = copy_of(models["gpt2"], tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling.Evil"}}))
    assert "auto_map" in refusal(directory) and "never run" in refusal(directory)
    (directory / "config.json").write_text(json.dumps({**config, "architectures": ["MambaForCausalLM"]}))
    message = refusal(directory)
    assert "MambaForCausalLM" in message and "GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM" in message
    assert "BertModel" in message
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert "model_type 'gpt2'" in refusal(directory)


def test_broken_directories_get_clear_errors(models: dict[str, Path], tmp_path: Path) -> None:
    assert "is not a directory" in refusal(tmp_path / "nowhere")
    directory = copy_of(models["gpt2"], tmp_path)
    (directory / "tokenizer.json").unlink()
    assert "has no tokenizer.json" in refusal(directory)
    shutil.copy(models["gpt2"] / "tokenizer.json", directory)
    (directory / "tokenizer_config.json").write_text("{'eos_token': ")
    assert "tokenizer_config.json is not JSON" in refusal(directory)
    shutil.copy(models["gpt2"] / "tokenizer_config.json", directory)
    (directory / "config.json").write_text("architectures: GPT2LMHeadModel")
    assert "config.json is not JSON" in refusal(directory)
    (directory / "config.json").unlink()
    assert "has no config.json" in refusal(directory)
    shutil.copy(models["gpt2"] / "config.json", directory)
    (directory / "model.safetensors").unlink()
    assert "has no *.safetensors weights" in refusal(directory)


def test_a_shard_cut_short_is_refused_before_upload(models: dict[str, Path], tmp_path: Path) -> None:
    directory = copy_of(models["gpt2"], tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="model.safetensors is cut short"):
        prepare(directory, tmp_path)


def test_the_sdk_signature_is_the_generation_runners() -> None:
    def tensors(specs) -> list[tuple]:  # type: ignore[no-untyped-def]
        return [(spec.name, spec.datatype, list(spec.shape)) for spec in specs]

    assert tensors(GENERATION_SIGNATURE.inputs) == tensors(GENERATION_INPUTS)
    assert tensors(GENERATION_SIGNATURE.outputs) == tensors(GENERATION_OUTPUTS)


class AcceptingRegistry(registry_pb2_grpc.RegistryServiceServicer):
    """Where the gateway would be: keeps what is uploaded, answers as the registry would."""

    def __init__(self) -> None:
        self.models: set[str] = set()
        self.uploads: list[tuple[registry_pb2.VersionHeader, bytes]] = []
        self.refuse = ""  # when set, uploads are refused with this message

    def ListVersions(self, request, context):  # noqa: N802
        return registry_pb2.ListVersionsResponse()

    def DeleteModel(self, request, context):  # noqa: N802
        self.models.discard(request.name)
        return registry_pb2.DeleteModelResponse()

    def CreateModel(self, request, context):  # noqa: N802
        if request.name in self.models:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"model {request.name!r} already exists")
        self.models.add(request.name)
        return registry_pb2.CreateModelResponse(model=registry_pb2.Model(name=request.name))

    def UploadVersion(self, request_iterator, context):  # noqa: N802
        header, *chunks = list(request_iterator)
        if self.refuse:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.refuse)
        self.uploads.append((header.header, b"".join(chunk.chunk for chunk in chunks)))
        version = registry_pb2.Version(model=header.header.model, version=len(self.uploads),
                                       format=header.header.format, metadata=header.header.metadata)
        return registry_pb2.UploadVersionResponse(version=version)

    def SetAlias(self, request, context):  # noqa: N802
        return registry_pb2.SetAliasResponse(alias=registry_pb2.Alias(model=request.model, name=request.alias))


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[AcceptingRegistry, str]]:
    fake = AcceptingRegistry()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setattr(_shared.errors, "_width", 400)
    monkeypatch.setattr(_shared, "tls_ca", None)
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_client_import_hf_uploads_one_safetensors_version(registry, models: dict[str, Path], tmp_path: Path) -> None:
    fake, address = registry
    sent: list[int] = []
    with Client(address, api_key="maas_test") as client:
        version = client.import_hf(models["llama"], model="poet", alias="latest", progress=sent.append)
    (header, data), = fake.uploads
    assert header.format == registry_pb2.ARTIFACT_FORMAT_SAFETENSORS and header.signature == GENERATION_SIGNATURE
    assert header.metadata["architecture"] == "LlamaForCausalLM" and header.metadata["task"] == LANGUAGE
    assert header.precision == "fp32" and sum(sent) == len(data) == header.size_bytes
    assert fake.models == {"poet"} and version.version == 1
    path = tmp_path / "received.safetensors"
    path.write_bytes(data)
    assert check_safetensors(path)["parameters"] == header.metadata["parameters"]


def test_the_cli_imports_with_an_upload_bar_and_refuses_pickles(registry, models: dict[str, Path],
                                                                tmp_path: Path) -> None:
    fake, address = registry
    env = {"MAAS_API_KEY": "maas_test", "MAAS_GATEWAY_ADDR": address}
    result = CliRunner().invoke(app, ["models", "import-hf", str(models["gpt2"]), "--model", "poet"], env=env)
    assert result.exit_code == 0, result.output
    assert "uploading model.safetensors" in result.output
    assert "poet version 1 ready: GPT2LMHeadModel" in result.output and "context 256, float32" in result.output
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(models["gpt2"] / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    result = CliRunner().invoke(app, ["models", "import-hf", str(pickled), "--model", "poet"], env=env)
    assert result.exit_code == 1 and "import failed:" in result.output
    assert "safe_serialization=True" in result.output and len(fake.uploads) == 1


def test_a_refused_import_leaves_no_model_it_created(registry, models: dict[str, Path]) -> None:
    fake, address = registry
    fake.refuse = "the registry says no"
    with Client(address, api_key="maas_test") as client, pytest.raises(ApiError, match="the registry says no"):
        client.import_hf(models["gpt2"], model="poet")
    assert fake.models == set()
    fake.models.add("kept")  # a model that existed before the import is never deleted
    with Client(address, api_key="maas_test") as client, pytest.raises(ApiError):
        client.import_hf(models["gpt2"], model="kept")
    assert fake.models == {"kept"}


def bert_dir(parent: Path, modules: list[dict] | None = None) -> Path:
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from tests.support.hf_models import shakespeare_tokenizer

    torch.manual_seed(0)
    path = parent / "bert"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=shakespeare_tokenizer(), pad_token="<|endoftext|>",
                                        unk_token="<|endoftext|>", model_max_length=64)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    if modules is not None:
        (path / "modules.json").write_text(json.dumps(modules))
    return path


def test_a_bert_encoder_exports_to_an_onnx_embedding_model(tmp_path: Path) -> None:
    directory = bert_dir(tmp_path)
    assert inspect(directory).kind == EMBEDDING
    prepared = prepare(directory, tmp_path)
    assert prepared.format == "onnx" and prepared.kind == EMBEDDING
    # export_sentence_encoder checks the graph against sentence-transformers (max abs diff <= 1e-4).
    assert prepared.metadata["task"] == "embedding" and prepared.metadata["dimensions"] == "32"
    assert prepared.metadata["max_seq_length"] == "64" and prepared.metadata["source"] == "import-hf:bert"
    assert float(prepared.metadata["export_max_abs_diff"]) <= 1e-4


def test_a_sentence_transformers_directory_may_not_name_other_modules(tmp_path: Path) -> None:
    transformer = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
    evil = {"idx": 1, "name": "1", "path": "1_Evil", "type": "evil_package.Exfiltrate"}
    directory = bert_dir(tmp_path, [transformer, evil])
    assert "evil_package.Exfiltrate" in refusal(directory)
    (directory / "modules.json").write_text(json.dumps([{**transformer, "path": "../elsewhere"}]))
    assert "Transformer in a subfolder" in refusal(directory)


def test_a_qwen2_directory_packs_and_loads_back(models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    directory = tmp_path / "qwen2"
    config = Qwen2Config(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    original = Qwen2ForCausalLM(config).eval()
    original.save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(models["llama"] / name, directory)
    prepared = prepare(directory, tmp_path)
    assert prepared.metadata["architecture"] == "Qwen2ForCausalLM" and prepared.metadata["context_length"] == "128"
    rebuilt = Qwen2ForCausalLM(config).eval()
    rebuilt.load_state_dict(load_file(prepared.path), strict=False)
    rebuilt.tie_weights()
    with torch.no_grad():
        assert torch.equal(rebuilt(TOKENS).logits, original(TOKENS).logits)
