"""The continuous-batching scheduler (runner/batching.py) on a tiny real model, without Triton:
sequences joining between steps decode exactly what transformers' generate() gives each alone,
a cancelled one leaves and frees its slot, the queue is bounded, a seed gives the same text
whatever else is in the batch, stop sequences and max_tokens end a stream as they should, and a
step that runs past the execution limit fails every sequence in flight."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tests.unit.inference.llm_runner_support import batching, decoder, model_dir, packed, sampling

CPU = torch.device("cpu")
PROMPTS = ["ROMEO:\n", "To be, or not", "KING HENRY:\nWhat", "O", "Good morrow, sweet", "Hark!", "I pray you, sir,",
           "Now is the winter of our discontent"]


class Recorder:
    """A Stream that records what the scheduler sends; cancelled once it has `cancel_after` texts."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.texts: list[str] = []
        self.final: tuple | None = None
        self.error: str | None = None
        self.was_cancelled = False
        self.cancel_after = cancel_after
        self.done = threading.Event()

    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.texts) >= self.cancel_after

    def text(self, text: str) -> None:
        self.texts.append(text)

    def finish(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.final = (reason, prompt_tokens, completion_tokens)
        self.done.set()

    def end_cancelled(self, completion_tokens: int) -> None:
        self.was_cancelled = completion_tokens
        self.done.set()

    def fail(self, message: str) -> None:
        self.error = message
        self.done.set()

    def wait(self) -> Recorder:
        assert self.done.wait(60), "the stream never ended"
        return self

    @property
    def joined(self) -> str:
        return "".join(self.texts)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = model_dir(tmp_path_factory.mktemp("llama"), "llama")
    return directory, decoder.load(str(packed(directory)), CPU)


def tokenizer_of(loaded):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(loaded.texts[decoder.TOKENIZER_KEY])


def scheduler_of(loaded, slots=8, length=128, max_waiting=16, **options) -> batching.Scheduler:
    cache = decoder.KVCache(loaded.shape, slots, length, torch.float32, CPU)
    return batching.Scheduler(loaded.decoder, cache, tokenizer_of(loaded), {loaded.shape.vocab_size - 1},
                              max_waiting, **options)


def test_greedy_sequences_joining_at_different_steps_match_generate_alone(llama):
    from transformers import AutoModelForCausalLM

    directory, loaded = llama
    tokenizer = tokenizer_of(loaded)
    reference = AutoModelForCausalLM.from_pretrained(directory).eval()
    scheduler = scheduler_of(loaded)
    scheduler.eos_ids = {reference.config.eos_token_id}
    scheduler.start()
    streams = []
    try:
        for index, prompt in enumerate(PROMPTS):
            # Each joins a few steps after the one before, while those decode.
            deadline = time.monotonic() + 30
            while scheduler.steps < 3 * index and time.monotonic() < deadline:
                time.sleep(0.001)
            stream = Recorder()
            scheduler.submit(tokenizer.encode(prompt).ids, sampling.Settings(max_tokens=24, temperature=0), stream)
            streams.append(stream)
        for stream in streams:
            stream.wait()
    finally:
        scheduler.stop()
    assert scheduler.steps < 8 * 24  # the sequences shared their steps
    for prompt, stream in zip(PROMPTS, streams, strict=True):
        ids = tokenizer.encode(prompt).ids
        with torch.no_grad():
            generated = reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):]
        expected = tokenizer.decode(generated.tolist(), skip_special_tokens=True)
        assert stream.joined == expected, prompt
        reason = "stop" if generated[-1] == reference.config.eos_token_id else "length"
        assert stream.final == (reason, len(ids), len(generated))
    assert sorted(scheduler.free) == list(range(8))


def test_prompts_of_different_lengths_that_join_together_prefill_in_one_forward_and_match_generate(llama):
    from transformers import AutoModelForCausalLM

    directory, loaded = llama
    tokenizer = tokenizer_of(loaded)
    reference = AutoModelForCausalLM.from_pretrained(directory).eval()
    forwards = []

    def counted(function, tokens, *args):  # type: ignore[no-untyped-def]
        forwards.append(tuple(tokens.shape))
        return function(tokens, *args)

    scheduler = scheduler_of(loaded, run_step=counted)
    scheduler.eos_ids = {reference.config.eos_token_id}
    streams = [Recorder() for _ in PROMPTS]
    for prompt, stream in zip(PROMPTS, streams, strict=True):  # all queued before the thread starts
        scheduler.submit(tokenizer.encode(prompt).ids, sampling.Settings(max_tokens=12, temperature=0), stream)
    scheduler.start()
    try:
        for stream in streams:
            stream.wait()
    finally:
        scheduler.stop()
    longest = max(len(tokenizer.encode(prompt).ids) for prompt in PROMPTS)
    assert forwards[0] == (len(PROMPTS), longest)  # one prefill for all, padded to the longest
    for prompt, stream in zip(PROMPTS, streams, strict=True):
        ids = tokenizer.encode(prompt).ids
        with torch.no_grad():
            generated = reference.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
        assert stream.joined == tokenizer.decode(generated.tolist(), skip_special_tokens=True), prompt


