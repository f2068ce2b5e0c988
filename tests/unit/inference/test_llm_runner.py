"""The imported-model runner (runner/llm.py) outside Triton, with a stand-in for
triton_python_backend_utils: `execute` returns at once and the streams answer on their own,
text in order then the counts; chat messages through the model's template; the errors a caller
gets (no chat template, a prompt that does not fit, a full queue)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from services.inference.repository import LLM_RUNNER_FILES
from tests.support.hf_models import hf_model_dir
from tests.unit.inference import test_inference_generate_runner as character
from tests.unit.inference.llm_runner_support import packed
from tests.unit.inference.test_inference_generate_runner import runner  # noqa: F401 - the character GPT's runner

FINAL = 1


class Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name = name
        self.array = array

    def as_numpy(self) -> np.ndarray:
        return self.array


class InferenceResponse:
    def __init__(self, output_tensors, error=None) -> None:
        self.outputs = {tensor.name: tensor.array for tensor in output_tensors}
        self.error = error


class TritonError:
    INVALID_ARG, INTERNAL = 3, 13

    def __init__(self, message: str, code: int = 0) -> None:
        self.message = message
        self.code = code


class Logger:
    lines: list[str] = []

    @staticmethod
    def log_info(message: str) -> None:
        Logger.lines.append(message)


class Sender:
    def __init__(self) -> None:
        self.sent: list[tuple[InferenceResponse | None, int]] = []
        self.done = threading.Event()

    def send(self, response=None, flags: int = 0) -> None:
        self.sent.append((response, flags))
        if flags == FINAL:
            self.done.set()

    def is_cancelled(self) -> bool:
        return False

    def wait(self) -> Sender:
        assert self.done.wait(60), "the stream never ended"
        return self

    @property
    def text(self) -> str:
        return "".join(r.outputs["text"][0].decode() for r, _ in self.sent if r is not None and "text" in r.outputs)

    @property
    def final(self) -> dict:
        response, flags = self.sent[-1]
        assert flags == FINAL
        return response.outputs

    @property
    def error(self) -> TritonError:
        return self.sent[-1][0].error


class Request:
    def __init__(self, prompt: str, sender: Sender, **parameters) -> None:
        self.inputs = {"prompt": Tensor("prompt", np.array([prompt.encode()], dtype=np.object_))}
        self.sender = sender
        self._parameters = json.dumps(parameters)

    def get_response_sender(self) -> Sender:
        return self.sender

    def parameters(self) -> str:
        return self._parameters


def install_backend_utils(monkeypatch) -> None:
    """The stand-in for triton_python_backend_utils that the runner imports."""
    utils = types.ModuleType("triton_python_backend_utils")
    utils.Tensor, utils.InferenceResponse, utils.TritonError = Tensor, InferenceResponse, TritonError
    utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    utils.Logger = Logger
    utils.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)


def start_runner(monkeypatch, tmp_path: Path, chat_template: bool, **parameters):
    install_backend_utils(monkeypatch)
    monkeypatch.setattr(sys, "path", list(sys.path))
    version_dir = tmp_path / "1"
    version_dir.mkdir()
    for name, source in LLM_RUNNER_FILES.items():
        shutil.copyfile(source, version_dir / name)
    packed(hf_model_dir(tmp_path, "gpt2", chat_template=chat_template), version_dir / "model.safetensors")
    spec = importlib.util.spec_from_file_location("maas_llm_runner_under_test", version_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    parameters = {"artifact": "model.safetensors", "device": "CPU", **parameters}
    config = {"parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    model.initialize({"model_config": json.dumps(config), "model_repository": str(tmp_path), "model_version": "1"})
    return model


@pytest.fixture
def llm(monkeypatch, tmp_path: Path):
    model = start_runner(monkeypatch, tmp_path, chat_template=True)
    yield model
    model.finalize()


def test_execute_hands_over_and_the_streams_answer_concurrently(llm):
    senders = [Sender() for _ in range(4)]
    started = time.monotonic()
    llm.execute([Request("ROMEO:", sender, max_tokens=12, temperature=0.0, seed=1) for sender in senders])
    assert time.monotonic() - started < 0.5  # no decoding happened in execute
    for sender in senders:
        final = sender.wait().final
        completion = int(final["completion_tokens"][0])
        sent = sum(int(r.outputs["tokens"][0]) for r, _ in sender.sent if r is not None and "tokens" in r.outputs)
        # An EOS counts as a completion token but adds no text.
        assert sent == completion or (final["finish_reason"][0] == b"stop" and sent == completion - 1)
    assert len({sender.text for sender in senders}) == 1  # greedy: the same prompt, the same text
    assert llm.scheduler.steps < 4 * 12


def test_chat_messages_are_rendered_with_the_models_template(llm):
    sender = Sender()
    messages = [{"role": "user", "content": "Who is Romeo?"}]
    llm.execute([Request(json.dumps(messages), sender, chat="1", max_tokens=4, temperature=0.0)])
    rendered = "<|im_start|>user\nWho is Romeo?<|im_end|>\n<|im_start|>assistant\n"
    prompt_tokens = int(sender.wait().final["prompt_tokens"][0])
    assert prompt_tokens == len(llm.tokenizer.encode(rendered, add_special_tokens=False).ids)
    # The first text already counts the prompt (billing a caller that leaves early); later ones do not.
    texts = [r.outputs for r, _ in sender.sent if r is not None and "tokens" in r.outputs]
    assert int(texts[0]["prompt_tokens"][0]) == prompt_tokens
    assert all("prompt_tokens" not in outputs for outputs in texts[1:])


def test_bad_requests_get_invalid_input(llm):
    too_long, bad_messages, hostile = Sender(), Sender(), Sender()
    llm.execute([
        Request("the " * 400, too_long),
        Request("not messages", bad_messages, chat="1"),
        Request('[{"role": "user", "content": 5}]', hostile, chat="1"),
    ])
    assert too_long.wait().error.message.startswith("invalid input: the prompt is ")
    assert too_long.error.code == TritonError.INVALID_ARG
    assert bad_messages.wait().error.message.startswith("invalid input: with chat=1 the prompt must be a JSON list")
    assert hostile.wait().error.code == TritonError.INVALID_ARG


def test_a_model_without_a_chat_template_refuses_messages(monkeypatch, tmp_path):
    model = start_runner(monkeypatch, tmp_path, chat_template=False)
    try:
        sender = Sender()
        model.execute([Request('[{"role": "user", "content": "hi"}]', sender, chat="1")])
        assert sender.wait().error.message == (
            "invalid input: this model has no chat template: send a prompt (/v1/completions) instead of messages"
        )
    finally:
        model.finalize()


def test_a_full_queue_says_the_model_is_busy(monkeypatch, tmp_path):
    model = start_runner(monkeypatch, tmp_path, chat_template=True, max_sequences="1", max_waiting="1")
    try:
        senders = [Sender() for _ in range(6)]
        model.execute([Request("ROMEO:", sender, max_tokens=200, temperature=0.0) for sender in senders])
        busy = [s for s in senders if s.wait().error is not None]
        assert busy and all(s.error.message.startswith("model busy: all 1 sequences") for s in busy)
        assert all(s.final["finish_reason"][0] in (b"length", b"stop") for s in senders if s not in busy)
    finally:
        model.finalize()


def test_the_character_gpts_runner_refuses_messages(runner):  # noqa: F811 - the imported fixture
    sender = character.Sender()
    runner.execute([character.Request('[{"role": "user", "content": "ab"}]', sender, chat="1")])
    response, flags = sender.sent[-1]
    assert flags == FINAL and response.error.code == character.TritonError.INVALID_ARG
    assert response.error.message == (
        "invalid input: this model has no chat template: send a prompt (/v1/completions) instead of messages"
    )


def test_a_streams_first_text_goes_at_once_and_later_texts_in_rounds(monkeypatch):
    """Time to first token waits neither for the outbox's round nor for its thread; what follows
    still goes in rounds, joined."""
    install_backend_utils(monkeypatch)
    spec = importlib.util.spec_from_file_location("maas_llm_outbox_under_test", LLM_RUNNER_FILES["model.py"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "SECONDS_BETWEEN_ROUNDS", 2.0)
    outbox = module._Outbox()
    try:
        first, second = Sender(), Sender()
        streams = [module._TritonStream(sender, outbox) for sender in (first, second)]
        for stream in streams:
            outbox.put(stream, module._OPEN, None)
        time.sleep(0.05)
        streams[0].text("a")
        # Sent by the caller's own thread (the scheduler's) before text() returns: no hand-over.
        assert len(first.sent) == 1
        streams[0].text("b")  # after the first: waits for the round
        streams[1].text("x")
        assert len(first.sent) == 1 and len(second.sent) == 1
        streams[0].text("c")
        streams[0].finish("length", 2, 3)
        streams[1].finish("stop", 2, 1)
        first.wait(), second.wait()
        texts = [r.outputs["text"][0].decode() for r, flags in first.sent if flags != FINAL]
        assert texts == ["a", "bc"] and first.text == "abc" and second.text == "x"
        assert first.final["completion_tokens"][0] == 3
    finally:
        outbox.close()

