"""The Triton python-backend runner of language models (a decoupled model): an imported GPT-2,
Llama or Qwen2 from the one safetensors file the registry stores (weights by their Hugging Face
names, config, tokenizer and chat template in its header), or the trainer's character GPT from its
TorchScript file (a GPT-2 by its weights, with the `vocabulary` parameter as its tokenizer and a
context that slides), decoded with continuous batching.

`execute` only reads each request and hands it to the instance's scheduler (runner/batching.py),
which decodes every sequence in flight together, one forward per step; the responses go out on a
thread of their own, each carrying the text of every token of its stream produced since the
previous one (its `tokens` output says how many), then a last one with the finish reason and the
token counts, exactly as runner/generate.py answers. A request with the parameter `chat` = "1"
holds a JSON list of messages, rendered with the model's chat template (runner/chat.py).

The deployment's execution limit holds for each step of the scheduler (one prefill, or one
batched decoding step): a step that runs past it means the instance is stuck, so every sequence
in flight fails with the execution-limit error and the process restarts. A whole stream is not
limited: its time depends on how many others share its steps, which is not the caller's doing.

Config parameters: `artifact`, `format`, `device`, `execution_limit_seconds`, `nodes_sharing_host`,
`vocabulary` (the character GPT's), and
optionally `max_sequences`, `max_context`, `kv_cache_bytes`, `max_waiting` (runner/batching.py
cache_size). Ships with decoder.py, batching.py, chat.py, sampling.py and execution_limit.py
beside it: imports nothing of the platform.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sys
import threading
import time
import types

import numpy as np
import triton_python_backend_utils as pb_utils

# The caller's mistakes start with this, so that the gateway answers INVALID_ARGUMENT.
INVALID_INPUT_PREFIX = "invalid input: "
# Every slot taken and the queue full: the caller may retry.
BUSY_PREFIX = "model busy: "
DEFAULT_MAX_TOKENS = 64
# The outbox sends in rounds, at most one per this interval. Each response costs the stub and
# Triton a round trip on the cores that decode: tokens of a stream produced in between go in one
# response, so that short steps (few streams, or a GPU) do not cost a response per token.
SECONDS_BETWEEN_ROUNDS = 0.02
# Triton is asked whether a stream's caller left every this many seconds, not every round: each
# question is a round trip per open stream (16 streams: 1,600 a second at every round).
SECONDS_BETWEEN_CANCEL_CHECKS = 0.05


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        sys.path.insert(0, version_dir)  # the modules that ship beside this file
        import batching
        import chat
        import decoder
        import execution_limit
        import sampling
        import torch
        from tokenizers import Tokenizer

        self.batching, self.chat, self.sampling = batching, chat, sampling
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        instances = sum(group.get("count", 1) for group in config.get("instance_group", [])) or 1
        # Instances and other nodes' replicas on this host share its cores (as runner/model.py).
        sharing = instances * int(parameters.get("nodes_sharing_host", "1"))
        wants_gpu = args.get("model_instance_kind") == "GPU" and parameters.get("device", "AUTO") != "CPU"
        device_id = args.get("model_instance_device_id", "0")
        device = torch.device(f"cuda:{device_id}" if wants_gpu and torch.cuda.is_available() else "cpu")
        path = os.path.join(version_dir, parameters["artifact"])

        def load():  # on the thread that decodes (ExecutionLimit.prepare says why)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // sharing))
            if parameters.get("format") == "TORCHSCRIPT":  # the trainer's character GPT
                loaded = decoder.load_character_gpt(path, device)
            else:
                loaded = decoder.load(path, device)
            size = batching.cache_size(loaded.shape, loaded.decoder.dtype, loaded.decoder.weight_bytes, parameters)
            return loaded, size, decoder.KVCache(loaded.shape, size.slots, size.length, loaded.decoder.dtype, device)

        limit = execution_limit.ExecutionLimit.from_parameters(parameters)
        loaded, size, cache = limit.prepare(load)
        if parameters.get("format") == "TORCHSCRIPT":
            self.tokenizer = _CharacterTokenizer(sampling.Vocabulary(json.loads(parameters["vocabulary"])))
        else:
            self.tokenizer = Tokenizer.from_str(loaded.texts[decoder.TOKENIZER_KEY])
        texts = loaded.texts
        self.chat_template = chat_template_of(chat, texts, decoder)
        self.outbox = _Outbox()
        self.scheduler = batching.Scheduler(
            loaded.decoder, cache, self.tokenizer, eos_ids_of(texts, decoder), size.max_waiting,
            run_step=limit.call, fatal=(execution_limit.ExecutionLimitExceeded,), slides=loaded.slides,
        )
        self.scheduler.start()

    def execute(self, requests: list) -> None:
        for request in requests:
            stream = _TritonStream(request.get_response_sender(), self.outbox)
            self.outbox.put(stream, _OPEN, None)
            try:
                tokens, settings = self._read(request)
                stream.prompt_tokens = len(tokens)
                self.scheduler.submit(tokens, settings, stream)
            except (InvalidInput, self.batching.InvalidInput, self.chat.TemplateFailed) as exc:
                stream.fail(INVALID_INPUT_PREFIX + str(exc))
            except self.batching.Busy as exc:
                stream.fail(BUSY_PREFIX + str(exc))
            except Exception as exc:  # noqa: BLE001 - every failure ends the stream with an error
                stream.fail(f"generation failed: {exc}")
        return None

    def finalize(self) -> None:
        self.scheduler.stop()
        self.outbox.close()

    def _read(self, request):
        prompt_tensor = pb_utils.get_input_tensor_by_name(request, "prompt")
        if prompt_tensor is None or prompt_tensor.as_numpy().size != 1:
            raise InvalidInput("send the prompt as one BYTES element named 'prompt'")
        prompt = prompt_tensor.as_numpy().reshape(-1)[0]
        try:
            prompt = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
        except UnicodeDecodeError:
            raise InvalidInput("the prompt is not valid UTF-8") from None
        if not prompt:
            raise InvalidInput("the prompt is empty")
        given = json.loads(request.parameters() or "{}")
        try:
            settings = self.sampling.settings_of(given, DEFAULT_MAX_TOKENS)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        if str(given.get("chat", "0")).lower() in ("1", "true"):
            if self.chat_template is None:
                raise InvalidInput(
                    "this model has no chat template: send a prompt (/v1/completions) instead of messages"
                )
            rendered = self.chat_template.render(self.chat.messages_of(prompt))
            # The template writes the special tokens (bos, turn markers) itself.
            return self.tokenizer.encode(rendered, add_special_tokens=False).ids, settings
        return self.tokenizer.encode(prompt).ids, settings


class InvalidInput(Exception):
    """The request's content is at fault."""


