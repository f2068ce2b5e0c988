"""`make bench`: an imported GPT-2-shaped language model served by the continuous-batching runner
(services/inference/runner/llm.py) in the real tritonserver, streamed to 1, 8, 16 and 32
concurrent callers, vs. transformers' generate() in this process running the same requests one
after another; and the trainer's character GPT on this runner vs. the one-stream runner it had
before (runner/generate.py), the same TorchScript file deployed on both. Writes its section into
BENCHMARKS.md.

Each run sends every stream at once (same prompt, temperature 1, seed = stream) and waits for
them all. Tokens/s: the completion tokens of all streams over the run's wall time. Time to first
token: from the moment the run starts to a stream's first text, p50 over the streams; for the
sequential baseline a request's first token comes after every request before it has finished,
as it would for callers arriving together at a one-at-a-time server. Direct to Triton (gRPC
ModelStreamInfer): no gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from maas.common.v1 import common_pb2

from benchmarks.run import add_section, machine
from services.common.generation import Sampling, generate_response_of_stream, stream_request
from services.common.serving import GENERATE
from services.inference.repository import ModelRepository, ModelSpec
from services.inference.triton import TritonClient, TritonLaunch, TritonSupervisor
from tests.integration.test_inference_triton import free_port
from tests.support.hf_models import hf_model_dir
from tests.unit.inference.llm_runner_support import packed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench_llm"
PROMPT = "ROMEO:\nWhat light through yonder window breaks?\n"
SHAPE = dict(n_embd=384, n_layer=6, n_head=6, n_positions=1024)
TARGET_RATIO_AT_16 = 4.0
# The trainer's GPT, about as large as SHAPE, on the runner it had before and on this one.
CHARACTER_GPT = dict(embedding_dim=384, num_layers=6, num_heads=6, block_size=256)
ONE_STREAM_MODEL, BATCHED_GPT_MODEL = "bench_gpt_one_stream", "bench_gpt_batched"


async def nothing() -> None:
    return None


async def one_stream(client: TritonClient, seed: int, tokens: int, started: float, model: str = MODEL
                     ) -> tuple[float, int]:
    """(seconds from `started` to the first text, completion tokens) of one stream."""
    request = stream_request(PROMPT, Sampling(max_tokens=tokens, temperature=1.0, seed=seed), model)
    first, completion = 0.0, 0
    async for response in client.stream(request, timeout=600):
        message = generate_response_of_stream(response, model, 1)
        if message.text and not first:
            first = time.perf_counter() - started
        completion = message.completion_tokens or completion
    return first, completion


async def served_run(client: TritonClient, streams: int, tokens: int, model: str = MODEL) -> tuple[float, float]:
    """(aggregate tokens/s, p50 seconds to first token) of `streams` concurrent streams."""
    started = time.perf_counter()
    results = await asyncio.gather(*(one_stream(client, seed, tokens, started, model) for seed in range(streams)))
    seconds = time.perf_counter() - started
    return sum(r[1] for r in results) / seconds, statistics.median(r[0] for r in results)


class FirstToken:
    """A transformers streamer that notes when the first generated token comes (the first put is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.at = 0.0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def sequential_run(model, tokenizer, streams: int, tokens: int) -> tuple[float, float]:
    """The same requests through generate(), one after another."""
    ids = torch.tensor([tokenizer(PROMPT).input_ids])
    started = time.perf_counter()
    firsts, completion = [], 0
    for seed in range(streams):
        torch.manual_seed(seed)
        streamer = FirstToken()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=tokens, do_sample=True, temperature=1.0, top_k=0,
                                 streamer=streamer, pad_token_id=tokenizer.pad_token_id)
        firsts.append(streamer.at - started)
        completion += out.shape[1] - ids.shape[1]
    return completion / (time.perf_counter() - started), statistics.median(firsts)


def character_gpt(scratch: Path) -> tuple[Path, str, int]:
    """The trainer's character GPT (random weights, exported as the trainer exports it) over the
    Shakespeare characters: (TorchScript file, vocabulary, parameters)."""
    from services.trainer.data import shakespeare_text
    from services.trainer.models import Exported, Gpt

    vocabulary = "".join(sorted(set(shakespeare_text())))
    torch.manual_seed(0)
    net = Gpt(len(vocabulary), dropout=0.0, **CHARACTER_GPT)
    module = torch.jit.script(Exported(net, torch.nn.Identity(), torch.zeros(()), torch.ones(())).eval())
    path = scratch / "gpt.pt"
    torch.jit.save(module, str(path))
    return path, vocabulary, sum(p.numel() for p in net.parameters())


