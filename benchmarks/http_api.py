"""`make bench`: the gateway's HTTP port against its gRPC port on the same deployments of one
stack, each through stock clients we did not write. Writes its section into BENCHMARKS.md.

Tensors: the digits MLP through the Open Inference Protocol, gRPC ModelInfer (tritonclient.grpc)
vs. KServe v2 REST infer with JSON tensors and with the binary tensor extension
(tritonclient.http), at each client count: req/s, p50, p99 and each serving process's CPU time
per request from /proc. Generation: the trainer's character GPT streaming a completion, gRPC
Generate (the maas SDK) vs. /v1/completions with stream=true (the openai package), at each
stream count: time to first token, aggregate tokens/s and the gateway's CPU per token.

Both ports are served by one gateway process through the same interceptor and servicers; the
paths alternate in slices within one run, so load elsewhere on the machine hits them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai
import tritonclient.grpc.aio as triton_grpc
import tritonclient.http.aio as triton_http
from maas import Client
from tritonclient.utils import InferenceServerException

from benchmarks.generate import PROMPT, TRAINING
from benchmarks.run import (
    CHANNELS,
    TICKS,
    CpuProbe,
    Result,
    add_section,
    bench_key,
    drive,
    machine,
    serving_processes,
)
from services.stack.ephemeral import EphemeralStack
from tests.support.digits import SIGNATURE, DigitsModel, train_digits_mlp

ROOT = Path(__file__).resolve().parent.parent
TENSOR_MODEL = "digits"
TEXT_MODEL = "bench-gpt"
GRPC_TENSORS = "gRPC ModelInfer (tritonclient.grpc)"
HTTP_JSON_TENSORS = "HTTP KServe v2, JSON tensors (tritonclient.http)"
HTTP_BINARY_TENSORS = "HTTP KServe v2, binary tensors (tritonclient.http)"
GRPC_STREAM = "gRPC Generate (maas SDK)"
HTTP_STREAM = "HTTP /v1/completions, stream (openai)"
# Seconds each slice of a tensor path runs unmeasured first: the previous path's calls drain.
SLICE_WARMUP = 1.0


def merged(slices: list[Result]) -> Result:
    """One path's slices as one measurement: all latencies over all measured seconds."""
    cpu: dict[str, float] = {}
    for piece in slices:
        for group, seconds in piece.cpu.items():
            cpu[group] = cpu.get(group, 0.0) + seconds
    return Result(
        slices[0].name,
        [latency for piece in slices for latency in piece.latencies],
        sum(piece.seconds for piece in slices),
        sum(piece.errors for piece in slices),
        cpu,
    )