class _CharacterTokenizer:
    """The trainer's GPT's characters in token order (its `vocabulary` metadata), as the runner
    uses a tokenizer: a character unknown to the model is the caller's mistake."""

    def __init__(self, vocabulary) -> None:
        self.vocabulary = vocabulary

    def encode(self, text: str, add_special_tokens: bool = True) -> types.SimpleNamespace:
        try:
            return types.SimpleNamespace(ids=self.vocabulary.encode(text))
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.vocabulary.characters[token] for token in ids)


def chat_template_of(chat, texts: dict[str, str], decoder):
    """The model's chat template with its bos and eos tokens, or None when it has none."""
    source = texts.get(decoder.CHAT_TEMPLATE_KEY)
    if not source:
        return None
    tokenizer_config = json.loads(texts.get(decoder.TOKENIZER_CONFIG_KEY) or "{}")
    return chat.ChatTemplate(
        source, _token_text(tokenizer_config.get("bos_token")), _token_text(tokenizer_config.get("eos_token"))
    )


def _token_text(token) -> str:
    # tokenizer_config.json writes a special token as its text or as an AddedToken object.
    if isinstance(token, dict):
        return str(token.get("content", ""))
    return token if isinstance(token, str) else ""


def eos_ids_of(texts: dict[str, str], decoder) -> set[int]:
    """The token ids that end a generation: the config's and the generation config's eos_token_id."""
    ids: set[int] = set()
    for key in (decoder.CONFIG_KEY, decoder.GENERATION_CONFIG_KEY):
        value = json.loads(texts.get(key) or "{}").get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(item for item in value if isinstance(item, int))
    return ids


class _TritonStream:
    """A request's response sender, as the scheduler's Stream: what it sends goes through the outbox."""

    def __init__(self, sender, outbox: _Outbox) -> None:
        self.sender = sender
        self.outbox = outbox
        self.left = False  # set by the outbox, which asks Triton
        # Sent with the first text, so that a caller that leaves before the end is billed the
        # prompt's real tokens (the last response counts them too).
        self.prompt_tokens = 0
        self.answered = False  # whether its first text went (it goes at once, not with a round)

    def cancelled(self) -> bool:
        return self.left

    def text(self, text: str) -> None:
        if self.answered:
            self.outbox.put(self, _TEXT, text)
            return
        # The first text goes now, on the scheduler's thread: handing it to the outbox's thread
        # cost the caller's time to first token a thread wake-up behind the decoding one's GIL
        # (1-3 ms measured on 2 cores). Later texts follow it through the outbox, so in order.
        self.answered = True
        _send_texts(self, [text])

    def finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.outbox.put(self, _FINAL, (reason, prompt_tokens, completion_tokens))

    def end_cancelled(self, completion_tokens: int) -> None:
        # In Triton's log: how soon a caller that left stopped its decoding.
        pb_utils.Logger.log_info(f"maas: a stream's caller left; its decoding stopped after {completion_tokens} tokens")
        self.outbox.put(self, _CANCELLED, None)

    def fail(self, message: str) -> None:
        self.outbox.put(self, _ERROR, message)