def test_prefill_groups_sort_by_length_and_keep_within_the_token_budget():
    def sequence(length: int) -> batching.Sequence:
        return batching.Sequence(prompt=[1] * length, settings=None, stream=None, max_tokens=1, generator=None,
                                 stops=None, detokenizer=None)

    budget = batching.PREFILL_TOKENS_PER_FORWARD
    joining = [sequence(n) for n in (900, 5, 7, budget + 1, 6)]
    groups = [[len(s.prompt) for s in group] for group in batching.prefill_groups(joining)]
    # 4 x 900 padded tokens would pass the budget: 900 goes on alone, as does a prompt beyond it.
    assert groups == [[5, 6, 7], [900], [budget + 1]]


def test_a_cancelled_sequence_stops_and_frees_its_slot_for_a_waiting_one(llama):
    _, loaded = llama
    tokenizer = tokenizer_of(loaded)
    scheduler = scheduler_of(loaded, slots=1)
    scheduler.eos_ids = set()
    leaving, waiting = Recorder(cancel_after=3), Recorder()
    prompt = tokenizer.encode("ROMEO:").ids
    scheduler.submit(prompt, sampling.Settings(max_tokens=100, temperature=0), leaving)
    scheduler.submit(prompt, sampling.Settings(max_tokens=5, temperature=0), waiting)
    scheduler.start()
    try:
        assert leaving.wait().was_cancelled and leaving.final is None
        assert waiting.wait().final == ("length", len(prompt), 5)
    finally:
        scheduler.stop()
    # Checked every few milliseconds: a few more tokens at most, not the 100 asked for.
    assert 3 <= len(leaving.texts) == leaving.was_cancelled < 50
    assert scheduler.cancelled == 1 and scheduler.free == [0]


def test_the_waiting_queue_is_bounded(llama):
    _, loaded = llama
    scheduler = scheduler_of(loaded, slots=1, max_waiting=2)  # not started: nothing leaves the queue
    for _ in range(2):
        scheduler.submit([1, 2, 3], sampling.Settings(), Recorder())
    with pytest.raises(batching.Busy, match="all 1 sequences .* in flight and 2 requests wait"):
        scheduler.submit([1, 2, 3], sampling.Settings(), Recorder())


def test_prompts_that_do_not_fit_a_slot_are_invalid_input(llama):
    _, loaded = llama
    scheduler = scheduler_of(loaded, length=16)
    with pytest.raises(batching.InvalidInput, match="the prompt is 17 tokens; .* at most 16 tokens"):
        scheduler.submit(list(range(17)), sampling.Settings(), Recorder())
    with pytest.raises(batching.InvalidInput, match="no tokens"):
        scheduler.submit([], sampling.Settings(), Recorder())


def test_a_full_slot_ends_the_stream_at_its_length(llama):
    _, loaded = llama
    scheduler = scheduler_of(loaded, slots=1, length=16)
    scheduler.eos_ids = set()
    stream = Recorder()
    scheduler.submit(list(range(10, 22)), sampling.Settings(max_tokens=100, temperature=0), stream)
    scheduler.start()
    try:
        assert stream.wait().final == ("length", 12, 5)  # 12 + 5 - 1 positions stored: the slot's 16
    finally:
        scheduler.stop()


def run_alone_and_in_a_batch(loaded, settings: sampling.Settings, others: int) -> tuple[Recorder, list[Recorder]]:
    tokenizer = tokenizer_of(loaded)
    scheduler = scheduler_of(loaded)
    scheduler.eos_ids = set()
    crowd = [Recorder() for _ in range(others)]
    for index, stream in enumerate(crowd):
        scheduler.submit(tokenizer.encode(PROMPTS[index]).ids, sampling.Settings(max_tokens=30, seed=index), stream)
    target = Recorder()
    scheduler.submit(tokenizer.encode("ROMEO:\n").ids, settings, target)
    scheduler.start()
    try:
        target.wait()
        for stream in crowd:
            stream.wait()
    finally:
        scheduler.stop()
    return target, crowd


