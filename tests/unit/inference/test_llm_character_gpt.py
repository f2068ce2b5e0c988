"""The trainer's character GPT on the continuous-batching runner: its TorchScript weights load as
a GPT-2 (erf GELU, biased head) whose logits are the module's own, greedy streams batched together
decode what the one-stream runner decodes alone, a sequence longer than the context slides on,
and what is not the trainer's GPT (a quantized one, another module) is told apart."""

from __future__ import annotations

import pytest
import torch
from maas.common.v1 import common_pb2

from services.common.serving import GENERATE
from services.inference.repository import LLM_RUNNER_FILES, RUNNER_FILES, ModelSpec, runner_files
from services.trainer.models import Exported, Gpt
from tests.unit.inference.llm_runner_support import batching, decoder, sampling
from tests.unit.inference.test_llm_batching import Recorder

CPU = torch.device("cpu")
CHARACTERS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BLOCK = 24


def scripted_gpt(path, **shape) -> torch.jit.ScriptModule:
    """A random GPT wrapped as the trainer exports it."""
    torch.manual_seed(0)
    net = Gpt(len(CHARACTERS), BLOCK, shape.get("dim", 32), shape.get("layers", 2), shape.get("heads", 4), 0.0)
    module = torch.jit.script(Exported(net, torch.nn.Identity(), torch.zeros(()), torch.ones(())).eval())
    torch.jit.save(module, str(path))
    return module


class Characters:
    """The runner's adapter of a `vocabulary` (llm.py _CharacterTokenizer), minus Triton."""

    def __init__(self) -> None:
        self.vocabulary = sampling.Vocabulary(CHARACTERS)

    def encode(self, text: str):  # type: ignore[no-untyped-def]
        return type("Encoding", (), {"ids": self.vocabulary.encode(text)})

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(CHARACTERS[token] for token in ids)


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt") / "model.pt"
    module = scripted_gpt(path)
    return module, decoder.load_character_gpt(str(path), CPU)


def test_the_weights_load_as_a_gpt2_whose_logits_are_the_modules(gpt):
    module, loaded = gpt
    assert loaded.slides and loaded.shape.context_length == BLOCK and loaded.shape.exact_gelu
    tokens = torch.randint(0, len(CHARACTERS), (3, BLOCK))
    cache = decoder.KVCache(loaded.shape, 3, BLOCK, torch.float32, CPU)
    ours = loaded.decoder.forward(tokens, torch.arange(3), torch.zeros(3, dtype=torch.long), cache)
    with torch.no_grad():
        theirs = module(tokens)[:, -1]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def scheduler_of(loaded, slots: int = 4) -> batching.Scheduler:
    cache = decoder.KVCache(loaded.shape, slots, BLOCK, torch.float32, CPU)
    return batching.Scheduler(loaded.decoder, cache, Characters(), set(), 16, slides=loaded.slides)


def run(scheduler: batching.Scheduler, prompts: list[str], max_tokens: int) -> list[Recorder]:
    streams = [Recorder() for _ in prompts]
    for prompt, stream in zip(prompts, streams, strict=True):
        scheduler.submit(Characters().encode(prompt).ids, sampling.Settings(max_tokens=max_tokens, temperature=0), stream)
    scheduler.start()
    try:
        return [stream.wait() for stream in streams]
    finally:
        scheduler.stop()


def test_batched_greedy_streams_decode_what_the_one_stream_runner_does_alone(gpt):
    module, loaded = gpt
    prompts = ["ROMEO:\n", "To be, or not", "O"]
    streams = run(scheduler_of(loaded), prompts, max_tokens=8)  # within the context: no sliding
    vocabulary = sampling.Vocabulary(CHARACTERS)
    for prompt, stream in zip(prompts, streams, strict=True):
        alone = "".join(step.text for step in sampling.generate(
            module, vocabulary, vocabulary.encode(prompt), sampling.Settings(max_tokens=8, temperature=0), BLOCK))
        assert stream.joined == alone and stream.final == ("length", len(prompt), 8)


def test_a_sequence_longer_than_the_context_slides_on(gpt):
    _, loaded = gpt
    long_prompt = "KING HENRY: " * 4  # longer than the context: its latest tokens prefill
    streams = run(scheduler_of(loaded), [long_prompt, "A"], max_tokens=3 * BLOCK)
    for prompt, stream in zip([long_prompt, "A"], streams, strict=True):
        assert stream.error is None and stream.final == ("length", len(prompt), 3 * BLOCK)
        assert len(stream.joined) == 3 * BLOCK


def test_a_quantized_gpt_and_other_modules_are_not_taken_for_it(tmp_path):
    float_gpt = Exported(Gpt(len(CHARACTERS), BLOCK, 32, 1, 4, 0.0), torch.nn.Identity(), torch.zeros(()),
                         torch.ones(())).eval()
    quantized = torch.ao.quantization.quantize_dynamic(float_gpt, {torch.nn.Linear}, dtype=torch.qint8)
    torch.jit.save(torch.jit.script(quantized), str(tmp_path / "int8.pt"))
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), str(tmp_path / "linear.pt"))
    for name in ("int8.pt", "linear.pt"):
        with pytest.raises(decoder.UnsupportedModel, match="not the trainer's"):
            decoder.load_character_gpt(str(tmp_path / name), CPU)


@pytest.mark.parametrize(("architecture", "precision", "continuous"), [
    ("gpt", "fp32", True), ("gpt", "fp16", True), ("gpt", "int8", False), ("", "fp32", False),
])
def test_the_trainers_gpt_gets_the_continuous_batching_runner_unless_quantized(architecture, precision, continuous):
    metadata = {"vocabulary": CHARACTERS, **({"architecture": architecture} if architecture else {})}
    spec = ModelSpec(triton_model="m", format="TORCHSCRIPT", sha256="0" * 64, signature=common_pb2.Signature(),
                     max_batch_size=0, instances=1, device="CPU", on_gpu=False, task=GENERATE,
                     runner_metadata=metadata, precision=precision)
    assert runner_files(spec) == (LLM_RUNNER_FILES if continuous else RUNNER_FILES[GENERATE])
