"""`make bench` (issue 12): the serving fleet, on three embedded Triton nodes behind the gateway.

1. One replica against two, same run, at 16 and 64 clients: the digits MLP (light: the
   gateway's own work dominates) and a compute-bound model (tests/support/heavy.py: Triton's
   work dominates). On a 2-core machine the nodes share the cores: read the ratio as what a
   second node buys when the CPU is already shared, not what it buys on its own hardware.
2. A node killed with kill -9 under 16 clients: failed requests and p99 against steady state,
   and the time until the deployment is back to 2 ready replicas.
3. A load spike on a deployment with min 1, max 2 replicas: the time to the scaling decision and
   to the new replica serving.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import signal
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from maas import Client, to_tensor
from maas.inference.v1 import inference_pb2, inference_pb2_grpc

from benchmarks.run import ROOT, Result, add_section, bench_key, drive, machine
from services.stack.ephemeral import EphemeralStack
from tests.support.digits import SIGNATURE, train_digits_mlp
from tests.support.heavy import HEAVY_SIGNATURE, heavy_input, save_heavy

READY = inference_pb2.DEPLOYMENT_STATE_READY


def ready_nodes(client: Client, name: str) -> list[str]:
    return sorted(r.node for r in client.get_deployment(name).replicas if r.state == READY and not r.canary)


def wait_replicas(client: Client, name: str, count: int, timeout: float) -> float:
    """Seconds until the deployment has `count` ready replicas."""
    started = time.monotonic()
    while len(ready_nodes(client, name)) != count:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{name}: not {count} ready replicas within {timeout:.0f} s")
        time.sleep(0.05)
    return time.monotonic() - started


async def predict_run(stack: EphemeralStack, key: str, name: str, x: np.ndarray, clients: int, seconds: float,
                      warmup: float = 2.0, during=None) -> Result:
    """`clients` asyncio callers on one channel for `seconds`; `during` runs beside them."""
    auth = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(stack.gateway, options=[("grpc.enable_retries", 0)]) as channel:
        predict = inference_pb2_grpc.InferenceServiceStub(channel).Predict
        request = inference_pb2.PredictRequest(deployment=name, inputs=[to_tensor("x", x)])
        run = drive(name, lambda: predict(request, metadata=auth, timeout=30), clients, seconds, warmup)
        if during is None:
            return await run
        result, _ = await asyncio.gather(run, during())
        return result


def scaling_table(rows: list[tuple[str, int, Result, Result]]) -> list[str]:
    lines = [
        "| model | clients | 1 replica req/s | 2 replicas req/s | ratio | 1 replica p99 ms | 2 replicas p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, clients, one, two in rows:
        lines.append(
            f"| {model} | {clients} | {one.throughput:,.0f} | {two.throughput:,.0f} | "
            f"{two.throughput / one.throughput:.2f} | {one.p99:.1f} | {two.p99:.1f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()

    stack = EphemeralStack()
    stack.env["MAAS_TRITON_NODES"] = "3"
    with tempfile.TemporaryDirectory() as scratch, stack:
        key = bench_key(stack)
        client = Client(stack.gateway, key)
        digits = train_digits_mlp(Path(scratch))
        client.create_model("digits")
        client.upload_version("digits", digits.path, format="torchscript", signature=SIGNATURE)
        client.create_model("heavy")
        client.upload_version("heavy", save_heavy(Path(scratch)), format="torchscript", signature=HEAVY_SIGNATURE)
        models = {"digits MLP (light)": ("digits", digits.test_x[:1]), "compute-bound (heavy)": ("heavy", heavy_input())}
        for model in ("digits", "heavy"):
            client.create_deployment(f"{model}-1", model, version=1, replicas=1, max_batch_size=32)
            client.create_deployment(f"{model}-2", model, version=1, replicas=2, max_batch_size=32)
        for name in ("digits-1", "digits-2", "heavy-1", "heavy-2"):
            client.wait_ready(name, timeout=300)
            wait_replicas(client, name, 2 if name.endswith("-2") else 1, 120)

        rows = []
        for label, (model, x) in models.items():
            for clients in args.clients:
                one = asyncio.run(predict_run(stack, key, f"{model}-1", x, clients, args.seconds))
                two = asyncio.run(predict_run(stack, key, f"{model}-2", x, clients, args.seconds))
                rows.append((label, clients, one, two))
                print(label, clients, round(one.throughput), round(two.throughput))

        # A node killed under load.
        x = digits.test_x[:1]
        steady = asyncio.run(predict_run(stack, key, "digits-2", x, 16, args.seconds))
        victim = ready_nodes(client, "digits-2")[0]
        recovery: dict[str, float] = {}

        async def kill_then_wait() -> None:
            await asyncio.sleep(2.0 + 2.0)  # warm-up, then two seconds of measured load
            pid = int((stack.home / "inference" / "nodes" / victim / "triton.pid").read_text())
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            recovery["back"] = await asyncio.to_thread(wait_replicas_after, client, "digits-2", victim, killed)

        during_kill = asyncio.run(predict_run(stack, key, "digits-2", x, 16, args.seconds, during=kill_then_wait))

        # A load spike on an autoscaled deployment (default windows: scale-up after 5 s above target).
        client.create_deployment("elastic", "heavy", version=1, min_replicas=1, max_replicas=2, target_in_flight=2)
        client.wait_ready("elastic", timeout=300)
        spike: dict[str, float] = {}
        reasons: dict[str, str] = {}

        async def watch_spike() -> None:
            began = time.time()
            spike["serving"] = await asyncio.to_thread(wait_replicas, client, "elastic", 2, 120)
            decided = client.get_deployment("elastic").scaling_events[0]
            spike["decision"] = decided.time.ToDatetime(datetime.UTC).timestamp() - began
            reasons["spike"] = decided.reason

        spike_seconds = 40.0
        asyncio.run(predict_run(stack, key, "elastic", heavy_input(), 16, spike_seconds, warmup=0, during=watch_spike))
        client.close()

    today = datetime.date.today().isoformat()
    lines = [
        f"## Serving fleet: replicas, node kill, autoscaling ({today})",
        "",
        f"Machine: {machine()}. Three embedded Triton nodes (`MAAS_TRITON_NODES=3`) behind the gateway, "
        f"maas Predict, batch 1, {args.seconds:.0f} s per run after 2 s of warm-up; every call made once "
        "(gRPC retries off). The nodes, the gateway and the client share the 2 cores.",
        "",
        "### One replica against two",
        "",
        *scaling_table(rows),
        "",
        "### kill -9 of one of two replicas' nodes, 16 clients",
        "",
        "| run | req/s | failed | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, result in (("steady state", steady), ("node killed 2 s into the run", during_kill)):
        lines.append(
            f"| {label} | {result.throughput:,.0f} | {result.errors} | {result.p50:.1f} | {result.p99:.1f} | "
            f"{max(result.latencies) * 1000:.0f} |"
        )
    lines += [
        "",
        f"Back to 2 ready replicas {recovery['back']:.1f} s after the kill (the dead node is DOWN at once: "
        "its supervisor sees the process exit; the replica is loaded on another node).",
        "",
        "### Load spike to a second replica (compute-bound model, min 1, max 2, target 2 in flight)",
        "",
        f"- scaling decision {spike['decision']:.1f} s after the spike began "
        f"(`MAAS_INFERENCE_SCALE_UP_WINDOW_SECONDS=5`): \"{reasons['spike']}\"",
        f"- new replica serving {spike['serving']:.1f} s after the spike began "
        f"({spike['serving'] - spike['decision']:.1f} s to place and load it)",
        "",
    ]
    section = "\n".join(lines)
    print(section)
    add_section(args.output, section)


def wait_replicas_after(client: Client, name: str, victim: str, killed: float) -> float:
    """Seconds from the kill until the deployment has 2 ready replicas again (without the dead
    node's old one: it first has to leave the route)."""
    while victim in ready_nodes(client, name):
        time.sleep(0.02)
    wait_replicas(client, name, 2, 60)
    return time.monotonic() - killed


if __name__ == "__main__":
    main()
