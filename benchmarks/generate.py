"""`make bench`: streaming text generation from the trainer's character-level GPT through the
gateway's Generate (auth, token reservation and settlement in Redis, Triton's decoupled python
backend: the continuous-batching runner, runner/llm.py) vs. the same request straight to Triton's
ModelStreamInfer (what the gateway adds), vs. the same TorchScript sampled one token at a time in
this process (services/inference/runner/sampling.py: what Triton adds). Writes its section into
BENCHMARKS.md.

Time to first token: from the call to the first token in the caller's hands. Tokens/s: tokens
generated over the whole call. Both paths sample with the same settings from the same
distributions, but the served runner draws by inverse CDF, so their texts differ; runs alternate
between the paths, so load elsewhere hits both.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import torch
from maas import Client
from tritonclient.grpc import service_pb2, service_pb2_grpc

from benchmarks.run import add_section, bench_key, machine
from services.common.channels import triton_metadata
from services.common.generation import Sampling, stream_request
from services.inference.runner.sampling import THREADS, Settings, Vocabulary, block_size_of, generate
from services.stack.ephemeral import EphemeralStack

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "ROMEO:\n"
WARMUP = 3
TRAINING = dict(epochs=1, max_samples=20_000, batch_size=64, block_size=64, embedding_dim=64, num_layers=2,
                num_heads=4, learning_rate=3e-3, device="cpu", seed=0)


def in_process(module, vocabulary: Vocabulary, settings: Settings) -> tuple[float, float, str]:
    """(seconds to the first token, seconds in all, text) of one generation in this process."""
    started = time.perf_counter()
    first, pieces = 0.0, []
    for step in generate(module, vocabulary, vocabulary.encode(PROMPT), settings, block_size_of(module)):
        if not first:
            first = time.perf_counter() - started
        pieces.append(step.text)
    return first, time.perf_counter() - started, "".join(pieces)


def through_gateway(client: Client, deployment: str, settings: Settings) -> tuple[float, float, str, int]:
    """(seconds to the first token, seconds in all, text, messages) of one generation."""
    started = time.perf_counter()
    first, pieces = 0.0, []
    for response in client.generate(
        deployment, PROMPT, max_tokens=settings.max_tokens, temperature=settings.temperature, seed=settings.seed
    ):
        if not first:
            first = time.perf_counter() - started
        pieces.append(response.text)
    return first, time.perf_counter() - started, "".join(pieces), len(pieces)


class TritonDirect:
    """The deployment's Triton model, called the way the gateway calls it, with the stack's token."""

    def __init__(self, stack: EphemeralStack) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{stack.env['MAAS_TRITON_GRPC_PORT']}")
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        # Triton answers nothing but health without the stack's token (its restricted protocols).
        self.token = triton_metadata((stack.home / "triton.token").read_text().strip())
        index = self.stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), metadata=self.token)
        self.model = next(model.name for model in index.models if model.state == "READY")

    def generate(self, settings: Settings) -> tuple[float, float, str, int]:
        """(seconds to the first token, seconds in all, text, messages) of one generation."""
        sampling = Sampling(max_tokens=settings.max_tokens, temperature=settings.temperature, seed=settings.seed)
        request = stream_request(PROMPT, sampling, self.model)
        started = time.perf_counter()
        first, pieces = 0.0, []
        for response in self.stub.ModelStreamInfer(iter([request]), metadata=self.token):
            if not first:
                first = time.perf_counter() - started
            if response.error_message:
                raise RuntimeError(response.error_message)
            outputs = [output.name for output in response.infer_response.outputs]
            text = response.infer_response.raw_output_contents[outputs.index("text")]
            pieces.append(text[4:].decode())  # a BYTES element: its length, then its bytes
        return first, time.perf_counter() - started, "".join(pieces), len(pieces)


def row(path: str, runs: list[tuple], tokens: int, base: tuple[float, float] | None) -> str:
    ttft = statistics.median(run[0] for run in runs) * 1000
    rate = tokens / statistics.median(run[1] for run in runs)
    ratios = f"{ttft / base[0]:.2f} | {rate / base[1]:.2f}" if base else "1.00 | 1.00"
    return f"| {path} | {ttft:.2f} | {rate:,.0f} | {ratios} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20, help="Generations per path")
    parser.add_argument("--tokens", type=int, default=200, help="max_tokens of each generation")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, EphemeralStack() as stack:
        key = bench_key(stack)
        client = Client(stack.gateway, key)
        job = client.train("bench-gpt", "gpt", "shakespeare", **TRAINING)
        version = client.wait_job(job.id, timeout=900).result.version
        client.create_deployment("bench-gpt", "bench-gpt", version=version)
        client.wait_ready("bench-gpt", timeout=300)
        artifact = Path(scratch) / "model.pt"
        record = client.download_version("bench-gpt", version, artifact)
        module = torch.jit.load(str(artifact)).eval()
        torch.set_num_threads(THREADS)  # as the runner does
        vocabulary = Vocabulary(record.metadata["vocabulary"])
        triton = TritonDirect(stack)
        local, direct, gateway = [], [], []
        for run in range(args.runs + WARMUP):
            settings = Settings(max_tokens=args.tokens, temperature=1.0, seed=run)
            measured = (
                in_process(module, vocabulary, settings),
                triton.generate(settings),
                through_gateway(client, "bench-gpt", settings),
            )
            if run >= WARMUP:  # TorchScript specialises on the first calls' shapes
                local.append(measured[0])
                direct.append(measured[1])
                gateway.append(measured[2])
        same_text = sum(a[2] == b[2] for a, b in zip(local, gateway, strict=True))
        same_served = sum(a[2] == b[2] for a, b in zip(direct, gateway, strict=True))
        triton.channel.close()
        client.close()
    base = (statistics.median(r[0] for r in local) * 1000, args.tokens / statistics.median(r[1] for r in local))
    section = "\n".join([
        f"## Streaming generation — {datetime.date.today().isoformat()}",
        "",
        f"Machine: {machine()}, torch {torch.__version__}. No GPU. Written by `make bench` (benchmarks/generate.py).",
        f"Model: the trainer's character-level GPT ({TRAINING['num_layers']} layers, {TRAINING['embedding_dim']} "
        f"dims, block {TRAINING['block_size']}) trained 1 epoch on 20,000 characters of Shakespeare. Each run "
        f"generates {args.tokens} tokens (temperature 1, seed = run) from {PROMPT!r}; median of {args.runs} runs per "
        f"path, alternating, after {WARMUP} warm-up runs; {THREADS} torch thread in both. In process: the same TorchScript, sampled one token at a time in this process. Gateway: "
        "`Client.generate` -> gateway (auth, token reservation and settlement) -> Triton decoupled model "
        "(the continuous-batching runner) -> the tokens streamed back (median "
        f"{statistics.median(run[3] for run in gateway):.0f} messages per generation, the last one with the "
        "counts: the first text goes at once, later ones in rounds of 20 ms). The served runner draws by "
        f"inverse CDF, so the texts differ from in process (the same in {same_text} of {args.runs} runs); the token "
        f"counts do not. Triton direct: the gateway's request to the same Triton model over gRPC "
        f"ModelStreamInfer, with the stack's token; its texts equal the gateway's in {same_served} of {args.runs} runs.",
        "",
        "| path | time to first token ms | tokens/s | TTFT ratio | tokens/s ratio |",
        "|---|---:|---:|---:|---:|",
        row("in process", local, args.tokens, None),
        row("Triton direct (ModelStreamInfer)", direct, args.tokens, base),
        row("gateway Generate (streamed)", gateway, args.tokens, base),
        "",
    ])
    print(section)
    add_section(args.output, section)


if __name__ == "__main__":
    main()
