"""Triton's model repository on disk: one directory per deployment, written atomically.

<root>/<triton_model>/config.pbtxt
<root>/<triton_model>/1/model.py     the runner of the deployment's task (runner/model.py for tensors,
                                     runner/generate.py for text generation, runner/embed.py for embeddings,
                                     runner/llm.py for text generation from an imported safetensors model)
<root>/<triton_model>/1/*.py         modules that runner imports (runner/execution_limit.py, and runner/sampling.py
                                     for generation; decoder.py, batching.py and chat.py for imported models)
<root>/<triton_model>/1/model.pt     or model.onnx or model.safetensors: the artifact, hard-linked from the cache
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from maas.common.v1 import common_pb2

from services.common.generation import GENERATION_INPUTS, GENERATION_OUTPUTS
from services.common.serving import EMBED, GENERATE, PREDICT
from services.common.tensors import BY_PROTO

RUNNER_DIR = Path(__file__).parent / "runner"
RUNNER = RUNNER_DIR / "model.py"
# Per task: the files of its runner, by their name in the model's version directory.
# Every runner holds its model calls to the deployment's execution limit.
EXECUTION_LIMIT = {"execution_limit.py": RUNNER_DIR / "execution_limit.py"}
RUNNER_FILES = {
    PREDICT: {"model.py": RUNNER, **EXECUTION_LIMIT},
    GENERATE: {
        "model.py": RUNNER_DIR / "generate.py",
        "sampling.py": RUNNER_DIR / "sampling.py",
        **EXECUTION_LIMIT,
    },
    # Written by the embeddings work: strings in, one vector per string out.
    EMBED: {"model.py": RUNNER_DIR / "embed.py", **EXECUTION_LIMIT},
}
# Imported language models (a safetensors artifact) and the trainer's GPT: the continuous-batching decoder.
LLM_RUNNER_FILES = {
    "model.py": RUNNER_DIR / "llm.py",
    "decoder.py": RUNNER_DIR / "decoder.py",
    "batching.py": RUNNER_DIR / "batching.py",
    "chat.py": RUNNER_DIR / "chat.py",
    "sampling.py": RUNNER_DIR / "sampling.py",
    **EXECUTION_LIMIT,
}
# Per task: the version metadata its runner reads (passed as config parameters).
RUNNER_METADATA_KEYS: dict[str, tuple[str, ...]] = {PREDICT: (), GENERATE: ("vocabulary", "architecture"), EMBED: ()}
ARTIFACT_FILE = {"TORCHSCRIPT": "model.pt", "ONNX": "model.onnx", "SAFETENSORS": "model.safetensors"}
# Requests wait at most this long for others to join their batch: small, because on a
# busy server batches form anyway and on an idle one nobody should wait.
MAX_QUEUE_DELAY_MICROSECONDS = 100


@dataclass(frozen=True)
class ModelSpec:
    """Everything config.pbtxt says about one deployment."""

    triton_model: str
    format: str  # TORCHSCRIPT, ONNX or SAFETENSORS
    sha256: str
    signature: common_pb2.Signature
    max_batch_size: int
    instances: int
    device: str  # AUTO, CPU or GPU: what the deployment asked for
    on_gpu: bool  # where Triton places the instances on this host
    task: str = PREDICT
    runner_metadata: Mapping[str, str] = field(default_factory=dict)
    # Longest one request may run in the model before its process is killed.
    execution_limit_seconds: int = 30
    # How many Triton nodes run on this host and may compute at once: the cores are split
    # between them as between instances (a thread per core each would wait on each other).
    nodes_sharing_host: int = 1
    precision: str = "fp32"


def runner_files(spec: ModelSpec) -> Mapping[str, Path]:
    """The files of the deployment's runner, by their name in the version directory."""
    return LLM_RUNNER_FILES if spec.format == "SAFETENSORS" or decodes_as_gpt2(spec) else RUNNER_FILES[spec.task]


def decodes_as_gpt2(spec: ModelSpec) -> bool:
    """The trainer's character GPT is a GPT-2 the continuous-batching runner loads from its
    TorchScript weights; a quantized one (packed int8 weights) and other TorchScript language
    models run on the one-stream runner, which runs the module itself."""
    return spec.task == GENERATE and spec.runner_metadata.get("architecture") == "gpt" and spec.precision != "int8"


def signature_json(signature: common_pb2.Signature) -> str:
    """The signature as the runner reads it: names and datatypes in the model's order."""

    def specs(tensors) -> list[dict]:
        return [
            {"name": t.name, "datatype": BY_PROTO[t.datatype].triton, "shape": list(t.shape)} for t in tensors
        ]

    return json.dumps(
        {"inputs": specs(signature.inputs), "outputs": specs(signature.outputs)}, separators=(",", ":")
    )


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensor_block(tensors) -> list[str]:
    lines = []
    for index, tensor in enumerate(tensors):
        lines += [
            "  {",
            f"    name: {_quoted(tensor.name)}",
            f"    data_type: {BY_PROTO[tensor.datatype].config}",
        ]
        if tensor.shape:
            lines.append(f"    dims: [ {', '.join(str(d) for d in tensor.shape)} ]")
        else:
            # Triton wants at least one dim: a scalar per sample travels as [1] and is reshaped.
            lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
        lines.append("  }," if index < len(tensors) - 1 else "  }")
    return lines


