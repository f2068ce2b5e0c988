"""A SAFETENSORS version with task `language` deploys with the continuous-batching runner
(runner/llm.py and the modules it imports, the artifact as model.safetensors, a decoupled
config); a SAFETENSORS version of any other task is refused with the reason."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from maas.registry.v1 import registry_pb2
from tritonclient.grpc import model_config_pb2

from services.common.errors import FailedPrecondition
from services.common.serving import GENERATE
from services.inference.deployments import DeploymentSpec
from services.inference.repository import LLM_RUNNER_FILES
from services.inference.store import READY
from tests.unit.inference.inference_fakes import TENANT
from tests.unit.inference.test_inference_service import wait_state

SAFETENSORS = registry_pb2.ARTIFACT_FORMAT_SAFETENSORS


async def test_an_imported_language_model_deploys_with_the_batching_runner(deployments, registry, repository):
    version = registry.add("poet", 1, fmt=SAFETENSORS, artifact=b"safetensors bytes")
    version.metadata.update({"task": "language", "architecture": "GPT2LMHeadModel", "context_length": "1024"})
    created = await deployments.create(TENANT, DeploymentSpec(name="poet", model="poet", version=1))
    # The runner reads all it needs from the artifact; the architecture rides along (only the
    # trainer's "gpt" picks a runner by it).
    assert (created.task, created.format) == (GENERATE, "SAFETENSORS")
    assert created.runner_metadata == {"architecture": "GPT2LMHeadModel"}
    ready = await wait_state(deployments, "poet", READY)
    version_dir = repository.path(ready.triton_model) / "1"
    assert sorted(path.name for path in version_dir.iterdir()) == sorted([*LLM_RUNNER_FILES, "model.safetensors"])
    assert (version_dir / "model.safetensors").read_bytes() == b"safetensors bytes"
    assert "continuous batching" in (version_dir / "model.py").read_text()
    config = text_format.Parse((version_dir.parent / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.model_transaction_policy.decoupled and config.max_batch_size == 0
    assert config.parameters["artifact"].string_value == "model.safetensors"
    assert [o.name for o in config.output] == ["text", "tokens", "finish_reason", "prompt_tokens", "completion_tokens"]


async def test_a_safetensors_version_of_another_task_is_refused(deployments, registry):
    registry.add("weights", 1, fmt=SAFETENSORS)
    with pytest.raises(FailedPrecondition, match="safetensors artifact: deployments serve those as language models"):
        await deployments.create(TENANT, DeploymentSpec(name="w", model="weights", version=1))
