"""Continuous batching of one model instance: a scheduler thread decodes every sequence in flight
together, one forward per step; new requests join between steps (their prefill runs, then they
decode with the others) and finished, stopped or cancelled ones leave at once, freeing their
cache slot for the next waiting request. Requests beyond the free slots wait in a bounded queue.

The scheduler talks to its callers through Stream objects (runner/llm.py adapts Triton's response
senders), so it runs and is tested without Triton. Ships beside llm.py: imports nothing of the
platform.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import sampling
import torch
from decoder import Decoder, KVCache

# Prompts that join together prefill in one forward, padded to the longest: at most this many
# tokens (padding included) per forward, which bounds its activations and attention mask.
PREFILL_TOKENS_PER_FORWARD = 2048
# How often each sequence asks whether its caller is still there (a round trip to Triton).
SECONDS_BETWEEN_CANCEL_CHECKS = 0.005
# The tokens before a sequence's first generated one that its detokenizer decodes with it, so
# that a tokenizer that drops a leading space at the start of a text keeps it here.
DETOKENIZER_CONTEXT = 5


class InvalidInput(Exception):
    """The request's content is at fault (the caller gets INVALID_ARGUMENT)."""


class Busy(Exception):
    """Every slot is taken and the queue of waiting requests is full."""


class Stream(Protocol):
    """Where one request's results go."""

    def cancelled(self) -> bool: ...

    def text(self, text: str) -> None:
        """One generated token's new text (empty while it is not yet whole UTF-8 or may start a stop sequence)."""

    def finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None: ...

    def end_cancelled(self, completion_tokens: int) -> None: ...

    def fail(self, message: str) -> None: ...


class Detokenizer:
    """Token ids in, whole UTF-8 text out: a token whose bytes end inside a character waits for
    the next ones."""

    def __init__(self, tokenizer, context: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(context)
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]


@dataclass(eq=False)  # each sequence is itself: found in lists by identity
class Sequence:
    prompt: list[int]  # what prefills the slot
    settings: sampling.Settings
    stream: Stream
    max_tokens: int  # the request's, cut to what the slot has room for
    generator: torch.Generator
    stops: sampling.StopMatcher
    detokenizer: Detokenizer
    slot: int = -1
    position: int = 0  # tokens of this sequence in the cache
    last_token: int = 0
    produced: int = 0
    checked: float = field(default_factory=time.monotonic)
    # A sliding scheduler's: the prompt's latest tokens and those sampled since, to refill the
    # slot from when it is full.
    history: list[int] = field(default_factory=list)
    prompt_tokens: int = 0  # of the whole prompt, as the caller is told