async def measure(args, scratch: Path) -> tuple[dict, dict, int, dict, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = hf_model_dir(scratch, "gpt2", **SHAPE)
    artifact = packed(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    parameters = sum(p.numel() for p in model.parameters())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    grpc_port = free_port()
    launch = TritonLaunch(directory=scratch / "triton", grpc_port=grpc_port, http_port=free_port(),
                          metrics_port=free_port())
    supervisor = TritonSupervisor(
        launch=launch, client=TritonClient(f"127.0.0.1:{grpc_port}"), external=False, start_timeout=60,
        on_start=nothing, on_exit=nothing,
    )
    await supervisor.start()
    served, sequential = {}, {}
    runners: dict[str, dict] = {ONE_STREAM_MODEL: {}, BATCHED_GPT_MODEL: {}}
    try:
        repository = ModelRepository(supervisor.model_repository, scratch / "staging")
        repository.write(ModelSpec(triton_model=MODEL, format="SAFETENSORS", sha256="0" * 64,
                                   signature=common_pb2.Signature(), max_batch_size=0, instances=1, device="CPU",
                                   on_gpu=False, task=GENERATE), artifact)
        await supervisor.client.load(MODEL, timeout=300)
        gpt_path, vocabulary, gpt_parameters = character_gpt(scratch)
        for name, metadata in ((ONE_STREAM_MODEL, {"vocabulary": vocabulary}),
                               (BATCHED_GPT_MODEL, {"vocabulary": vocabulary, "architecture": "gpt"})):
            repository.write(ModelSpec(triton_model=name, format="TORCHSCRIPT", sha256="0" * 64,
                                       signature=common_pb2.Signature(), max_batch_size=0, instances=1, device="CPU",
                                       on_gpu=False, task=GENERATE, runner_metadata=metadata), gpt_path)
            await supervisor.client.load(name, timeout=300)
            await served_run(supervisor.client, 2, 4, name)  # warm-up
        for streams in args.streams:
            for name in (ONE_STREAM_MODEL, BATCHED_GPT_MODEL):
                runners[name][streams] = await served_run(supervisor.client, streams, args.tokens, name)
            print(streams, "one-stream", runners[ONE_STREAM_MODEL][streams], "batched",
                  runners[BATCHED_GPT_MODEL][streams], flush=True)
        await served_run(supervisor.client, 2, 4)  # warm-up
        torch.set_num_threads(os.cpu_count() or 1)  # as the runner's one instance on this host
        sequential_run(model, tokenizer, 1, 4)
        for streams in args.streams:
            # Alternating, so that load elsewhere on the machine hits both paths.
            served[streams] = await served_run(supervisor.client, streams, args.tokens)
            sequential[streams] = sequential_run(model, tokenizer, streams, args.tokens)
            print(streams, "served", served[streams], "sequential", sequential[streams], flush=True)
    finally:
        await supervisor.client.close()
        await supervisor.stop()
    return served, sequential, parameters, runners, gpt_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens of each stream")
    parser.add_argument("--streams", type=lambda text: [int(n) for n in text.split(",")], default=[1, 8, 16, 32],
                        help="concurrent streams per run, comma-separated")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        served, sequential, parameters, runners, gpt_parameters = asyncio.run(measure(args, Path(scratch)))
    rows = []
    for streams in args.streams:
        (rate, ttft), (base_rate, base_ttft) = served[streams], sequential[streams]
        rows.append(f"| {streams} | {rate:,.0f} | {ttft * 1000:,.0f} | {base_rate:,.0f} | {base_ttft * 1000:,.0f} | "
                    f"{rate / base_rate:.2f} |")
    gpt_rows = []
    for streams in args.streams:
        (old_rate, old_ttft), (new_rate, new_ttft) = runners[ONE_STREAM_MODEL][streams], runners[BATCHED_GPT_MODEL][streams]
        gpt_rows.append(f"| {streams} | {old_rate:,.0f} | {old_ttft * 1000:,.0f} | {new_rate:,.0f} | "
                        f"{new_ttft * 1000:,.0f} | {new_rate / old_rate:.2f} |")
    verdict = ""
    if 16 in served:
        ratio = served[16][0] / sequential[16][0]
        verdict = (f" At 16 streams the runner gives {ratio:.1f}x the tokens/s of sequential generate() "
                   f"(target {TARGET_RATIO_AT_16:g}x: {'met' if ratio >= TARGET_RATIO_AT_16 else 'NOT met'}).")
    section = "\n".join([
        f"## Imported language model, continuous batching — {datetime.date.today().isoformat()}",
        "",
        f"Machine: {machine()}, torch {torch.__version__}. No GPU. Written by `make bench` (benchmarks/llm.py).",
        f"Model: a random-weight GPT-2 ({SHAPE['n_layer']} layers, {SHAPE['n_embd']} dims, {parameters / 1e6:.1f} M "
        f"parameters, the Shakespeare BPE of 2,051 tokens), packed as the registry stores imported models. Each "
        f"stream asks for {args.tokens} tokens (temperature 1, seed = stream; an EOS ends one sooner) from a "
        f"{len(PROMPT)}-character prompt. Served: runner/llm.py, one instance, in tritonserver, every stream sent "
        "at once over gRPC ModelStreamInfer (no gateway). Sequential: transformers' generate() in this process, "
        "the same requests one after another, as many torch threads as the runner." + verdict,
        "",
        "| streams | served tokens/s | served p50 TTFT ms | sequential tokens/s | sequential p50 TTFT ms | tokens/s ratio |",
        "|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Against the one-stream runner (runner/generate.py, which runs the TorchScript module itself, one stream "
        f"at a time per instance, the context recomputed each token): the trainer's character GPT "
        f"({CHARACTER_GPT['num_layers']} layers, {CHARACTER_GPT['embedding_dim']} dims, a context of "
        f"{CHARACTER_GPT['block_size']}, {gpt_parameters / 1e6:.1f} M parameters, random weights), the same "
        "TorchScript file deployed twice in the same tritonserver, one instance each, the same streams.",
        "",
        "| streams | one-stream tokens/s | one-stream p50 TTFT ms | continuous batching tokens/s | "
        "continuous batching p50 TTFT ms | tokens/s ratio |",
        "|---:|---:|---:|---:|---:|---:|",
        *gpt_rows,
        "",
    ])
    print(section)
    add_section(args.output, section)


if __name__ == "__main__":
    main()