async def tensor_paths(
    stack: EphemeralStack, key: str, digits: DigitsModel, batch: int, clients_runs: list[int], seconds: float,
    rounds: int, probe: CpuProbe,
) -> dict[int, list[Result]]:
    """For each client count, the three paths alternating in `rounds` slices of seconds / rounds."""
    x = digits.test_x[:batch]
    # As many connections as run.py gives a gRPC path; tritonclient.http opens one per call in flight.
    grpc_clients = [
        triton_grpc.InferenceServerClient(stack.gateway, channel_args=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CHANNELS)
    ]
    http_client = triton_http.InferenceServerClient(stack.http.removeprefix("http://"), conn_limit=max(clients_runs))
    try:
        grpc_input = triton_grpc.InferInput("x", list(x.shape), "FP32")
        grpc_input.set_data_from_numpy(x)
        grpc_output = triton_grpc.InferRequestedOutput("logits")
        http_inputs, http_outputs = {}, {}
        for binary in (False, True):
            http_inputs[binary] = triton_http.InferInput("x", list(x.shape), "FP32")
            http_inputs[binary].set_data_from_numpy(x, binary_data=binary)
            http_outputs[binary] = triton_http.InferRequestedOutput("logits", binary_data=binary)
        next_grpc = itertools.cycle(grpc_clients).__next__

        def grpc_call():
            return next_grpc().infer(
                TENSOR_MODEL, [grpc_input], outputs=[grpc_output], headers={"authorization": f"Bearer {key}"}
            )

        def http_call(binary: bool) -> Callable:
            # A new headers dict each call: the client adds the binary extension's header to it.
            return lambda: http_client.infer(
                TENSOR_MODEL, [http_inputs[binary]], outputs=[http_outputs[binary]],
                headers={"Authorization": f"Bearer {key}"},
            )

        paths = {GRPC_TENSORS: grpc_call, HTTP_JSON_TENSORS: http_call(False), HTTP_BINARY_TENSORS: http_call(True)}
        reference = digits.reference(x)
        for name, call in paths.items():  # every path answers the model's own logits before it is timed
            np.testing.assert_allclose((await call()).as_numpy("logits"), reference, rtol=1e-4, atol=1e-4,
                                       err_msg=name)
        runs = {}
        for clients in clients_runs:
            slices: dict[str, list[Result]] = {name: [] for name in paths}
            for _ in range(rounds):
                for name, call in paths.items():
                    slices[name].append(await drive(
                        name, call, clients, seconds / rounds, SLICE_WARMUP, probe, failures=(InferenceServerException,)
                    ))
            runs[clients] = [merged(pieces) for pieces in slices.values()]
            print(clients, "clients", [(r.name, round(r.throughput), r.errors) for r in runs[clients]], flush=True)
        return runs
    finally:
        await http_client.close()
        for client in grpc_clients:
            await client.close()


@dataclass
class Stream:
    first: float  # seconds from the run's start to the first text
    tokens: int  # completion tokens, as the last message counts them
    text: str
    messages: int


def grpc_stream(client: Client, seed: int, tokens: int, started: float) -> Stream:
    first, pieces, completion = 0.0, [], 0
    for response in client.generate(TEXT_MODEL, PROMPT, max_tokens=tokens, temperature=1.0, seed=seed):
        if response.text and not first:
            first = time.perf_counter() - started
        pieces.append(response.text)
        completion = response.completion_tokens or completion
    return Stream(first, completion, "".join(pieces), len(pieces))