class Scheduler:
    """Runs `decoder` over the sequences in `cache`'s slots on a thread of its own.

    `run_step` runs each forward (a prefill or a batched decoding step) and returns its result:
    the runner passes its execution limit, which fails every sequence in flight and restarts
    the process when one step runs past the deployment's limit.

    With `slides`, a sequence is not bounded by its slot's length: a longer prompt keeps its
    latest tokens, and a sequence that fills its slot refills it with the latest half of its
    tokens and goes on (for a model whose positions are learned up to a short context)."""

    def __init__(
        self,
        decoder: Decoder,
        cache: KVCache,
        tokenizer,
        eos_ids: set[int],
        max_waiting: int,
        run_step: Callable = lambda function, *args: function(*args),
        fatal: tuple[type[BaseException], ...] = (),
        slides: bool = False,
    ) -> None:
        self.decoder = decoder
        self.slides = slides
        self.cache = cache
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_waiting = max_waiting
        self.run_step = run_step
        self.fatal = fatal
        self.free = list(range(cache.slots))
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []
        self.steps = 0  # batched decoding steps run, for tests and the benchmark
        self.cancelled = 0  # sequences stopped because their caller left
        self._condition = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()
        self._thread.join()

    def submit(self, prompt: list[int], settings: sampling.Settings, stream: Stream) -> None:
        """Queue a request; InvalidInput when it cannot fit a slot, Busy when the queue is full."""
        if not prompt:
            raise InvalidInput("the prompt encodes to no tokens")
        prompt_tokens = len(prompt)
        if self.slides:
            prompt = prompt[-self.cache.length :]
        elif len(prompt) > self.cache.length:
            raise InvalidInput(
                f"the prompt is {len(prompt)} tokens; this deployment holds at most {self.cache.length} "
                "tokens of context per sequence: send a shorter prompt"
            )
        generator = torch.Generator()
        if settings.seed is None:
            generator.seed()
        else:
            generator.manual_seed(settings.seed)
        sequence = Sequence(
            prompt=prompt,
            settings=settings,
            stream=stream,
            # The last token is sampled, never stored: a full slot still yields one more.
            max_tokens=settings.max_tokens if self.slides else min(settings.max_tokens, self.cache.length - len(prompt) + 1),
            generator=generator,
            stops=sampling.StopMatcher(settings.stop),
            detokenizer=Detokenizer(self.tokenizer, prompt[-DETOKENIZER_CONTEXT:]),
            prompt_tokens=prompt_tokens,
            history=list(prompt) if self.slides else [],
        )
        with self._condition:
            if len(self.waiting) >= self.max_waiting:
                raise Busy(
                    f"all {self.cache.slots} sequences of this model instance are in flight and "
                    f"{len(self.waiting)} requests wait: retry later or deploy more instances"
                )
            self.waiting.append(sequence)
            self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._stopping and not self.waiting and not self.active:
                    self._condition.wait()
                if self._stopping:
                    break
                joining = []
                while self.waiting and self.free:
                    sequence = self.waiting.popleft()
                    # The lowest free slot: sequences in flight keep to consecutive slots,
                    # which the decoder reads without copying.
                    sequence.slot = self.free.pop(self.free.index(min(self.free)))
                    joining.append(sequence)
            try:
                for group in prefill_groups(joining):
                    self._prefill(group)
                if self.active:
                    self._decode()
                self._drop_cancelled()
            except self.fatal as exc:
                self._fail_all(str(exc))
                return
        self._fail_all("the model is being unloaded")

    def _prefill(self, group: list[Sequence]) -> None:
        """One forward over the prompts of `group` (right-padded to the longest), then each
        samples its first token."""
        present = []
        for sequence in group:
            if sequence.stream.cancelled():  # gone while it waited
                self._leave(sequence, cancelled=True)
            else:
                present.append(sequence)
        if not present:
            return
        width = max(len(sequence.prompt) for sequence in present)
        tokens = torch.tensor([s.prompt + [0] * (width - len(s.prompt)) for s in present], device=self.decoder.device)
        lasts = [len(sequence.prompt) - 1 for sequence in present]
        try:
            logits = self.run_step(self._forward, tokens, [s.slot for s in present], [0] * len(present), lasts)
        except self.fatal:
            self.active.extend(present)  # so that their callers hear of it too
            raise
        except Exception as exc:  # noqa: BLE001 - these sequences fail, the others go on
            self._fail_each(present, exc)
            return
        for sequence, row in zip(present, logits, strict=True):
            sequence.position = len(sequence.prompt)
            self.active.append(sequence)
            self._advance(sequence, row)

    def _decode(self) -> None:
        full = [sequence for sequence in self.active if sequence.position >= self.cache.length]
        batch = sorted((s for s in self.active if s.position < self.cache.length), key=lambda s: s.slot)
        if full:
            self._slide(full)
        if not batch:
            return
        tokens = torch.tensor([[s.last_token] for s in batch], device=self.decoder.device)
        try:
            logits = self.run_step(self._forward, tokens, [s.slot for s in batch], [s.position for s in batch])
        except self.fatal:
            raise
        except Exception as exc:  # noqa: BLE001 - every sequence of the step fails, the scheduler goes on
            self._fail_each(batch, exc)
            return
        self.steps += 1
        for sequence, row in zip(batch, logits, strict=True):
            sequence.position += 1
            self._advance(sequence, row)

    def _slide(self, full: list[Sequence]) -> None:
        """Refill the full slots with the latest half of their sequences' tokens (the token
        sampled last among them): that forward gives each its next token."""
        keep = self.cache.length // 2
        tokens = torch.tensor([s.history[-keep:] for s in full], device=self.decoder.device)
        try:
            logits = self.run_step(self._forward, tokens, [s.slot for s in full], [0] * len(full))
        except self.fatal:
            raise
        except Exception as exc:  # noqa: BLE001 - these sequences fail, the scheduler goes on
            self._fail_each(full, exc)
            return
        for sequence, row in zip(full, logits, strict=True):
            sequence.position = keep
            self._advance(sequence, row)

    def _fail_each(self, sequences: list[Sequence], exc: Exception) -> None:
        """The forward these sequences were in failed: each ends with the error and leaves."""
        for sequence in sequences:
            sequence.stream.fail(f"generation failed: {exc}")
            self._leave(sequence)

    def _forward(self, tokens: torch.Tensor, slots: list[int], starts: list[int], lasts: list[int] | None = None
                 ) -> torch.Tensor:
        device = self.decoder.device
        logits = self.decoder.forward(
            tokens, torch.tensor(slots, device=device), torch.tensor(starts, device=device), self.cache,
            None if lasts is None else torch.tensor(lasts, device=device),
        )
        # Sampling runs on the CPU with each sequence's own generator: a seed gives the same
        # tokens whatever else is in the batch and whichever device decodes.
        return logits.float().cpu()

    def _advance(self, sequence: Sequence, logits: torch.Tensor) -> None:
        """Sample the sequence's next token from its logits and send what it adds."""
        try:
            token = sampling.next_token(logits, sequence.settings, sequence.generator)
        except RuntimeError as exc:  # e.g. a temperature so small that the probabilities overflow
            sequence.stream.fail(f"invalid input: sampling failed with these settings: {exc}")
            self._leave(sequence)
            return
        sequence.produced += 1
        sequence.last_token = token
        if self.slides:
            sequence.history.append(token)
            del sequence.history[: -self.cache.length]
        if token in self.eos_ids:
            self._finish(sequence, "stop")
            return
        text, stopped = sequence.stops.feed(sequence.detokenizer.add(token))
        sequence.stream.text(text)
        if stopped:
            self._finish(sequence, "stop")
        elif sequence.produced >= sequence.max_tokens:
            if held := sequence.stops.flush():
                sequence.stream.text(held)
            self._finish(sequence, "length")

    def _finish(self, sequence: Sequence, reason: str) -> None:
        sequence.stream.finish(reason, sequence.prompt_tokens, sequence.produced)
        self._leave(sequence)

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for sequence in [*self.active, *self.waiting]:
            if now - sequence.checked < SECONDS_BETWEEN_CANCEL_CHECKS:
                continue
            sequence.checked = now
            if sequence.stream.cancelled():
                self._leave(sequence, cancelled=True)

    def _leave(self, sequence: Sequence, cancelled: bool = False) -> None:
        if cancelled:
            self.cancelled += 1
            sequence.stream.end_cancelled(sequence.produced)
        with self._condition:
            if sequence in self.active:
                self.active.remove(sequence)
            elif sequence in self.waiting:
                self.waiting.remove(sequence)
            if sequence.slot >= 0:
                self.free.append(sequence.slot)
                sequence.slot = -1

    def _fail_all(self, message: str) -> None:
        with self._condition:
            everyone = [*self.active, *self.waiting]
            self.active.clear()
            self.waiting.clear()
        for sequence in everyone:
            sequence.stream.fail(message)


