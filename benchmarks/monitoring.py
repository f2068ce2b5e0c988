"""`make bench`: what prediction logging costs Predict through the gateway. The digits MLP, with a
baseline (so that logged calls are summarized, the costly part), is called by concurrent clients
with logging off, at 1 % and at 100 % of calls, alternating between the three within one run so
that the machine's drift over time falls on all alike. Reports p50, p99, req/s and the
gateway's CPU per request (from /proc), and whether p50 stays within 5 % of logging off. Writes the
"Prediction logging" section of BENCHMARKS.md."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from maas import Client, to_tensor
from maas.inference.v1 import inference_pb2, inference_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.run import (
    ROOT,
    CpuProbe,
    Result,
    add_section,
    bench_key,
    connections,
    drive,
    machine,
    serving_processes,
    stubs,
)
from services.common import summaries
from services.stack.ephemeral import EphemeralStack
from tests.support.digits import SIGNATURE, train_digits_mlp

# Sample rates measured: off, 1 % and every call.
RATES = {"logging off": 0.0, "1 % of calls logged": 0.01, "100 % of calls logged": 1.0}
# How far p50 may move with logging on (the target).
TARGET = 0.05
# The gateway's processes reread logging settings this often (MAAS_MONITOR_CONFIG_REFRESH_SECONDS).
REFRESH_SECONDS = 1.0


async def measure(
    stack: EphemeralStack, client: Client, key: str, batch: np.ndarray, clients: int, seconds: float, rounds: int
) -> dict[str, list[Result]]:
    """Every rate once per round, in turn; each rate's results over the rounds."""
    channels = connections(stack.gateway)
    predicts = stubs(inference_pb2_grpc.InferenceServiceStub, channels)
    request = inference_pb2.PredictRequest(deployment="digits", inputs=[to_tensor("x", batch)])
    auth = (("authorization", f"Bearer {key}"),)
    probe = CpuProbe(serving_processes(stack))
    results: dict[str, list[Result]] = {name: [] for name in RATES}
    try:
        for _ in range(rounds):
            for name, rate in RATES.items():
                await asyncio.to_thread(client.set_prediction_logging, "digits", rate)
                await asyncio.sleep(2 * REFRESH_SECONDS)  # every worker follows the change
                results[name].append(
                    await drive(name, lambda: predicts().Predict(request, metadata=auth), clients, seconds, 2.0, probe)
                )
    finally:
        for channel in channels:
            await channel.close()
    return results


def logged_counts(stack: EphemeralStack) -> dict[str, float]:
    """The gateway's own counts of logged and dropped samples (all workers)."""
    text = urllib.request.urlopen(f"http://{stack.env['MAAS_GATEWAY_METRICS_ADDR']}/metrics", timeout=10).read()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == "maas_monitor_samples_logged_total":
                counts["logged"] = sample.value
            elif sample.name == "maas_monitor_samples_dropped_total":
                counts[f"dropped ({sample.labels['reason']})"] = sample.value
    return counts


def report(results: dict[str, list[Result]], counts: dict[str, float], args: argparse.Namespace) -> str:
    def p50(name: str) -> float:
        return statistics.median(r.p50 for r in results[name])

    base = p50("logging off")
    lines = [
        f"## Prediction logging — {datetime.date.today().isoformat()}",
        "",
        f"Machine: {machine()}.",
        (
            f"Model: MLP 64-64-10 (TorchScript) on scikit-learn digits with a baseline (logged calls are "
            f"summarized into its 64 feature histograms and 10 classes), batch {args.batch} per request, "
            f"max_batch_size 32. {args.clients} concurrent clients through the gateway's maas Predict "
            f"({args.workers} worker(s)), {args.seconds:.0f} s per rate after a 2 s warm-up, the rates taken "
            f"in turn {args.rounds} times; p50 and p99 are the median over the rounds, req/s and CPU the "
            "mean. Payloads are not kept (summaries and the predicted class only). "
            f"Target: p50 within {TARGET:.0%} of logging off."
        ),
        "",
        "| logging | p50 ms | p99 ms | req/s | gateway CPU µs/request | p50 vs. off | within target |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, runs in results.items():
        ratio = p50(name) / base
        cpu = sum(r.cpu.get("gateway", 0.0) for r in runs) / max(1, sum(len(r.latencies) for r in runs)) * 1e6
        lines.append(
            f"| {name} | {p50(name):.2f} | {statistics.median(r.p99 for r in runs):.2f} | "
            f"{statistics.mean(r.throughput for r in runs):,.0f} | {cpu:,.0f} | {ratio:.3f} | "
            f"{'yes' if ratio <= 1 + TARGET else 'no'} |"
        )
    if counts:
        lines += ["", "Gateway counters at the end: " + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(counts.items()))]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()

    stack = EphemeralStack()
    stack.env["MAAS_GATEWAY_WORKERS"] = str(args.workers)
    stack.env["MAAS_MONITOR_CONFIG_REFRESH_SECONDS"] = str(REFRESH_SECONDS)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch, stack:
        digits = train_digits_mlp(Path(scratch))
        key = bench_key(stack)
        with Client(stack.gateway, key) as client:
            client.create_model("digits")
            predicted = digits.reference(digits.test_x).argmax(1)
            baseline = summaries.baseline({"x": digits.test_x}, predicted, classes=10)
            client.upload_version(
                "digits", digits.path, format="torchscript", signature=SIGNATURE,
                metadata={summaries.BASELINE_KEY: baseline.to_json(), "task": "classification"},
            )
            client.create_deployment("digits", "digits", version=1, max_batch_size=32)
            client.wait_ready("digits", timeout=180)
            batch = digits.test_x[: args.batch]
            results = asyncio.run(measure(stack, client, key, batch, args.clients, args.seconds, args.rounds))
        counts = logged_counts(stack)
    section = report(results, counts, args)
    print(section)
    print(f"(whole run: {time.monotonic() - started:.0f} s)")
    add_section(args.output, section)


if __name__ == "__main__":
    main()
