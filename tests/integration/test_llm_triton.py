"""An imported language model served by the continuous-batching runner in the real tritonserver:
the model directory written by the repository writer, concurrent streams whose greedy text is
transformers' generate() run alone, chat messages through the model's template, an invalid
input, and a cancelled stream whose decoding stops (the runner logs after how many tokens)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from pathlib import Path

import pytest
import torch
from maas.common.v1 import common_pb2
from tritonclient.grpc import service_pb2

from services.common.errors import InvalidArgument
from services.common.generation import Sampling, generate_response_of_stream, stream_request
from services.common.serving import GENERATE
from services.inference.repository import ModelRepository, ModelSpec
from services.inference.triton import TritonClient, TritonLaunch, TritonSupervisor
from tests.integration.test_inference_triton import free_port
from tests.support.hf_models import hf_model_dir
from tests.unit.inference.llm_runner_support import packed

pytestmark = pytest.mark.slow
os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = "poet"
PROMPTS = ["ROMEO:\n", "To be, or not", "KING HENRY:\nWhat", "Good morrow, sweet"]


async def nothing() -> None:
    return None


@contextlib.asynccontextmanager
async def triton(directory: Path):
    grpc_port = free_port()
    launch = TritonLaunch(directory=directory, grpc_port=grpc_port, http_port=free_port(), metrics_port=free_port())
    supervisor = TritonSupervisor(
        launch=launch, client=TritonClient(f"127.0.0.1:{grpc_port}"), external=False, start_timeout=60,
        on_start=nothing, on_exit=nothing,
    )
    await supervisor.start()
    try:
        yield supervisor
    finally:
        await supervisor.client.close()
        await supervisor.stop()


async def generate(client: TritonClient, prompt: str, sampling: Sampling, chat: bool = False,
                   keep: int | None = None) -> tuple[str, object]:
    """(text, last message) of one stream; with `keep`, leaves after that many responses."""
    request = stream_request(prompt, sampling, MODEL)
    if chat:
        request.parameters["chat"].CopyFrom(service_pb2.InferParameter(string_param="1"))
    text, last, seen = "", None, 0
    async for response in client.stream(request, timeout=60):
        last = generate_response_of_stream(response, MODEL, 1)
        text += last.text
        seen += 1
        if keep is not None and seen >= keep:
            break
    return text, last


async def test_streams_batch_chat_and_cancel_in_real_triton(tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = hf_model_dir(tmp_path, "gpt2", n_positions=1024)
    artifact = packed(directory)
    async with triton(tmp_path / "triton") as supervisor:
        repository = ModelRepository(supervisor.model_repository, tmp_path / "staging")
        spec = ModelSpec(triton_model=MODEL, format="SAFETENSORS", sha256="0" * 64, signature=common_pb2.Signature(),
                         max_batch_size=0, instances=1, device="CPU", on_gpu=False, task=GENERATE)
        repository.write(spec, artifact)
        client = supervisor.client
        await client.load(MODEL, timeout=120)

        greedy = Sampling(max_tokens=20, temperature=0)
        results = await asyncio.gather(*(generate(client, prompt, greedy) for prompt in PROMPTS))
        reference = AutoModelForCausalLM.from_pretrained(directory).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        for prompt, (text, last) in zip(PROMPTS, results, strict=True):
            ids = tokenizer(prompt).input_ids
            with torch.no_grad():
                generated = reference.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):]
            assert text == tokenizer.decode(generated, skip_special_tokens=True), prompt
            assert (last.prompt_tokens, last.completion_tokens) == (len(ids), len(generated))

        messages = '[{"role": "user", "content": "Who is Romeo?"}]'
        _, chatted = await generate(client, messages, Sampling(max_tokens=3, temperature=0), chat=True)
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Who is Romeo?"}], tokenize=False,
                                                 add_generation_prompt=True)
        assert chatted.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False).input_ids)

        with pytest.raises(InvalidArgument, match="the prompt is .* tokens; this deployment holds at most 1024"):
            await generate(client, "the " * 1100, greedy)

        # A caller that leaves after two responses: its decoding stops, it does not run to 1000 tokens.
        started = time.monotonic()
        await generate(client, "ROMEO:", Sampling(max_tokens=1000, temperature=1.0, seed=3), keep=2)
        log = supervisor.log_path
        stopped = None
        while stopped is None and time.monotonic() - started < 30:
            stopped = re.search(r"decoding stopped after (\d+) tokens", log.read_text(errors="replace"))
            await asyncio.sleep(0.05)
        assert stopped is not None, log.read_text()[-3000:]
        assert int(stopped.group(1)) < 500
        # The slot is free again: a new stream is answered.
        text, last = await generate(client, "ROMEO:", Sampling(max_tokens=5, temperature=0))
        assert last.completion_tokens >= 1
