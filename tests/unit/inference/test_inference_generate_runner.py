"""The generation runner (runner/generate.py) outside Triton, with a stand-in for
triton_python_backend_utils: the tokens in order (joined when sending is slower than sampling),
the final counts, cancellation, errors."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from services.common.serving import GENERATE
from services.inference.repository import RUNNER_FILES

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*")
FINAL = 1
VOCABULARY = "abcdef"


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


class Sender:
    """Records what the runner sends; reports cancelled after `cancel_after` sends."""

    def __init__(self, cancel_after: int = 0, seconds_per_send: float = 0.0) -> None:
        self.sent: list[tuple[InferenceResponse | None, int]] = []
        self.cancel_after = cancel_after
        self.seconds_per_send = seconds_per_send

    def send(self, response=None, flags: int = 0) -> None:
        time.sleep(self.seconds_per_send)
        self.sent.append((response, flags))

    def is_cancelled(self) -> bool:
        return bool(self.cancel_after) and len(self.sent) >= self.cancel_after


class Request:
    def __init__(self, prompt: str, sender: Sender, **parameters) -> None:
        self.inputs = {"prompt": Tensor("prompt", np.array([prompt.encode()], dtype=np.object_))}
        self.sender = sender
        self._parameters = json.dumps(parameters)

    def get_response_sender(self) -> Sender:
        return self.sender

    def parameters(self) -> str:
        return self._parameters


class Cycle(torch.nn.Module):
    """Always predicts the token after the last one."""

    def __init__(self) -> None:
        super().__init__()
        self.block_size = 4

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot((tokens + 1) % 6, 6).float() * 50


@pytest.fixture
def runner(monkeypatch, tmp_path: Path):
    utils = types.ModuleType("triton_python_backend_utils")
    utils.Tensor, utils.InferenceResponse, utils.TritonError = Tensor, InferenceResponse, TritonError
    utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    utils.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    monkeypatch.delitem(sys.modules, "sampling", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    version_dir = tmp_path / "1"
    version_dir.mkdir()
    for name, source in RUNNER_FILES[GENERATE].items():
        shutil.copyfile(source, version_dir / name)
    torch.jit.save(torch.jit.script(Cycle()), str(version_dir / "model.pt"))
    spec = importlib.util.spec_from_file_location("maas_generate_runner_under_test", version_dir / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    parameters = {"artifact": "model.pt", "device": "CPU", "vocabulary": json.dumps(VOCABULARY)}
    config = {"parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    model.initialize({"model_config": json.dumps(config), "model_repository": str(tmp_path), "model_version": "1"})
    return model


def texts(sender: Sender) -> str:
    return "".join(r.outputs["text"][0].decode() for r, _ in sender.sent if r is not None and "text" in r.outputs)


def tokens(sender: Sender) -> int:
    return sum(int(r.outputs["tokens"][0]) for r, _ in sender.sent if r is not None and "tokens" in r.outputs)


def test_the_tokens_in_order_then_the_counts(runner):
    sender = Sender()
    runner.execute([Request("ab", sender, max_tokens=5, temperature=0.0)])
    assert texts(sender) == "cdefa" and tokens(sender) == 5
    flags = [flags for _, flags in sender.sent]
    assert flags[-1] == FINAL and set(flags[:-1]) <= {0}
    final = sender.sent[-1][0].outputs
    assert (final["finish_reason"][0], final["prompt_tokens"][0], final["completion_tokens"][0]) == (b"length", 2, 5)


def test_tokens_sampled_while_a_response_travels_go_together_in_the_next(runner):
    # Sending takes far longer than sampling: all but the first responses carry several tokens.
    sender = Sender(seconds_per_send=0.05)
    runner.execute([Request("a", sender, max_tokens=40, temperature=0.0)])
    assert texts(sender) == ("bcdefa" * 7)[:40] and tokens(sender) == 40
    assert len(sender.sent) < 20
    *joined, (final, flags) = sender.sent
    assert [len(r.outputs["text"][0].decode()) for r, _ in joined] == [int(r.outputs["tokens"][0]) for r, _ in joined]
    # The last response carries the counts, and no text.
    assert flags == FINAL and final.outputs["completion_tokens"][0] == 40 and final.outputs["text"][0] == b""


def test_a_stop_sequence_ends_the_stream_without_emitting_it(runner):
    sender = Sender()
    runner.execute([Request("a", sender, max_tokens=20, temperature=0.0, stop=json.dumps(["de"]))])
    assert texts(sender) == "bc"
    assert sender.sent[-1][0].outputs["finish_reason"][0] == b"stop"


def test_a_cancelled_request_stops_generating(runner):
    sender = Sender(cancel_after=3)
    runner.execute([Request("a", sender, max_tokens=2000)])
    assert sender.sent[-1] == (None, FINAL) and tokens(sender) < 2000
    assert all(flags == 0 for _, flags in sender.sent[:-1])


@pytest.mark.parametrize(
    ("prompt", "parameters", "complaint"),
    [
        ("axz", {}, "characters the model does not know: 'xz'"),
        ("", {}, "the prompt is empty"),
        ("a", {"max_tokens": "many"}, "unreadable sampling parameters"),
        ("a", {"top_p": 0}, "top_p in (0, 1]"),
    ],
)
def test_bad_input_ends_the_stream_with_an_invalid_argument(runner, prompt, parameters, complaint):
    sender = Sender()
    runner.execute([Request(prompt, sender, **parameters)])
    ((response, flags),) = sender.sent
    assert flags == FINAL and response.error.code == TritonError.INVALID_ARG
    assert response.error.message.startswith("invalid input: ") and complaint in response.error.message