def prefill_groups(joining: list[Sequence]) -> list[list[Sequence]]:
    """The joining sequences in groups that prefill together: by prompt length, so that little
    is padded, each within PREFILL_TOKENS_PER_FORWARD (a longer prompt goes alone)."""
    groups: list[list[Sequence]] = []
    for sequence in sorted(joining, key=lambda s: len(s.prompt)):
        group = groups[-1] if groups else None
        if group and (len(group) + 1) * len(sequence.prompt) <= PREFILL_TOKENS_PER_FORWARD:
            group.append(sequence)
        else:
            groups.append([sequence])
    return groups


# Defaults of a deployment's cache: sequences in flight per instance, the longest context a slot
# holds (a model's own may be 32k tokens and more: few sequences would fit), and the bytes all
# slots may take, at least this floor and else as much as the weights.
DEFAULT_MAX_SEQUENCES = 32
DEFAULT_MAX_CONTEXT = 4096
MIN_KV_CACHE_BYTES = 512 * 1024 * 1024
# Requests that may wait for a slot, per slot.
WAITING_PER_SLOT = 4


@dataclass(frozen=True)
class CacheSize:
    slots: int
    length: int
    max_waiting: int


def cache_size(shape, dtype: torch.dtype, weight_bytes: int, parameters: dict[str, str]) -> CacheSize:
    """Slots and their length from the config parameters `max_sequences`, `max_context`,
    `kv_cache_bytes` and `max_waiting`, defaulted from the model's size and context length."""
    try:
        wanted = int(parameters.get("max_sequences") or DEFAULT_MAX_SEQUENCES)
        length = min(shape.context_length, int(parameters.get("max_context") or DEFAULT_MAX_CONTEXT))
        budget = int(parameters.get("kv_cache_bytes") or max(MIN_KV_CACHE_BYTES, weight_bytes))
        max_waiting = parameters.get("max_waiting")
    except ValueError as exc:
        raise ValueError(f"unreadable cache parameters: {exc}") from None
    per_token = shape.kv_bytes_per_token(dtype)
    slots = max(1, min(wanted, budget // (per_token * length)))
    length = min(length, budget // (per_token * slots))
    if length < 1:
        raise ValueError(f"a kv_cache_bytes of {budget} holds no token of this model ({per_token} bytes each)")
    return CacheSize(slots, length, int(max_waiting) if max_waiting else WAITING_PER_SLOT * slots)
