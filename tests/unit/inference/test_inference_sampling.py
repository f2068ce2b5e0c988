"""The sampling code the generation runner and the benchmark share (runner/sampling.py)."""

from __future__ import annotations

import pytest
import torch

from services.inference.runner.sampling import (
    Settings,
    StopMatcher,
    Vocabulary,
    block_size_of,
    generate,
    next_token,
)

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5])


def draws(settings: Settings, count: int = 400) -> set[int]:
    generator = torch.Generator().manual_seed(0)
    return {next_token(LOGITS, settings, generator) for _ in range(count)}


def test_temperature_zero_is_greedy():
    assert draws(Settings(temperature=0)) == {1}


def test_draws_follow_the_probabilities_and_never_pick_an_impossible_token():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2, 0.0]))
    generator = torch.Generator().manual_seed(7)
    draws = [next_token(logits, Settings(temperature=1.0), generator) for _ in range(20_000)]
    shares = [draws.count(token) / len(draws) for token in range(4)]
    assert shares[3] == 0
    for share, expected in zip(shares[:3], (0.5, 0.3, 0.2), strict=True):
        assert abs(share - expected) < 0.015  # about 4 standard deviations at 20,000 draws
    with pytest.raises(RuntimeError, match="not finite"):
        next_token(torch.tensor([1.0, 2.0]), Settings(temperature=1e-300), generator)


def test_top_k_keeps_only_the_k_most_likely():
    assert draws(Settings(top_k=2)) == {1, 2}
    assert draws(Settings(top_k=1)) == {1}
    assert draws(Settings()) == {0, 1, 2, 3}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probabilities = torch.softmax(LOGITS, -1)  # ~ [0.09, 0.64, 0.24, 0.05]
    assert probabilities[1] < 0.7 < probabilities[1] + probabilities[2]
    assert draws(Settings(top_p=0.5)) == {1}  # the most likely one always stays
    assert draws(Settings(top_p=0.7)) == {1, 2}


def test_the_stop_matcher_never_emits_part_of_a_stop_sequence():
    matcher = StopMatcher(("END",))
    emitted = [matcher.feed(c) for c in "abEN"]
    assert "".join(text for text, _ in emitted) == "ab" and not any(stopped for _, stopped in emitted)
    assert matcher.feed("x") == ("ENx", False)  # not a stop after all: released
    assert matcher.feed("E") == ("", False)
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("D") == ("", True)


def test_the_stop_matcher_flushes_what_it_held_at_the_end():
    matcher = StopMatcher(("\n\n",))
    assert matcher.feed("a\n") == ("a", False)
    assert matcher.flush() == "\n"


class Cycle(torch.nn.Module):
    """A language model that always predicts the token after the last one (mod V)."""

    def __init__(self, vocabulary: int, block_size: int) -> None:
        super().__init__()
        self.vocabulary = vocabulary
        self.block_size = block_size
        self.seen: list[int] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.seen.append(tokens.shape[1])
        nxt = (tokens + 1) % self.vocabulary
        return torch.nn.functional.one_hot(nxt, self.vocabulary).float() * 50


VOCABULARY = Vocabulary("abcdef")


def run(settings: Settings, prompt: str = "a", block_size: int = 4) -> tuple[str, list, Cycle]:
    model = Cycle(6, block_size)
    steps = list(generate(model, VOCABULARY, VOCABULARY.encode(prompt), settings, block_size))
    return "".join(step.text for step in steps), steps, model


def test_generation_stops_at_max_tokens_and_counts_them():
    text, steps, model = run(Settings(max_tokens=8, temperature=0))
    assert text == "bcdefabc"
    assert (steps[-1].finish_reason, steps[-1].completion_tokens) == ("length", 8)
    assert max(model.seen) == 4  # the context is cropped to the block size


def test_generation_stops_before_a_stop_sequence():
    text, steps, _ = run(Settings(max_tokens=20, temperature=0, stop=("ef",)))
    assert text == "bcd"
    assert (steps[-1].finish_reason, steps[-1].completion_tokens) == ("stop", 5)


def test_the_same_seed_gives_the_same_text():
    noisy = Settings(max_tokens=30, temperature=100.0, seed=7)
    assert run(noisy)[0] == run(noisy)[0]
    assert run(noisy)[0] != run(Settings(max_tokens=30, temperature=100.0, seed=8))[0]


def test_unknown_characters_are_named():
    with pytest.raises(ValueError, match="'xz'"):
        VOCABULARY.encode("axbz")


def test_block_size_comes_from_the_model():
    assert block_size_of(Cycle(6, 9)) == 9


def test_block_size_is_found_in_a_wrapped_scripted_model():
    class Gpt(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block_size = 5

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return tokens.float()

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = Gpt()

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.net(tokens)

    assert block_size_of(torch.jit.script(Wrapped())) == 5