_OPEN, _TEXT, _FINAL, _CANCELLED, _ERROR = range(5)


class _Outbox:
    """Sends every stream's responses on one thread, in order per stream, in rounds, and asks
    Triton in each round whether each open stream's caller is still there: round trips to Triton,
    kept off the scheduler's thread."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._open: dict[_TritonStream, None] = {}
        self._checked = 0.0  # when the open streams were last asked about
        self._thread = threading.Thread(target=self._send_all, name="responses", daemon=True)
        self._thread.start()

    def put(self, stream: _TritonStream, kind: int, payload) -> None:
        self._queue.put((stream, kind, payload))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _send_all(self) -> None:
        """Rounds: the texts of a round go together at its end, and the thread sleeps between
        rounds (a wake-up per token would cost the cores that decode); with no stream open, it
        waits for the next request."""
        pending: dict[_TritonStream, list[str]] = {}
        next_round = time.monotonic() + SECONDS_BETWEEN_ROUNDS
        while True:
            if not self._open and not pending:
                items = [self._queue.get()]
                next_round = time.monotonic() + SECONDS_BETWEEN_ROUNDS
            else:
                time.sleep(max(0.0, next_round - time.monotonic()))
                items = []
            while time.monotonic() >= next_round or not items:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item is None:
                    self._flush(pending)
                    return
                self._take(item, pending)
            if time.monotonic() < next_round:
                continue
            self._flush(pending)
            pending = {}
            started = time.monotonic()
            if started - self._checked >= SECONDS_BETWEEN_CANCEL_CHECKS:
                self._checked = started
                for stream in self._open:
                    stream.left = stream.left or stream.sender.is_cancelled()
            next_round = started + SECONDS_BETWEEN_ROUNDS

    def _take(self, item: tuple, pending: dict) -> None:
        """One item off the queue: texts wait for the round, and a stream's end goes after its texts."""
        stream, kind, payload = item
        if kind == _OPEN:
            self._open[stream] = None
        elif kind == _TEXT:
            pending.setdefault(stream, []).append(payload)
        else:
            self._open.pop(stream, None)
            self._flush({stream: pending.pop(stream)} if stream in pending else {})
            try:
                _send_last(stream.sender, kind, payload)
            except Exception:  # noqa: BLE001 - a stream Triton closed already; the others go on
                pass

    @staticmethod
    def _flush(pending: dict) -> None:
        for stream, texts in pending.items():
            _send_texts(stream, texts)


def _send_texts(stream: _TritonStream, texts: list[str]) -> None:
    """One response with the texts of `texts` tokens (and the prompt's tokens, the first time)."""
    tensors = _text_tensors(texts)
    if stream.prompt_tokens:
        tensors.append(pb_utils.Tensor("prompt_tokens", np.array([stream.prompt_tokens], dtype=np.int64)))
        stream.prompt_tokens = 0
    with contextlib.suppress(Exception):  # its caller left; the scheduler sees it cancelled
        stream.sender.send(pb_utils.InferenceResponse(output_tensors=tensors))


def _send_last(sender, kind: int, payload) -> None:
    final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    if kind == _FINAL:
        reason, prompt_tokens, completion_tokens = payload
        tensors = [
            _bytes_tensor("text", ""),
            _bytes_tensor("finish_reason", reason),
            pb_utils.Tensor("prompt_tokens", np.array([prompt_tokens], dtype=np.int64)),
            pb_utils.Tensor("completion_tokens", np.array([completion_tokens], dtype=np.int64)),
        ]
        sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=final)
    elif kind == _CANCELLED:
        sender.send(flags=final)
    else:
        code = pb_utils.TritonError.INVALID_ARG if payload.startswith(INVALID_INPUT_PREFIX) else pb_utils.TritonError.INTERNAL
        sender.send(
            pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(payload[:2000], code)),
            flags=final,
        )


def _text_tensors(texts: list[str]) -> list:
    return [
        _bytes_tensor("text", "".join(texts)),
        pb_utils.Tensor("tokens", np.array([len(texts)], dtype=np.int64)),
    ]


def _bytes_tensor(name: str, text: str):
    return pb_utils.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))
