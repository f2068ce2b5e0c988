"""Text generation on Triton, written once for the gateway (Generate and ModelStreamInfer) and the
inference service (its own Generate): the tensors of a generation model, validation of the
sampling parameters, the streaming request to Triton and the parsing of its responses.

A generation model (runner/generate.py, a decoupled Triton model) takes the prompt as one BYTES
element and the sampling settings as request parameters, and answers one response per token
(`text`), then a last one with `finish_reason`, `prompt_tokens` and `completion_tokens`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from maas.common.v1 import common_pb2
from maas.inference.v1 import inference_pb2
from tritonclient.grpc import service_pb2

from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.serving import execution_limit_error

PROMPT, TEXT = "prompt", "text"
# How many tokens a response's text holds: the runner joins tokens sampled while one is sent.
TOKENS = "tokens"
FINISH_REASON, PROMPT_TOKENS, COMPLETION_TOKENS = "finish_reason", "prompt_tokens", "completion_tokens"
DEFAULT_MAX_TOKENS = 64
MAX_TOKENS = 2048
MAX_STOPS = 8
MAX_STOP_CHARS = 64
MAX_PROMPT_CHARS = 16_384
# A conversation (GenerateRequest.messages): at most this many messages, whose contents together
# are bound by MAX_PROMPT_CHARS as a prompt is.
MAX_MESSAGES = 256
CHAT_ROLES = ("system", "user", "assistant", "tool")
# The request parameter that says the prompt element is a conversation (a JSON list of
# {"role", "content"}) for the runner to render with the model's chat template.
CHAT = "chat"
# The runner starts the message of an error in the caller's input with this.
INVALID_INPUT_PREFIX = "invalid input: "
# ... and the message of a request refused because every sequence slot and the queue are taken.
BUSY_PREFIX = "model busy: "
FINISH_REASONS = {"length": inference_pb2.FINISH_REASON_LENGTH, "stop": inference_pb2.FINISH_REASON_STOP}


@dataclass(frozen=True)
class GenerationTensor:
    """One tensor of a generation model's config.pbtxt (shaped like common_pb2.TensorSpec)."""

    name: str
    datatype: int  # common_pb2.DataType
    shape: tuple[int, ...] = (1,)


GENERATION_INPUTS = (GenerationTensor(PROMPT, common_pb2.DATA_TYPE_BYTES),)
GENERATION_OUTPUTS = (
    GenerationTensor(TEXT, common_pb2.DATA_TYPE_BYTES),
    GenerationTensor(TOKENS, common_pb2.DATA_TYPE_INT64),
    GenerationTensor(FINISH_REASON, common_pb2.DATA_TYPE_BYTES),
    GenerationTensor(PROMPT_TOKENS, common_pb2.DATA_TYPE_INT64),
    GenerationTensor(COMPLETION_TOKENS, common_pb2.DATA_TYPE_INT64),
)