def config_text(spec: ModelSpec) -> str:
    """config.pbtxt for one deployment: its task's tensors and transaction policy, batching,
    instances and the runner's parameters."""
    parameters = {
        "artifact": ARTIFACT_FILE[spec.format],
        "format": spec.format,
        "sha256": spec.sha256,
        "device": spec.device,
        "signature": signature_json(spec.signature),
        "execution_limit_seconds": str(spec.execution_limit_seconds),
        "nodes_sharing_host": str(spec.nodes_sharing_host),
        # JSON, so that characters such as a newline survive the text format.
        **{key: json.dumps(value) for key, value in sorted(spec.runner_metadata.items())},
    }
    generating = spec.task == GENERATE
    inputs, outputs = (
        (GENERATION_INPUTS, GENERATION_OUTPUTS) if generating else (spec.signature.inputs, spec.signature.outputs)
    )
    if generating:
        # One stream per request, answered token by token: nothing for Triton to batch (the
        # runner of imported models batches the streams in flight itself).
        policy = ["model_transaction_policy {", "  decoupled: true", "}"]
    else:
        policy = ["dynamic_batching {", f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_MICROSECONDS}", "}"]
    lines = [
        f"name: {_quoted(spec.triton_model)}",
        'backend: "python"',
        f"max_batch_size: {0 if generating else spec.max_batch_size}",
        "input [",
        *_tensor_block(inputs),
        "]",
        "output [",
        *_tensor_block(outputs),
        "]",
        "instance_group [",
        "  {",
        f"    count: {spec.instances}",
        f"    kind: {'KIND_GPU' if spec.on_gpu else 'KIND_CPU'}",
        "  }",
        "]",
        *policy,
    ]
    for key, value in parameters.items():
        lines += [
            "parameters: {",
            f"  key: {_quoted(key)}",
            f"  value: {{ string_value: {_quoted(value)} }}",
            "}",
        ]
    return "\n".join(lines) + "\n"


class ModelRepository:
    """Model directories under `root`; new ones are built in `staging` (same file system) and renamed in."""

    def __init__(self, root: Path, staging: Path) -> None:
        self.root = root
        self.staging = staging
        root.mkdir(parents=True, exist_ok=True)
        staging.mkdir(parents=True, exist_ok=True)

    def path(self, triton_model: str) -> Path:
        return self.root / triton_model

    def write(self, spec: ModelSpec, artifact: Path) -> bool:
        """Write the model directory; returns False when it already holds exactly this spec."""
        config = config_text(spec)
        runner = runner_files(spec)
        target = self.path(spec.triton_model)
        if self._holds(target, config, runner, ARTIFACT_FILE[spec.format]):
            return False
        build = self.staging / f"{spec.triton_model}-{uuid.uuid4().hex[:8]}"
        try:
            version_dir = build / "1"
            version_dir.mkdir(parents=True)
            for name, source in runner.items():
                shutil.copyfile(source, version_dir / name)
            _link_or_copy(artifact, version_dir / ARTIFACT_FILE[spec.format])
            (build / "config.pbtxt").write_text(config)
            # A directory cannot be renamed over a non-empty one: move the old one aside first.
            if target.exists():
                retired = self.staging / f"retired-{spec.triton_model}-{uuid.uuid4().hex[:8]}"
                target.rename(retired)
                build.rename(target)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                build.rename(target)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        return True

    def touch(self, triton_model: str) -> None:
        """Mark the model's files as changed, so that Triton's next load starts its instances
        anew (a touched config.pbtxt alone only re-reads the config)."""
        (self.path(triton_model) / "1" / "model.py").touch()

    def remove(self, triton_model: str) -> None:
        shutil.rmtree(self.path(triton_model), ignore_errors=True)

    def names(self) -> set[str]:
        return {entry.name for entry in self.root.iterdir() if entry.is_dir()}

    def clear_staging(self) -> None:
        """Leftovers of writes that a crash interrupted."""
        for entry in self.staging.iterdir():
            shutil.rmtree(entry, ignore_errors=True)

    @staticmethod
    def _holds(target: Path, config: str, runner: Mapping[str, Path], artifact_file: str) -> bool:
        try:
            return (
                (target / "config.pbtxt").read_text() == config
                and all((target / "1" / name).read_bytes() == source.read_bytes() for name, source in runner.items())
                and (target / "1" / artifact_file).is_file()
            )
        except OSError:
            return False


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)
