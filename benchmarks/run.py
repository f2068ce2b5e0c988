"""`make bench`: Predict through the gateway (auth + rate limit + quota in Redis, with and
without the request cache) vs. straight to Triton on the same model, and vs. the floor of any
Python hop (benchmarks/raw_proxy.py: a proxy forwarding ModelInfer's bytes, nothing else), at 16
and 64 concurrent clients. Writes BENCHMARKS.md.

Every path is driven by the same asyncio client in this process, so the client's own cost is
in all numbers alike; the ratios are what to read. Each serving process's CPU time per request
(from /proc) is reported too: on a shared, noisy machine it is steadier than req/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from maas import Client, to_tensor
from maas.gateway.v1 import admin_pb2
from maas.inference.v1 import inference_pb2, inference_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common.channels import triton_metadata
from services.stack.ephemeral import EphemeralStack, free_port
from tests.support.digits import SIGNATURE, train_digits_mlp

ROOT = Path(__file__).resolve().parent.parent
# Connections per path, each path alike: a gateway's workers share connections, not calls.
CHANNELS = 4
# The processes a hop adds beside Triton: the gateway's (with the Redis it calls), or the proxy.
HOP_GROUPS = ("gateway", "redis", "proxy")


@dataclass
class Result:
    name: str
    latencies: list[float]
    seconds: float
    errors: int
    # CPU seconds each serving process group spent over the measured window (CpuProbe).
    cpu: dict[str, float] = field(default_factory=dict)

    def cpu_us_per_request(self, group: str) -> float:
        return self.cpu.get(group, 0.0) / max(1, len(self.latencies)) * 1e6

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) * 1000

    @property
    def p99(self) -> float:
        return float(np.percentile(self.latencies, 99)) * 1000

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds


TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    # Fields after the command name, which may hold spaces: state is [0], ppid [1], utime [11].
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(root: int) -> list[int]:
    """`root` and every process below it (Triton's model stubs are its children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


class CpuProbe:
    """CPU seconds (user + system) of named process groups, each a process and its descendants,
    read from /proc: how to compare serving paths on a noisy shared machine."""

    def __init__(self, groups: dict[str, int]) -> None:
        self.groups = groups

    def read(self) -> dict[str, float]:
        totals = {}
        for name, root in self.groups.items():
            total = 0
            for pid in process_tree(root):
                with contextlib.suppress(OSError, IndexError, ValueError):
                    fields = _stat(pid)
                    total += int(fields[11]) + int(fields[12])
            totals[name] = total / TICKS
        return totals


async def drive(
    name: str,
    call: Callable[[], Awaitable[object]],
    clients: int,
    seconds: float,
    warmup: float,
    probe: CpuProbe | None = None,
    failures: tuple[type[BaseException], ...] = (grpc.aio.AioRpcError,),
) -> Result:
    """`clients` concurrent loops of `call` for `warmup` + `seconds`; a call raising one of
    `failures` counts as an error (each client library raises its own type)."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + warmup + seconds
    measure_from = time.perf_counter() + warmup
    cpu_window: dict[str, dict[str, float]] = {}

    async def watch_cpu() -> None:
        assert probe is not None
        await asyncio.sleep(warmup)
        cpu_window["start"] = probe.read()
        await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
        cpu_window["end"] = probe.read()

    async def client() -> None:
        nonlocal errors
        while (start := time.perf_counter()) < stop_at:
            try:
                await call()
            except failures:
                errors += 1
                continue
            if start >= measure_from:
                latencies.append(time.perf_counter() - start)

    watcher = [watch_cpu()] if probe is not None else []
    await asyncio.gather(*(client() for _ in range(clients)), *watcher)
    cpu = {group: cpu_window["end"][group] - cpu_window["start"][group] for group in cpu_window.get("end", {})}
    return Result(name, latencies, seconds, errors, cpu)


# Distinct inputs made before the cache-miss path runs (more are made on the fly if needed).
MISS_POOL = 50_000


def connections(address: str) -> list[grpc.aio.Channel]:
    """CHANNELS connections to one address: a gateway's workers share connections, not calls."""
    return [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CHANNELS)
    ]


def stubs(stub_class: type, channels: list[grpc.aio.Channel]) -> Callable[[], Any]:
    """The next stub, round robin over the channels."""
    return itertools.cycle([stub_class(channel) for channel in channels]).__next__


async def measure(
    stack: EphemeralStack,
    api_key: str,
    batch: np.ndarray,
    clients: int,
    seconds: float,
    proxy: str,
    probe: CpuProbe,
    gateway_only: bool = False,
) -> list[Result]:
    auth = (("authorization", f"Bearer {api_key}"),)
    triton_address = f"127.0.0.1:{stack.env['MAAS_TRITON_GRPC_PORT']}"
    triton_channels, gateway_channels, proxy_channels = (
        connections(triton_address), connections(stack.gateway), connections(proxy)
    )
    try:
        return await _measure(
            stack, auth, batch, clients, seconds, probe, gateway_only,
            stubs(service_pb2_grpc.GRPCInferenceServiceStub, triton_channels),
            stubs(service_pb2_grpc.GRPCInferenceServiceStub, gateway_channels),
            stubs(inference_pb2_grpc.InferenceServiceStub, gateway_channels),
            stubs(service_pb2_grpc.GRPCInferenceServiceStub, proxy_channels),
        )
    finally:
        for channel in (*triton_channels, *gateway_channels, *proxy_channels):
            await channel.close()