def test_a_seed_gives_the_same_text_alone_or_in_a_batch(llama):
    _, loaded = llama
    settings = sampling.Settings(max_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    alone, _ = run_alone_and_in_a_batch(loaded, settings, others=0)
    crowded, crowd = run_alone_and_in_a_batch(loaded, settings, others=5)
    assert alone.joined == crowded.joined and alone.final == crowded.final
    other_seed, _ = run_alone_and_in_a_batch(loaded, sampling.Settings(max_tokens=20, seed=8), others=0)
    assert other_seed.joined != alone.joined
    assert len({stream.joined for stream in crowd}) == len(crowd)


def test_a_stop_sequence_cuts_the_text_before_it(llama):
    _, loaded = llama
    free, _ = run_alone_and_in_a_batch(loaded, sampling.Settings(max_tokens=30, temperature=0), others=0)
    stop = free.joined[10:13]
    assert stop and free.joined.find(stop) >= 1
    stopped, _ = run_alone_and_in_a_batch(loaded, sampling.Settings(max_tokens=30, temperature=0, stop=(stop,)),
                                          others=3)
    assert stopped.joined == free.joined[: free.joined.find(stop)]
    assert stopped.final[0] == "stop"


def test_the_detokenizer_sends_only_whole_utf8_text(llama):
    _, loaded = llama
    tokenizer = tokenizer_of(loaded)
    text = "café ☃ naïve — 日本"
    ids = tokenizer.encode(text).ids
    detokenizer = batching.Detokenizer(tokenizer, [])
    pieces = [detokenizer.add(token) for token in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces  # some characters took several byte tokens


class StepTooLong(Exception):
    pass


def test_a_step_past_the_execution_limit_fails_every_sequence(llama):
    _, loaded = llama
    calls = []

    def limited(function, *args):
        calls.append(len(args[1]))
        if len(calls) > 3:
            raise StepTooLong("execution limit exceeded: the model ran longer than 1 s")
        return function(*args)

    scheduler = scheduler_of(loaded, run_step=limited, fatal=(StepTooLong,))
    scheduler.eos_ids = set()
    streams = [Recorder() for _ in range(3)]
    for stream in streams:
        scheduler.submit([5, 6, 7], sampling.Settings(max_tokens=50), stream)
    scheduler.start()
    for stream in streams:
        assert stream.wait().error.startswith("execution limit exceeded: ")
    scheduler._thread.join(5)
    assert not scheduler._thread.is_alive()


def test_a_failing_step_fails_its_sequences_and_the_scheduler_goes_on(llama):
    _, loaded = llama
    failures = iter([True])

    def flaky(function, *args):
        if next(failures, False):
            raise RuntimeError("out of memory")
        return function(*args)

    scheduler = scheduler_of(loaded, run_step=flaky)
    scheduler.eos_ids = set()
    first, second = Recorder(), Recorder()
    scheduler.submit([5, 6, 7], sampling.Settings(max_tokens=3), first)
    scheduler.start()
    try:
        assert first.wait().error == "generation failed: out of memory"
        scheduler.submit([5, 6, 7], sampling.Settings(max_tokens=3), second)
        assert second.wait().final == ("length", 3, 3)
    finally:
        scheduler.stop()


def test_cache_size_defaults_follow_the_model_and_the_budget(llama):
    _, loaded = llama
    shape = loaded.shape  # 2 layers, 2 kv heads of 16: 512 bytes per token in float32
    per_token = shape.kv_bytes_per_token(torch.float32)
    assert per_token == 2 * 2 * 2 * 16 * 4
    size = batching.cache_size(shape, torch.float32, 1000, {})
    assert (size.slots, size.length, size.max_waiting) == (32, 256, 128)  # the model's context: 256
    tight = batching.cache_size(shape, torch.float32, 1000, {"kv_cache_bytes": str(per_token * 256 * 3)})
    assert (tight.slots, tight.length) == (3, 256)
    one = batching.cache_size(shape, torch.float32, 1000, {"kv_cache_bytes": str(per_token * 100)})
    assert (one.slots, one.length) == (1, 100)
    asked = batching.cache_size(shape, torch.float32, 1000, {"max_sequences": "4", "max_context": "64",
                                                             "max_waiting": "3"})
    assert (asked.slots, asked.length, asked.max_waiting) == (4, 64, 3)


def test_settings_that_break_sampling_fail_only_their_own_sequence(llama):
    _, loaded = llama
    scheduler = scheduler_of(loaded)
    scheduler.eos_ids = set()
    broken, fine = Recorder(), Recorder()
    scheduler.submit([5, 6, 7], sampling.Settings(max_tokens=5, temperature=1e-300, seed=1), broken)
    scheduler.submit([5, 6, 7], sampling.Settings(max_tokens=5, seed=1), fine)
    scheduler.start()
    try:
        assert broken.wait().error.startswith("invalid input: sampling failed with these settings")
        assert fine.wait().final == ("length", 3, 5)
    finally:
        scheduler.stop()
    assert sorted(scheduler.free) == list(range(8))