def http_stream(client: openai.OpenAI, seed: int, tokens: int, started: float) -> Stream:
    first, pieces, completion = 0.0, [], 0
    chunks = client.completions.create(
        model=TEXT_MODEL, prompt=PROMPT, max_tokens=tokens, temperature=1.0, seed=seed, stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in chunks:
        if chunk.choices:
            text = chunk.choices[0].text
            if text and not first:
                first = time.perf_counter() - started
            pieces.append(text)
        if chunk.usage:  # the last chunk: no choices, the counts
            completion = chunk.usage.completion_tokens
    return Stream(first, completion, "".join(pieces), len(pieces))


@dataclass
class StreamRun:
    streams: list[Stream]
    seconds: float
    gateway_cpu: float  # seconds of the gateway's CPU over the run


def stream_run(
    one: Callable[[int, float], Stream], seeds: range, pool: ThreadPoolExecutor, probe: CpuProbe
) -> StreamRun:
    """Every stream of the run sent at once, each on its own thread; the run ends with the last."""
    before = probe.read()["gateway"]
    started = time.perf_counter()
    streams = list(pool.map(lambda seed: one(seed, started), seeds))
    seconds = time.perf_counter() - started
    return StreamRun(streams, seconds, probe.read()["gateway"] - before)


def generation_paths(
    stack: EphemeralStack, key: str, streams_runs: list[int], tokens: int, runs: int, probe: CpuProbe
) -> dict[int, dict[str, list[StreamRun]]]:
    """For each stream count, one warm-up run of each path, then `runs` runs of each, alternating."""
    results: dict[int, dict[str, list[StreamRun]]] = {}
    with Client(stack.gateway, key) as sdk, openai.OpenAI(base_url=stack.http + "/v1", api_key=key,
                                                          max_retries=0) as http:
        paths = {
            GRPC_STREAM: lambda seed, started: grpc_stream(sdk, seed, tokens, started),
            HTTP_STREAM: lambda seed, started: http_stream(http, seed, tokens, started),
        }
        for streams in streams_runs:
            results[streams] = {name: [] for name in paths}
            with ThreadPoolExecutor(streams) as pool:
                for run in range(-1, runs):  # run -1 warms up
                    # The same seeds on both paths: the same text, if the paths agree.
                    seeds = range(max(run, 0) * streams, (max(run, 0) + 1) * streams)
                    for name, one in paths.items():
                        measured = stream_run(one, seeds, pool, probe)
                        if run >= 0:
                            results[streams][name].append(measured)
            print(streams, "streams", {name: sum(len(s.streams) for s in r) for name, r in results[streams].items()},
                  flush=True)
    return results


def tensor_table(runs: dict[int, list[Result]]) -> list[str]:
    lines = [
        "| clients | path | p50 ms | p99 ms | req/s | errors | gateway CPU µs/req | Redis µs/req | Triton µs/req "
        "| HTTP/gRPC p50 | HTTP/gRPC p99 | HTTP/gRPC req/s | HTTP/gRPC gateway CPU |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for clients, results in runs.items():
        base = results[0]
        for r in results:
            gateway = r.cpu_us_per_request("gateway")
            lines.append(
                f"| {clients} | {r.name} | {r.p50:.2f} | {r.p99:.2f} | {r.throughput:,.0f} | {r.errors} | "
                f"{gateway:,.0f} | {r.cpu_us_per_request('redis'):,.0f} | {r.cpu_us_per_request('triton'):,.0f} | "
                f"{r.p50 / base.p50:.2f} | {r.p99 / base.p99:.2f} | {r.throughput / base.throughput:.2f} | "
                f"{gateway / base.cpu_us_per_request('gateway'):.2f} |"
            )
    return lines


def generation_figures(runs: list[StreamRun]) -> tuple[float, float, float, float]:
    """(p50 ms to the first token over every stream, aggregate tokens/s, gateway CPU µs per token,
    median messages per completion) of one path's runs."""
    streams = [stream for run in runs for stream in run.streams]
    tokens = sum(stream.tokens for stream in streams)
    return (
        statistics.median(stream.first for stream in streams) * 1000,
        tokens / sum(run.seconds for run in runs),
        sum(run.gateway_cpu for run in runs) / max(1, tokens) * 1e6,
        statistics.median(stream.messages for stream in streams),
    )


def generation_table(results: dict[int, dict[str, list[StreamRun]]]) -> list[str]:
    lines = [
        "| streams | path | p50 TTFT ms | tokens/s | gateway CPU µs/token | messages per completion "
        "| HTTP/gRPC TTFT | HTTP/gRPC tokens/s | HTTP/gRPC gateway CPU |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for streams, paths in results.items():
        base = generation_figures(paths[GRPC_STREAM])
        for name, runs in paths.items():
            ttft, rate, cpu, messages = generation_figures(runs)
            lines.append(
                f"| {streams} | {name} | {ttft:.1f} | {rate:,.0f} | {cpu:,.0f} | {messages:.0f} | "
                f"{ttft / base[0]:.2f} | {rate / base[1]:.2f} | {cpu / base[2]:.2f} |"
            )
    return lines


def same_text(results: dict[int, dict[str, list[StreamRun]]]) -> tuple[int, int]:
    """(streams whose text is the same on both paths, streams per path): the same seed, the same text."""
    pairs = [
        (a.text, b.text)
        for paths in results.values()
        for grpc_run, http_run in zip(paths[GRPC_STREAM], paths[HTTP_STREAM], strict=True)
        for a, b in zip(grpc_run.streams, http_run.streams, strict=True)
    ]
    return sum(a == b for a, b in pairs), len(pairs)


def report(args: argparse.Namespace, tensors: dict[int, list[Result]], generation: dict) -> str:
    agreed, compared = same_text(generation)
    return "\n".join([
        f"## Gateway HTTP vs. gRPC — {datetime.date.today().isoformat()}",
        "",
        f"Machine: {machine()}. No GPU. Written by `make bench` (benchmarks/http_api.py).",
        "One stack, one gateway process serving both ports (the HTTP port dispatches in-process through the "
        "gRPC port's interceptor and servicers: the same key check, limits, quotas, usage and audit); "
        "one developer key whose limits and quotas sit far above the load. Client, gateway, Redis and Triton "
        "share the same cores; every path is a stock client in this process, so each client library's own "
        "cost is in its req/s and latencies. The gateway's CPU per request (user + system, from /proc, over "
        "the measured window) is the steadier figure to read.",
        "",
        "### Tensor predict",
        "",
        f"Digits MLP 64-64-10 (TorchScript), batch {args.batch} per request, max_batch_size 32. gRPC: "
        f"tritonclient.grpc.aio over {CHANNELS} connections, round robin, the key in its headers. HTTP: "
        "tritonclient.http.aio (aiohttp, one keep-alive connection per call in flight), the key in its headers, "
        "JSON tensors or the binary tensor extension both ways. Each path "
        f"{args.seconds:g} s per client count, measured in {args.rounds} alternating slices, each after "
        f"{SLICE_WARMUP:g} s unmeasured. Ratios: each path against gRPC at the same client count.",
        "",
        *tensor_table(tensors),
        "",
        "### Streaming generation",
        "",
        f"The trainer's character GPT ({TRAINING['num_layers']} layers, {TRAINING['embedding_dim']} dims, "
        f"block {TRAINING['block_size']}) in the continuous-batching runner. Each stream asks for {args.tokens} "
        f"tokens (temperature 1, a seed per stream, the same seeds on both paths) from {PROMPT!r}; every stream "
        "of a run is sent at once, each on its own thread through one shared client (the SDK's one gRPC channel; "
        f"the openai package's connection pool). {args.runs} runs per path and stream count, alternating, after "
        "one warm-up run of each. TTFT: from the run's start to a stream's first text, p50 over all streams. "
        "Tokens/s: completion tokens over the runs' wall time. Gateway CPU per completion token over the runs "
        f"(/proc counts {1000 / TICKS:g} ms ticks: few runs of few tokens round it coarsely). "
        f"Same text on both paths in {agreed} of {compared} streams.",
        "",
        *generation_table(generation),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16], help="concurrent tensor clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per tensor path and client count")
    parser.add_argument("--rounds", type=int, default=5, help="alternating slices the seconds are measured in")
    parser.add_argument("--batch", type=int, default=1, help="rows per tensor request")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8], help="concurrent generation streams")
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens of each stream")
    parser.add_argument("--runs", type=int, default=5, help="measured runs per generation path and stream count")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()

    stack = EphemeralStack()
    stack.env["MAAS_GATEWAY_WORKERS"] = "1"  # both ports in one process: its CPU is the whole hop
    with tempfile.TemporaryDirectory() as scratch, stack:
        digits = train_digits_mlp(Path(scratch))
        key = bench_key(stack)
        with Client(stack.gateway, key) as client:
            job = client.train(TEXT_MODEL, "gpt", "shakespeare", **TRAINING)
            client.create_model(TENSOR_MODEL)
            client.upload_version(TENSOR_MODEL, digits.path, format="torchscript", signature=SIGNATURE)
            client.create_deployment(TENSOR_MODEL, TENSOR_MODEL, version=1, max_batch_size=32)
            version = client.wait_job(job.id, timeout=900).result.version
            client.create_deployment(TEXT_MODEL, TEXT_MODEL, version=version)
            client.wait_ready(TENSOR_MODEL, timeout=300)
            client.wait_ready(TEXT_MODEL, timeout=300)
        probe = CpuProbe(serving_processes(stack))
        tensors = asyncio.run(
            tensor_paths(stack, key, digits, args.batch, args.clients, args.seconds, args.rounds, probe)
        )
        generation = generation_paths(stack, key, args.streams, args.tokens, args.runs, probe)
    section = report(args, tensors, generation)
    print(section)
    add_section(args.output, section)


if __name__ == "__main__":
    main()
