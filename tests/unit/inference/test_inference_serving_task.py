"""Serving tasks: a deployment's task and precision follow its version; the model directory and
config.pbtxt follow the task; Predict refuses a generation deployment."""

from __future__ import annotations

import json

import pytest
from google.protobuf import text_format
from maas.common.v1 import common_pb2
from maas.inference.v1 import inference_pb2
from maas.registry.v1 import registry_pb2
from tritonclient.grpc import model_config_pb2

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.serving import EMBED, GENERATE, PREDICT
from services.inference.deployments import DeploymentSpec
from services.inference.repository import ModelSpec, config_text
from services.inference.servicer import deployment_message, route_message
from services.inference.store import READY
from tests.unit.inference.inference_fakes import TENANT
from tests.unit.inference.test_inference_service import predict_request, wait_state

VOCABULARY = "\n !',.ABCabc"


def gpt_signature() -> common_pb2.Signature:
    return common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="tokens", datatype=common_pb2.DATA_TYPE_INT64, shape=[-1])],
        outputs=[common_pb2.TensorSpec(name="logits", datatype=common_pb2.DATA_TYPE_FP32, shape=[-1, 12])],
    )


def add_gpt(registry, model: str = "gpt", number: int = 1, **metadata: str) -> registry_pb2.Version:
    version = registry.add(model, number, signature=gpt_signature())
    version.metadata.update({"task": "language", "vocabulary": VOCABULARY, **metadata})
    version.precision = "int8"
    return version


async def test_a_language_model_deploys_as_a_decoupled_generation_model(deployments, registry, repository):
    add_gpt(registry)
    created = await deployments.create(TENANT, DeploymentSpec(name="chat", model="gpt", version=1))
    assert (created.task, created.precision, created.runner_metadata) == (
        GENERATE,
        "int8",
        {"vocabulary": VOCABULARY},
    )
    ready = await wait_state(deployments, "chat", READY)
    assert ready.task == GENERATE  # persisted
    model_dir = repository.path(ready.triton_model)
    assert "def execute" in (model_dir / "1" / "model.py").read_text()
    assert "response_sender" in (model_dir / "1" / "model.py").read_text()
    assert "def next_token" in (model_dir / "1" / "sampling.py").read_text()
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.model_transaction_policy.decoupled and config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")
    assert [i.name for i in config.input] == ["prompt"]
    assert [o.name for o in config.output] == ["text", "tokens", "finish_reason", "prompt_tokens", "completion_tokens"]
    # The vocabulary's newline survives the text format.
    assert json.loads(config.parameters["vocabulary"].string_value) == VOCABULARY


