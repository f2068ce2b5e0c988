"""Token-by-token generation from a character-level language model (the trainer's GPT as
TorchScript: tokens [B, T] -> logits [B, T, V]), with temperature, top-k, top-p, a seed and stop
sequences. Plain torch: the Triton runner (runner/generate.py, which ships this file beside it)
and the in-process benchmark run exactly this code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# Intra-op threads per generating model instance. Token-by-token decoding runs many tiny ops,
# where threads only add synchronisation: measured on 2 busy cores, the trainer's GPT decodes
# ~800 tokens/s with 1 thread and 20-50 with 2. Concurrency comes from instances instead.
THREADS = 1


@dataclass(frozen=True)
class Settings:
    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def settings_of(given: dict, default_max_tokens: int) -> Settings:
    """A request's sampling parameters (strings, as Triton carries them); ValueError names what is wrong."""
    try:
        stop = json.loads(given.get("stop", "[]"))
        settings = Settings(
            max_tokens=int(given.get("max_tokens", default_max_tokens)),
            temperature=float(given.get("temperature", 1.0)),
            top_k=int(given.get("top_k", 0)),
            top_p=float(given.get("top_p", 1.0)),
            seed=int(given["seed"]) if "seed" in given else None,
            stop=tuple(str(item) for item in stop),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"unreadable sampling parameters: {exc}") from None
    # The gateway validates the ranges; internal callers of Triton are checked here too.
    if settings.max_tokens < 1 or settings.temperature < 0 or not 0 < settings.top_p <= 1:
        raise ValueError("max_tokens must be 1 or more, temperature 0 or more and top_p in (0, 1]")
    return settings


@dataclass(frozen=True)
class Step:
    """What one generated token adds to the visible text; the last step has a finish reason."""

    text: str
    finish_reason: str = ""  # "length" or "stop" on the last step
    completion_tokens: int = 0


class Vocabulary:
    def __init__(self, characters: str) -> None:
        self.characters = characters
        self.index = {character: token for token, character in enumerate(characters)}

    def encode(self, text: str) -> list[int]:
        unknown = sorted({character for character in text if character not in self.index})
        if unknown:
            raise ValueError(
                f"the prompt holds characters the model does not know: {''.join(unknown)[:40]!r}; "
                f"it knows {len(self.characters)} characters"
            )
        return [self.index[character] for character in text]


def next_token(logits: torch.Tensor, settings: Settings, generator: torch.Generator) -> int:
    """One token from the logits [V] of the last position."""
    if settings.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / settings.temperature
    if 0 < settings.top_k < logits.numel():
        kth = torch.topk(logits, settings.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(torch.softmax(ordered, dim=-1), dim=-1)
        # Drop a token when the ones before it already reach top_p; the most likely one always stays.
        drop = cumulative - torch.softmax(ordered, dim=-1) >= settings.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    # Inverse CDF: the first token whose cumulative probability passes a uniform draw below the
    # total (a token of zero probability is never the first). torch.multinomial drew the same
    # distribution at five times the cost on a CPU, a sixth of a decoding step's time at 16 streams.
    cumulative = torch.cumsum(torch.softmax(logits, dim=-1, dtype=torch.float64), dim=-1)
    if not bool(torch.isfinite(cumulative[-1])) or float(cumulative[-1]) <= 0:
        raise RuntimeError("the probabilities are not finite (a temperature so small that the logits overflow?)")
    draw = torch.rand((), generator=generator, dtype=torch.float64) * cumulative[-1]
    return int(torch.searchsorted(cumulative, draw, right=True))


class StopMatcher:
    """Holds back text that may be the start of a stop sequence, so that no part of a stop
    sequence is ever emitted."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text now safe to emit, whether a stop sequence was reached)."""
        self.held += text
        found = [self.held.find(stop) for stop in self.stops if stop in self.held]
        if found:
            emit, self.held = self.held[: min(found)], ""
            return emit, True
        keep = max((n for stop in self.stops for n in range(1, len(stop)) if self.held.endswith(stop[:n])), default=0)
        emit = self.held[: len(self.held) - keep]
        self.held = self.held[len(emit) :]
        return emit, False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def generate(
    module: torch.nn.Module,
    vocabulary: Vocabulary,
    prompt_tokens: list[int],
    settings: Settings,
    block_size: int,
    device: torch.device | None = None,
) -> Iterator[Step]:
    """One Step per generated token, then a last Step with the finish reason and token count."""
    device = device or torch.device("cpu")
    generator = torch.Generator(device=device)
    if settings.seed is None:
        generator.seed()
    else:
        generator.manual_seed(settings.seed)
    context = torch.tensor([prompt_tokens[-block_size:]], dtype=torch.long, device=device)
    stops = StopMatcher(settings.stop)
    for produced in range(1, settings.max_tokens + 1):
        with torch.inference_mode():
            logits = module(context)[0, -1]
        token = next_token(logits, settings, generator)
        text, stopped = stops.feed(vocabulary.characters[token])
        if stopped:
            if text:
                yield Step(text)
            yield Step("", "stop", produced)
            return
        yield Step(text)
        context = torch.cat([context, torch.tensor([[token]], device=device)], dim=1)[:, -block_size:]
    if held := stops.flush():
        yield Step(held)
    yield Step("", "length", settings.max_tokens)


def block_size_of(module: torch.nn.Module) -> int:
    """The longest context the model takes: the `block_size` of the module or of a submodule (the
    trainer registers the GPT wrapped as `net`), else the size of a `positions` table."""
    for part in module.modules():
        if hasattr(part, "block_size"):
            return int(part.block_size)
        if hasattr(part, "positions"):
            return int(part.positions.weight.shape[0])
    raise ValueError("the model has no block_size or positions table: its context length is unknown")