@dataclass(frozen=True)
class Sampling:
    """Validated sampling settings; `seed` None means random."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= MAX_TOKENS:
            raise InvalidArgument(f"max_tokens must be between 1 and {MAX_TOKENS}, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(
                f"temperature must be 0 (greedy) or more, got {self.temperature}"
            )
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be 0 (no limit) or more, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > MAX_STOPS:
            raise InvalidArgument(f"at most {MAX_STOPS} stop sequences, got {len(self.stop)}")
        for stop in self.stop:
            if not stop or len(stop) > MAX_STOP_CHARS:
                raise InvalidArgument(
                    f"stop sequences must be 1 to {MAX_STOP_CHARS} characters, got {stop[:80]!r}"
                )

    def parameters(self) -> dict[str, service_pb2.InferParameter]:
        """As request parameters of a Triton inference."""
        values = {
            "max_tokens": service_pb2.InferParameter(int64_param=self.max_tokens),
            "temperature": service_pb2.InferParameter(double_param=self.temperature),
            "top_k": service_pb2.InferParameter(int64_param=self.top_k),
            "top_p": service_pb2.InferParameter(double_param=self.top_p),
            "stop": service_pb2.InferParameter(string_param=json.dumps(list(self.stop))),
        }
        if self.seed is not None:
            values["seed"] = service_pb2.InferParameter(int64_param=self.seed)
        return values


def check_prompt(prompt: str) -> str:
    if not prompt:
        raise InvalidArgument("prompt must not be empty: generation continues a text")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"prompt must be at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}")
    return prompt


def check_messages(messages: Sequence[tuple[str, str]]) -> str:
    """A conversation as (role, content) pairs, validated, as the JSON list the runner reads."""
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgument(f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    for index, (role, _) in enumerate(messages):
        if role not in CHAT_ROLES:
            raise InvalidArgument(
                f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}, got {role[:40]!r}"
            )
    chars = sum(len(content) for _, content in messages)
    if chars > MAX_PROMPT_CHARS:
        raise InvalidArgument(
            f"the messages' contents must be at most {MAX_PROMPT_CHARS} characters together, got {chars}"
        )
    return json.dumps([{"role": role, "content": content} for role, content in messages], ensure_ascii=False)


def prompt_of_generate(request: inference_pb2.GenerateRequest) -> tuple[str, bool]:
    """The text of a GenerateRequest's prompt element, and whether it is a conversation."""
    if request.messages:
        if request.prompt:
            raise InvalidArgument("give prompt or messages, not both")
        return check_messages([(message.role, message.content) for message in request.messages]), True
    return check_prompt(request.prompt), False


def sampling_of_generate(request: inference_pb2.GenerateRequest) -> Sampling:
    return Sampling(
        max_tokens=request.max_tokens if request.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        temperature=request.temperature if request.HasField("temperature") else 1.0,
        top_k=request.top_k,
        top_p=request.top_p if request.HasField("top_p") else 1.0,
        seed=request.seed if request.HasField("seed") else None,
        stop=tuple(request.stop),
    )


# Request parameters a caller of ModelStreamInfer may set, with the field each must use.
_PARAMETER_FIELDS = {
    "max_tokens": ("int64_param",),
    "top_k": ("int64_param",),
    "seed": ("int64_param",),
    "temperature": ("double_param", "int64_param"),
    "top_p": ("double_param", "int64_param"),
    "stop": ("string_param",),
}


def generation_of_infer(request: service_pb2.ModelInferRequest) -> tuple[str, Sampling]:
    """Prompt and settings of an Open Inference Protocol request to a generation model: the
    prompt as one BYTES element named `prompt`, the settings as request parameters (`stop` a
    JSON list of strings)."""
    if [tensor.name for tensor in request.inputs] != [PROMPT] or request.inputs[0].datatype != "BYTES":
        raise InvalidArgument(f"send one input, {PROMPT!r}: BYTES, shape [1], the prompt in UTF-8")
    if list(request.inputs[0].shape) != [1]:
        raise InvalidArgument(f"input {PROMPT!r} must have shape [1], got {list(request.inputs[0].shape)}")
    if request.raw_input_contents:
        prompt_bytes = _one_bytes_element(request.raw_input_contents[0], PROMPT)
    elif len(request.inputs[0].contents.bytes_contents) == 1:
        prompt_bytes = request.inputs[0].contents.bytes_contents[0]
    else:
        raise InvalidArgument(f"input {PROMPT!r} carries no data")
    try:
        prompt = prompt_bytes.decode()
    except UnicodeDecodeError:
        raise InvalidArgument(f"input {PROMPT!r} is not UTF-8") from None
    settings = {}
    for name, parameter in request.parameters.items():
        fields = _PARAMETER_FIELDS.get(name)
        if fields is None:
            continue  # Triton's own parameters (priority, ...) pass through unchecked
        kind = parameter.WhichOneof("parameter_choice")
        if kind not in fields:
            raise InvalidArgument(f"parameter {name!r} must be of type {fields[0].removesuffix('_param')}")
        settings[name] = getattr(parameter, kind)
    if "stop" in settings:
        try:
            stop = json.loads(settings["stop"])
        except ValueError:
            stop = None
        if not isinstance(stop, list) or not all(isinstance(item, str) for item in stop):
            raise InvalidArgument('parameter "stop" must be a JSON list of strings, e.g. ["\\n\\n"]')
        settings["stop"] = tuple(stop)
    return check_prompt(prompt), Sampling(**settings)


