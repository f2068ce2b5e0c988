"""`make bench`: Predict latency through the gateway while a deployment rolls to a new version,
against the steady state just before, in the same run: once for an alias move (the deployment
follows `production`), once for a canary that is started and promoted. Writes the "Rolling
updates" section of BENCHMARKS.md.

Concurrent asyncio clients call Predict without pause; every call's start, latency and outcome
is kept, and each phase's window is read from those timestamps."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from maas import Client, to_tensor
from maas.inference.v1 import inference_pb2, inference_pb2_grpc

from benchmarks.run import ROOT, add_section, machine
from services.stack.ephemeral import EphemeralStack
from tests.support.digits import SIGNATURE, train_digits_mlp

SECTION = "## Rolling updates"
# After the switch, how long the window stays open: past the drain of the replaced version.
AFTER_SWITCH_SECONDS = 4.0


@dataclass
class Calls:
    """Every Predict of a run: (start, seconds, version or 0 when it failed)."""

    records: list[tuple[float, float, int]] = field(default_factory=list)

    def window(self, start: float, end: float) -> list[tuple[float, float, int]]:
        return [r for r in self.records if start <= r[0] < end]


@dataclass
class Phase:
    name: str
    steady: list[tuple[float, float, int]]
    rolling: list[tuple[float, float, int]]
    switch_seconds: float  # from the operation to the new version answering everything


def _ms(records: list[tuple[float, float, int]], quantile: float) -> float:
    latencies = [seconds for _, seconds, version in records if version]
    return float(np.percentile(latencies, quantile)) * 1000 if latencies else float("nan")


async def _load(stub, request, metadata, calls: Calls, clients: int, stop: asyncio.Event) -> None:  # type: ignore[no-untyped-def]
    async def client() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = await stub.Predict(request, metadata=metadata, timeout=30)
            except grpc.aio.AioRpcError:
                calls.records.append((started, time.monotonic() - started, 0))
                continue
            calls.records.append((started, time.monotonic() - started, response.version))

    await asyncio.gather(*(client() for _ in range(clients)))


async def _phase(
    name: str,
    gateway: str,
    key: str,
    deployment: str,
    x: np.ndarray,
    clients: int,
    steady_seconds: float,
    operate: Callable[[], Awaitable[None]],
) -> Phase:
    """Load `deployment`, measure `steady_seconds`, then run `operate` (the roll, returning once
    the new version serves) and keep measuring until the replaced version has drained."""
    calls, stop = Calls(), asyncio.Event()
    metadata = (("authorization", f"Bearer {key}"),)
    request = inference_pb2.PredictRequest(deployment=deployment, inputs=[to_tensor("x", x)])
    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        load = asyncio.create_task(_load(stub, request, metadata, calls, clients, stop))
        await asyncio.sleep(2.0)  # warm-up
        steady_from = time.monotonic()
        await asyncio.sleep(steady_seconds)
        operated_at = time.monotonic()
        await operate()
        while not any(r[2] == 2 for r in calls.window(time.monotonic() - 1, time.monotonic())):
            await asyncio.sleep(0.05)
        switched = time.monotonic() - operated_at
        await asyncio.sleep(AFTER_SWITCH_SECONDS)
        ended = time.monotonic()
        stop.set()
        await load
    return Phase(name, calls.window(steady_from, operated_at), calls.window(operated_at, ended), switched)


def _wait(condition: Callable[[], bool], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


async def measure(stack: EphemeralStack, key: str, x: np.ndarray, clients: int, steady: float) -> list[Phase]:
    client = Client(stack.gateway, key)

    async def move_alias() -> None:
        await asyncio.to_thread(client.set_alias, "roller", "production", 2)
        await asyncio.to_thread(
            _wait, lambda: client.get_deployment("roller").resolved_version == 2, "the alias roll"
        )

    async def canary_then_promote() -> None:
        await asyncio.to_thread(client.start_canary, "canaried", 2, 10)
        await asyncio.to_thread(
            _wait,
            lambda: client.get_deployment("canaried").canary.state == inference_pb2.DEPLOYMENT_STATE_READY,
            "the canary loading",
        )
        await asyncio.to_thread(client.promote_canary, "canaried")

    try:
        return [
            await _phase("alias roll (v1 -> v2)", stack.gateway, key, "roller", x, clients, steady, move_alias),
            await _phase(
                "canary 10% then promote", stack.gateway, key, "canaried", x, clients, steady, canary_then_promote
            ),
        ]
    finally:
        client.close()


def report(phases: list[Phase], clients: int, steady: float, load_average: float) -> str:
    lines = [
        f"{SECTION} — {datetime.date.today().isoformat()}",
        "",
        (
            f"Machine: {machine()}. No GPU. Written by `make bench` (benchmarks/rollout.py). 1-minute load "
            f"average when the measuring began: {load_average:.1f} (other work on the machine is in every number)."
        ),
        "",
        (
            f"{clients} concurrent asyncio clients call Predict through the gateway without pause (digits MLP, "
            f"batch 1, max_batch_size 32). Steady: the {steady:.0f} s before the operation. During: from the "
            f"operation until {AFTER_SWITCH_SECONDS:.0f} s after the new version answered (the old one drains "
            "and is unloaded in that window). The new revision is a separate Triton model, loaded while the old "
            "one serves; the switch is a routing change. Same run, same processes, one after the other."
        ),
        "",
        "| operation | steady p50 ms | steady p99 ms | during p50 ms | during p99 ms | p99 ratio | "
        "requests steady / during | failed | switch s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for phase in phases:
        failed = sum(1 for r in [*phase.steady, *phase.rolling] if not r[2])
        lines.append(
            f"| {phase.name} | {_ms(phase.steady, 50):.2f} | {_ms(phase.steady, 99):.2f} | "
            f"{_ms(phase.rolling, 50):.2f} | {_ms(phase.rolling, 99):.2f} | "
            f"{_ms(phase.rolling, 99) / _ms(phase.steady, 99):.2f} | {len(phase.steady):,} / "
            f"{len(phase.rolling):,} | {failed} | {phase.switch_seconds:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--steady-seconds", type=float, default=10.0)
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch, EphemeralStack() as stack:
        folders = [Path(scratch) / name for name in ("v1", "v2")]
        for folder in folders:
            folder.mkdir()
        first = train_digits_mlp(folders[0])
        second = train_digits_mlp(folders[1], epochs=3, seed=1)
        admin = Client(stack.gateway, stack.admin_key)
        admin.create_tenant("bench-rollout")
        _, key = admin.create_api_key("bench-rollout", "developer")
        admin.close()
        with Client(stack.gateway, key) as client:
            client.create_model("roller")
            for model in (first, second):
                client.upload_version("roller", model.path, format="torchscript", signature=SIGNATURE)
            client.set_alias("roller", "production", 1)
            client.create_deployment("roller", "roller", alias="production", max_batch_size=32)
            client.create_deployment("canaried", "roller", version=1, max_batch_size=32)
            client.wait_ready("roller", timeout=180)
            client.wait_ready("canaried", timeout=180)
        load_average = os.getloadavg()[0]
        phases = asyncio.run(measure(stack, key, first.test_x[:1], args.clients, args.steady_seconds))

    section = report(phases, args.clients, args.steady_seconds, load_average)
    print(section)
    add_section(args.output, section)


if __name__ == "__main__":
    main()