async def test_other_versions_deploy_as_tensor_models_with_fp32_by_default(deployments, repository):
    created = await deployments.create(TENANT, DeploymentSpec(name="web", model="digits", version=1))
    assert (created.task, created.precision, created.runner_metadata) == (PREDICT, "fp32", {})
    ready = await wait_state(deployments, "web", READY)
    config = text_format.Parse(
        (repository.path(ready.triton_model) / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert config.HasField("dynamic_batching") and not config.model_transaction_policy.decoupled


async def test_predict_on_a_generation_deployment_says_to_call_generate(deployments, registry):
    add_gpt(registry)
    await deployments.create(TENANT, DeploymentSpec(name="chat", model="gpt", version=1))
    await wait_state(deployments, "chat", READY)
    with pytest.raises(FailedPrecondition, match="use Generate"):
        await deployments.serving.predict(TENANT, predict_request("chat"))


async def test_language_models_without_a_vocabulary_or_torchscript_are_refused(deployments, registry):
    version = add_gpt(registry, "novocab")
    del version.metadata["vocabulary"]
    onnx = add_gpt(registry, "onnx")
    onnx.format = registry_pb2.ARTIFACT_FORMAT_ONNX
    with pytest.raises(FailedPrecondition, match="without a `vocabulary`"):
        await deployments.create(TENANT, DeploymentSpec(name="a", model="novocab", version=1))
    with pytest.raises(FailedPrecondition, match="serves TorchScript"):
        await deployments.create(TENANT, DeploymentSpec(name="b", model="onnx", version=1))


async def test_an_update_to_another_kind_of_version_changes_the_task(deployments, registry):
    add_gpt(registry, "digits", 3)
    await deployments.create(TENANT, DeploymentSpec(name="web", model="digits", version=1))
    await wait_state(deployments, "web", READY)
    updated = await deployments.update(TENANT, DeploymentSpec(name="web", version=3), ["version"])
    assert updated.task == GENERATE and updated.runner_metadata == {"vocabulary": VOCABULARY}


async def test_a_canary_must_serve_the_same_task_and_vocabulary(deployments, registry):
    add_gpt(registry, "gpt", 1)
    add_gpt(registry, "gpt", 2, vocabulary="xyz")
    await deployments.create(TENANT, DeploymentSpec(name="chat", model="gpt", version=1))
    await wait_state(deployments, "chat", READY)
    with pytest.raises(FailedPrecondition, match="another task or vocabulary"):
        await deployments.rollouts.start_canary(TENANT, "chat", 2, 10, 0.0)


def test_embedding_models_get_their_own_runner_and_batching():
    spec = ModelSpec(
        triton_model="m_1",
        format="TORCHSCRIPT",
        sha256="ab" * 32,
        signature=gpt_signature(),
        max_batch_size=8,
        instances=1,
        device="AUTO",
        on_gpu=False,
        task=EMBED,
    )
    config = text_format.Parse(config_text(spec), model_config_pb2.ModelConfig())
    assert config.HasField("dynamic_batching") and config.max_batch_size == 8


async def test_deployments_and_routes_carry_the_task_and_precision(deployments, registry):
    add_gpt(registry)
    await deployments.create(TENANT, DeploymentSpec(name="chat", model="gpt", version=1))
    ready = await wait_state(deployments, "chat", READY)
    message = deployment_message(ready)
    assert (message.task, message.precision) == (inference_pb2.SERVING_TASK_GENERATE, "int8")
    (route,) = [route_message(route, deployments.nodes) for route in await anext(deployments.routes.watch())]
    assert route.task == inference_pb2.SERVING_TASK_GENERATE


async def test_generate_streams_from_a_generation_deployment(deployments, registry, triton):
    add_gpt(registry)
    await deployments.create(TENANT, DeploymentSpec(name="chat", model="gpt", version=1))
    await wait_state(deployments, "chat", READY)
    request = inference_pb2.GenerateRequest(deployment="chat", prompt="abc", max_tokens=3, seed=4)
    *tokens, final = [message async for message in deployments.serving.generate(TENANT, request)]
    assert [t.text for t in tokens] == ["a", "b", "c"] and (final.model, final.version) == ("gpt", 1)
    assert final.finish_reason == inference_pb2.FINISH_REASON_LENGTH and final.completion_tokens == 3
    assert triton.requests[-1].parameters["seed"].int64_param == 4
    # A conversation travels as its JSON list, flagged for the runner's chat template.
    chat = inference_pb2.GenerateRequest(deployment="chat", messages=[inference_pb2.ChatMessage(role="user", content="hi")])
    _ = [message async for message in deployments.serving.generate(TENANT, chat)]
    sent = triton.requests[-1]
    assert sent.parameters["chat"].string_param == "1"
    assert json.loads(sent.raw_input_contents[0][4:]) == [{"role": "user", "content": "hi"}]


async def test_generate_refuses_bad_prompts_and_tensor_deployments(deployments, registry):
    add_gpt(registry)
    await deployments.create(TENANT, DeploymentSpec(name="chat", model="gpt", version=1))
    await deployments.create(TENANT, DeploymentSpec(name="web", model="digits", version=1))
    await wait_state(deployments, "chat", READY)
    await wait_state(deployments, "web", READY)
    for fields, error, complaint in [
        ({"deployment": "chat", "prompt": ""}, InvalidArgument, "must not be empty"),
        ({"deployment": "chat", "prompt": "a~"}, InvalidArgument, "'~' is not known"),
        ({"deployment": "chat", "prompt": "a", "top_k": -1}, InvalidArgument, "top_k"),
        ({"deployment": "web", "prompt": "a"}, FailedPrecondition, "use Predict"),
        ({"deployment": "nope", "prompt": "a"}, NotFound, "not found"),
    ]:
        with pytest.raises(error, match=complaint):
            _ = [m async for m in deployments.serving.generate(TENANT, inference_pb2.GenerateRequest(**fields))]