def _one_bytes_element(raw: bytes, name: str) -> bytes:
    if len(raw) < 4 or struct.unpack_from("<I", raw)[0] != len(raw) - 4:
        raise InvalidArgument(f"tensor {name!r} must hold exactly one BYTES element")
    return raw[4:]


def stream_request(
    prompt: str, sampling: Sampling, triton_model: str, request_id: str = "", chat: bool = False
) -> service_pb2.ModelInferRequest:
    """The one request of a ModelStreamInfer to a generation model; with `chat`, the prompt is a
    conversation from check_messages."""
    request = service_pb2.ModelInferRequest(model_name=triton_model, id=request_id)
    request.inputs.add(name=PROMPT, datatype="BYTES", shape=[1])
    encoded = prompt.encode()
    request.raw_input_contents.append(struct.pack("<I", len(encoded)) + encoded)
    for name, value in sampling.parameters().items():
        request.parameters[name].CopyFrom(value)
    if chat:
        request.parameters[CHAT].string_param = "1"
    return request


class GenerationFailed(RuntimeError):
    """The model failed while generating (reported as INTERNAL)."""


def generate_response_of_stream(
    response: service_pb2.ModelStreamInferResponse, model: str, version: int
) -> inference_pb2.GenerateResponse:
    """One streamed Triton response as a GenerateResponse. An error response raises
    InvalidArgument when the caller's input is at fault (e.g. characters the model does not
    know), ResourceExhausted when the model instance is full (retry later), else GenerationFailed."""
    if response.error_message:
        if response.error_message.startswith(INVALID_INPUT_PREFIX):
            raise InvalidArgument(response.error_message.removeprefix(INVALID_INPUT_PREFIX))
        if response.error_message.startswith(BUSY_PREFIX):
            raise ResourceExhausted(response.error_message.removeprefix(BUSY_PREFIX))
        if limit_error := execution_limit_error(response.error_message):
            raise limit_error
        raise GenerationFailed(f"generation failed: {response.error_message}")
    infer = response.infer_response
    outputs = {tensor.name: infer.raw_output_contents[index] for index, tensor in enumerate(infer.outputs)}
    message = inference_pb2.GenerateResponse(model=model, version=version)
    if TEXT in outputs:
        message.text = _one_bytes_element(outputs[TEXT], TEXT).decode(errors="replace")
    if FINISH_REASON in outputs:
        reason = _one_bytes_element(outputs[FINISH_REASON], FINISH_REASON).decode()
        message.finish_reason = FINISH_REASONS.get(reason, inference_pb2.FINISH_REASON_UNSPECIFIED)
        message.completion_tokens = _int64(outputs.get(COMPLETION_TOKENS))
    # The last response counts the prompt; the imported-model runner's first text does too.
    message.prompt_tokens = _int64(outputs.get(PROMPT_TOKENS))
    return message


def streamed_tokens(response: service_pb2.ModelStreamInferResponse) -> int:
    """The tokens in a streamed response's text: its `tokens` output (a runner that predates it
    sent one per response)."""
    infer = response.infer_response
    for index, tensor in enumerate(infer.outputs):
        if tensor.name == TOKENS and index < len(infer.raw_output_contents):
            return _int64(infer.raw_output_contents[index])
    return 1 if any(tensor.name == TEXT for tensor in infer.outputs) else 0


def is_final(response: inference_pb2.GenerateResponse) -> bool:
    return response.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED


def _int64(raw: bytes | None) -> int:
    return struct.unpack("<q", raw)[0] if raw is not None and len(raw) == 8 else 0
