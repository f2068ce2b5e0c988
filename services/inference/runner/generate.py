"""The Triton python-backend runner of text-generation deployments (a decoupled model): the
generated tokens as they come, then a last response with the finish reason and the token counts.
Tokens are sent on a thread of their own, so that sampling goes on while a response travels;
tokens sampled meanwhile go together in the next response (its `tokens` output says how many).

Config parameters: `artifact` (the TorchScript language model beside this file), `device` and
`vocabulary` (JSON: the model's characters in token order). Each request carries the prompt
(BYTES input `prompt`) and the sampling settings as request parameters: max_tokens,
temperature, top_k, top_p, seed and stop (a JSON list of strings). The tensor and parameter
names match services/common/generation.py, which builds these requests; this file and
sampling.py are all that the model directory holds, so they import nothing of the platform.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

# The caller's mistakes start with this, so that the gateway answers INVALID_ARGUMENT.
INVALID_INPUT_PREFIX = "invalid input: "
DEFAULT_MAX_TOKENS = 64
# The least time between two responses of a stream (the first goes at once): tokens sampled in
# between go together, so that sending does not slow sampling down.
SECONDS_BETWEEN_RESPONSES = 0.002
# How often a stream asks whether its caller is still there.
SECONDS_BETWEEN_CANCEL_CHECKS = 0.005


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        sys.path.insert(0, version_dir)  # sampling.py and execution_limit.py ship beside this file
        import execution_limit
        import sampling
        import torch

        self.sampling = sampling
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        # The limit holds for a whole request: every token of one stream.
        self.limit = execution_limit.ExecutionLimit.from_parameters(parameters)
        self.limit_exceeded = execution_limit.ExecutionLimitExceeded
        torch.set_num_threads(sampling.THREADS)
        wants_gpu = args.get("model_instance_kind") == "GPU" and parameters.get("device", "AUTO") != "CPU"
        device_id = args.get("model_instance_device_id", "0")
        self.device = torch.device(f"cuda:{device_id}" if wants_gpu and torch.cuda.is_available() else "cpu")
        self.module = torch.jit.load(os.path.join(version_dir, parameters["artifact"]), map_location=self.device)
        self.module.eval()
        self.vocabulary = sampling.Vocabulary(json.loads(parameters["vocabulary"]))
        self.block_size = sampling.block_size_of(self.module)

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.limit.call(self._generate, request, sender)
            except self.limit_exceeded as exc:
                _fail(sender, str(exc), pb_utils.TritonError.INTERNAL)
                return None  # the process is about to go; Triton fails what it still holds
            except InvalidInput as exc:
                _fail(sender, INVALID_INPUT_PREFIX + str(exc), pb_utils.TritonError.INVALID_ARG)
            except Exception as exc:  # every failure ends the stream with an error, never a dead stub
                _fail(sender, f"generation failed: {exc}", pb_utils.TritonError.INTERNAL)
        return None

    def _generate(self, request, sender) -> None:
        prompt, settings = self._read(request)
        try:
            prompt_tokens = self.vocabulary.encode(prompt)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        checked = time.monotonic()
        with _Responses(sender) as responses:
            for step in self.sampling.generate(
                self.module, self.vocabulary, prompt_tokens, settings, self.block_size, self.device
            ):
                # Asking Triton is a round trip to it: every few milliseconds, not every token.
                if time.monotonic() - checked >= SECONDS_BETWEEN_CANCEL_CHECKS:
                    checked = time.monotonic()
                    if sender.is_cancelled():
                        # The client went away or its deadline passed: stop generating now.
                        responses.end()
                        return
                if step.finish_reason:
                    responses.end(
                        _bytes_tensor("finish_reason", step.finish_reason),
                        pb_utils.Tensor("prompt_tokens", np.array([len(prompt_tokens)], dtype=np.int64)),
                        pb_utils.Tensor("completion_tokens", np.array([step.completion_tokens], dtype=np.int64)),
                    )
                    return
                responses.token(step.text)

    def _read(self, request):
        prompt_tensor = pb_utils.get_input_tensor_by_name(request, "prompt")
        if prompt_tensor is None or prompt_tensor.as_numpy().size != 1:
            raise InvalidInput("send the prompt as one BYTES element named 'prompt'")
        prompt = prompt_tensor.as_numpy().reshape(-1)[0]
        prompt = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
        if not prompt:
            raise InvalidInput("the prompt is empty")
        given = json.loads(request.parameters() or "{}")
        if str(given.get("chat", "0")).lower() in ("1", "true"):
            # A character-level model has no chat template to render messages with.
            raise InvalidInput("this model has no chat template: send a prompt (/v1/completions) instead of messages")
        try:
            settings = self.sampling.settings_of(given, DEFAULT_MAX_TOKENS)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        return prompt, settings


class InvalidInput(Exception):
    """The request's content is at fault."""


class _Responses:
    """Sends a stream's responses on a thread of its own: each response carries every token
    sampled since the previous one was sent (one when sending keeps up), in order. `end` sends
    what is left with the last response and waits for it; leaving the block otherwise (an
    error) sends what is left, then lets the caller report the error."""

    def __init__(self, sender) -> None:
        self.sender = sender
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._send_all, name="responses", daemon=True)
        self._failure: BaseException | None = None

    def __enter__(self) -> _Responses:
        self._thread.start()
        return self

    def token(self, text: str) -> None:
        if self._failure is not None:
            raise self._failure
        self._queue.put(text)

    def end(self, *final) -> None:
        """The last response, with these tensors (none: the stream was cancelled)."""
        self._queue.put(_End(final))
        self._thread.join()
        if self._failure is not None:
            raise self._failure

    def __exit__(self, kind, error, traceback) -> None:
        if self._thread.is_alive():
            self._queue.put(_End((), last=False))  # the caller sends the error as the last response
            self._thread.join()

    def _send_all(self) -> None:
        sent_at = 0.0
        try:
            while True:
                texts, end = [], None
                item = self._queue.get()
                # Each response costs the stub and Triton about what a token costs to sample:
                # after one, wait a moment so that the next carries the tokens sampled meanwhile.
                time.sleep(max(0.0, sent_at + SECONDS_BETWEEN_RESPONSES - time.monotonic()))
                while True:
                    if isinstance(item, _End):
                        end = item
                        break
                    texts.append(item)
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if texts:
                    self.sender.send(pb_utils.InferenceResponse(output_tensors=_text_tensors(texts)))
                    sent_at = time.monotonic()
                if end is None:
                    continue
                # The last response carries no text, as when every response carried one token.
                final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
                if end.final:
                    tensors = [_bytes_tensor("text", ""), *end.final]
                    self.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=final)
                elif end.last:  # cancelled: the stream ends without a last response's tensors
                    self.sender.send(flags=final)
                return
        except BaseException as exc:  # noqa: BLE001 - raised again on the sampling thread
            self._failure = exc


class _End:
    """The end of a stream: the last response's tensors (none when cancelled), or, with `last`
    False, the end of the responses before an error the caller reports."""

    def __init__(self, final: tuple, last: bool = True) -> None:
        self.final = final
        self.last = last


def _text_tensors(texts: list) -> list:
    return [
        _bytes_tensor("text", "".join(texts)),
        pb_utils.Tensor("tokens", np.array([len(texts)], dtype=np.int64)),
    ]


def _bytes_tensor(name: str, text: str):
    return pb_utils.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))


def _fail(sender, message: str, code) -> None:
    sender.send(
        pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message[:2000], code)),
        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
    )
