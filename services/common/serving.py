"""What a deployment answers (its serving task), as the inference service derives it from the
served version's metadata and the gateway reads it from routes; one rule for which call may
reach which task."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from maas.inference.v1 import inference_pb2

from services.common.errors import FailedPrecondition, ResourceExhausted

PREDICT, GENERATE, EMBED = "PREDICT", "GENERATE", "EMBED"
# Trailing metadata of every answer from a deployment: the version that answered it.
MODEL_VERSION_KEY = "x-maas-model-version"
# How a runner's error starts when a request ran past the deployment's execution limit
# (services/inference/runner/execution_limit.py, which cannot import this module).
EXECUTION_LIMIT_PREFIX = "execution limit exceeded: "
TASK_VALUES = {
    PREDICT: inference_pb2.SERVING_TASK_PREDICT,
    GENERATE: inference_pb2.SERVING_TASK_GENERATE,
    EMBED: inference_pb2.SERVING_TASK_EMBED,
}
# Routes from an inference service that predates tasks carry UNSPECIFIED: tensor models.
TASK_NAMES = {value: name for name, value in TASK_VALUES.items()} | {
    inference_pb2.SERVING_TASK_UNSPECIFIED: PREDICT
}
# A version's metadata `task` -> what its deployment serves; every other task is PREDICT.
TASK_OF_METADATA = {"language": GENERATE, "embedding": EMBED}
# The calls that serve each task, named in the error a caller gets for using another one.
CALLS = {
    PREDICT: "Predict or the Open Inference Protocol's ModelInfer",
    GENERATE: "Generate (`maas generate`) or the Open Inference Protocol's ModelStreamInfer",
    EMBED: "Embed",
}
# Tensor calls (Predict, ModelInfer) reach every task except decoupled generation models.
TENSOR_TASKS = (PREDICT, EMBED)


def task_of_route(value: int) -> str:
    """A Route's task enum as a task name; values this build does not know serve tensors."""
    return TASK_NAMES.get(value, PREDICT)


def task_of_metadata(metadata: Mapping[str, str]) -> str:
    return TASK_OF_METADATA.get(metadata.get("task", ""), PREDICT)


def check_task(deployment: str, task: str, allowed: Collection[str], call: str) -> None:
    """FAILED_PRECONDITION, naming the call to use, when `call` cannot serve this deployment."""
    if task not in allowed:
        raise FailedPrecondition(
            f"deployment {deployment!r} serves the {task} task, which {call} does not answer: "
            f"use {CALLS[task]}"
        )


def execution_limit_error(details: str) -> ResourceExhausted | None:
    """The error a caller gets when Triton's `details` say the model ran past its execution
    limit; None for any other error."""
    _, found, reason = details.partition(EXECUTION_LIMIT_PREFIX)
    return ResourceExhausted(f"{EXECUTION_LIMIT_PREFIX}{reason}") if found else None