async def _measure(
    stack: EphemeralStack,
    auth: tuple[tuple[str, str], ...],
    batch: np.ndarray,
    clients: int,
    seconds: float,
    probe: CpuProbe,
    gateway_only: bool,
    tritons: Callable[[], Any],
    gateway_oips: Callable[[], Any],
    gateway_predicts: Callable[[], Any],
    floors: Callable[[], Any],
) -> list[Result]:
    triton = tritons()
    # Triton answers nothing but health without the stack's token (its restricted protocols).
    token = triton_metadata((stack.home / "triton.token").read_text().strip())
    index = await triton.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), metadata=token)
    triton_model = index.models[0].name

    def infer_request(model: str) -> service_pb2.ModelInferRequest:
        request = service_pb2.ModelInferRequest(model_name=model)
        request.inputs.add(name="x", datatype="FP32", shape=list(batch.shape))
        request.raw_input_contents.append(batch.tobytes())
        return request

    direct_request = infer_request(triton_model)
    oip_request = infer_request("digits")
    predict_request = inference_pb2.PredictRequest(deployment="digits", inputs=[to_tensor("x", batch)])
    cached_request = inference_pb2.PredictRequest(deployment="digits-cached", inputs=[to_tensor("x", batch)])
    # Distinct inputs, made up front (a run's worth) so that the loop pays little for them.
    misses = (
        inference_pb2.PredictRequest(
            deployment="digits-cached", inputs=[to_tensor("x", batch + np.float32(i) * 1e-6)]
        )
        for i in itertools.count(1)
    )
    pool = list(itertools.islice(misses, MISS_POOL))
    next_miss = itertools.chain(pool, misses).__next__
    await gateway_predicts().Predict(cached_request, metadata=auth)  # fills the entry the hit path reads
    paths = [
        ("Triton direct (ModelInfer)", lambda: tritons().ModelInfer(direct_request, metadata=token)),
        ("minimal raw-bytes proxy (the floor)", lambda: floors().ModelInfer(direct_request)),
        ("gateway, Open Inference Protocol", lambda: gateway_oips().ModelInfer(oip_request, metadata=auth)),
        ("gateway, maas Predict", lambda: gateway_predicts().Predict(predict_request, metadata=auth)),
        (
            "gateway, maas Predict, cache miss",
            lambda: gateway_predicts().Predict(next_miss(), metadata=auth),
        ),
        ("gateway, maas Predict, cache hit", lambda: gateway_predicts().Predict(cached_request, metadata=auth)),
    ]
    if gateway_only:
        paths = paths[:4]
    results = []
    for name, call in paths:
        results.append(await drive(name, call, clients, seconds, warmup=2.0, probe=probe))
    return results


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def report(runs: dict[str, list[Result]], seconds: float, batch: int) -> str:
    lines = [
        f"## Gateway vs. Triton direct — {datetime.date.today().isoformat()}",
        "",
        f"Machine: {machine()}. No GPU: Triton runs the python-backend runner on CPU.",
        (
            f"Model: MLP 64-64-10 (TorchScript) trained on scikit-learn digits, batch {batch} per request, "
            f"max_batch_size 32, dynamic batching. Concurrent clients in one asyncio process over {CHANNELS} "
            f"connections per path, {seconds:.0f} s per path after a 2 s warm-up; client, gateway, Redis "
            "and Triton share the same cores. The gateway joins calls queued behind one in flight "
            "(coalescing, on by default)."
        ),
        (
            "Every gateway path authenticates the key and admits the call against its key limit and the "
            "tenant's daily request quota (set far above the load, so taken by lease: one Redis script per "
            "32 calls). \"cache miss\": a cacheable deployment, a new input each call (lookup + background "
            "store). \"cache hit\": the same input each call, answered from the cache (the gateway's "
            "memory tier, else Redis) without Triton."
        ),
    ]
    for heading, results in runs.items():
        base = results[0]
        lines += [
            "",
            f"### {heading}",
            "",
            "| path | p50 ms | p99 ms | req/s | errors | p50 ratio | p99 ratio | throughput ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results:
            lines.append(
                f"| {r.name} | {r.p50:.2f} | {r.p99:.2f} | {r.throughput:,.0f} | {r.errors} | "
                f"{r.p50 / base.p50:.2f} | {r.p99 / base.p99:.2f} | {r.throughput / base.throughput:.2f} |"
            )
        lines += [
            "",
            "CPU per request of each serving process over the measured window (user + system, from /proc; "
            "Triton counts its model stubs; the client is not counted). \"beyond Triton\": the hop's own "
            "processes (gateway + Redis, or the proxy).",
            "",
            "| path | Triton µs | gateway µs | Redis µs | proxy µs | beyond Triton µs | vs. the floor |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        floor = next((r for r in results if r.name.startswith("minimal raw-bytes proxy")), None)
        for r in results:
            beyond = sum(r.cpu_us_per_request(group) for group in HOP_GROUPS)
            versus = f"{beyond / sum(floor.cpu_us_per_request(g) for g in HOP_GROUPS):.2f}" if floor and beyond else "—"
            lines.append(
                f"| {r.name} | {r.cpu_us_per_request('triton'):,.0f} | {r.cpu_us_per_request('gateway'):,.0f} | "
                f"{r.cpu_us_per_request('redis'):,.0f} | {r.cpu_us_per_request('proxy'):,.0f} | {beyond:,.0f} | {versus} |"
            )
    return "\n".join(lines) + "\n"


def bench_key(stack: EphemeralStack) -> str:
    """A developer key of a new tenant "bench" whose limits and quotas sit far above any load,
    so that every call still runs the rate-limit and quota script in Redis, as in production."""
    with Client(stack.gateway, stack.admin_key) as admin:
        admin.create_tenant("bench")
        record, key = admin.create_api_key("bench", "developer")
        admin.set_api_key_rate_limit(record.id, 1e6, burst=1_000_000, tokens_per_minute=10**9)
        admin.set_quota(admin_pb2.Quota(tenant="bench", requests_per_day=10**12, tokens_per_day=10**12))
    return key


INTRO = (
    "# Benchmarks\n\nWritten by `make bench` (benchmarks/run.py, train.py, embed.py, generate.py, llm.py,\n"
    "http_api.py, rollout.py, model_transport.py, fleet.py, artifacts.py, monitoring.py).\n"
    "Each run puts its section at the top: newest first, earlier runs kept below for their analysis.\n\n"
)


def add_section(path: Path, section: str) -> None:
    """Put a new run's section first, under the title; everything already there stays below it."""
    text = path.read_text() if path.exists() else ""
    first = text.find("\n#")  # the first section (or group heading) after the title
    earlier = text[first + 1 :] if first >= 0 else ""
    path.write_text(INTRO + section.rstrip() + "\n" + ("\n" + earlier if earlier else ""))


def serving_processes(stack: EphemeralStack) -> dict[str, int]:
    """The root process of Triton's first node, the gateway (its workers are its children) and
    Redis: the groups a CpuProbe reads."""
    children = json.loads((stack.home / "run" / "stack.json").read_text())["children"]
    triton_pid = int((stack.home / "inference" / "nodes" / "triton-0" / "triton.pid").read_text())
    return {"triton": triton_pid, "gateway": children["gateway"]["pid"], "redis": children["redis"]["pid"]}


def run_stack(
    workers: int, clients_runs: list[int], seconds: float, batch_size: int, gateway_only: bool
) -> dict[str, list[Result]]:
    """One stack whose gateway has `workers` processes, the paths measured at each client count."""
    stack = EphemeralStack()
    stack.env["MAAS_GATEWAY_WORKERS"] = str(workers)
    with tempfile.TemporaryDirectory() as scratch, stack:
        digits = train_digits_mlp(Path(scratch))
        key = bench_key(stack)
        client = Client(stack.gateway, key)
        client.create_model("digits")
        client.upload_version("digits", digits.path, format="torchscript", signature=SIGNATURE)
        client.create_deployment("digits", "digits", version=1, max_batch_size=32)
        client.create_deployment("digits-cached", "digits", version=1, max_batch_size=32, cacheable=True)
        client.wait_ready("digits", timeout=180)
        client.wait_ready("digits-cached", timeout=180)
        batch = digits.test_x[:batch_size]
        proxy_address = f"127.0.0.1:{free_port()}"
        token = (stack.home / "triton.token").read_text().strip()
        triton_address = f"127.0.0.1:{stack.env['MAAS_TRITON_GRPC_PORT']}"
        proxy = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.raw_proxy", "--listen", proxy_address,
             "--triton", triton_address, "--token", token],
            cwd=ROOT,
        )
        try:
            probe = CpuProbe(serving_processes(stack) | {"proxy": proxy.pid})
            label = "1 gateway process" if workers == 1 else f"{workers} gateway workers"
            return {
                f"{clients} concurrent clients, {label}": asyncio.run(
                    measure(stack, key, batch, clients, seconds, proxy_address, probe, gateway_only)
                )
                for clients in clients_runs
            }
        finally:
            proxy.terminate()
            proxy.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--workers", type=int, default=2, help="also measure a gateway of this many workers at 16 clients (1: skip)"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()

    runs = run_stack(1, args.clients, args.seconds, args.batch, gateway_only=False)
    if args.workers > 1:
        runs |= run_stack(args.workers, [16], args.seconds, args.batch, gateway_only=True)
    section = report(runs, args.seconds, args.batch)
    print(section)
    add_section(args.output, section)


if __name__ == "__main__":
    main()
