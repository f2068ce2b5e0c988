"""`python -m benchmarks.artifacts`: a large model's bytes through the gateway (issue 13). One TorchScript of about
400 MB (a module holding one big buffer) is uploaded with the SDK (Client.upload_version),
downloaded back (Client.download_version, its sha256 checked) and deployed until READY. Each
transfer runs through the gateway and straight to the registry's internal port (the same SDK
code with the internal token in place of an API key), so the gateway's share shows.

For every transfer: MB/s (10^6 bytes a second, the whole call: an upload's call returns once the
registry has verified, checked and stored the bytes) and the resident-set growth of the gateway
(with its workers), the registry (not its operator-check zygote, reported apart) and this client:
each process's peak during the transfer (VmHWM, reset just before, and VmRSS sampled every 50 ms)
less its resident set just before. The gateway runs one process (MAAS_GATEWAY_WORKERS=1); the
median and the best of a few rounds are reported.

Then encryption at rest (issue 16): the upload throughput and the deploy time of a ~100 MB
artifact on two stacks alike but for MAAS_REGISTRY_ENCRYPTION, in the same run, as ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch
from maas import Client

from benchmarks.model_transport import SIGNATURE, Blob
from benchmarks.run import ROOT, CpuProbe, add_section, bench_key, machine, process_tree
from services.common.channels import internal_metadata
from services.stack.ephemeral import EphemeralStack

MB = 1_000_000
SAMPLE_SECONDS = 0.05
# The two stacks of the encryption comparison: MAAS_REGISTRY_ENCRYPTION of each.
ENCRYPTION = {"without encryption": "false", "with encryption": "true"}
# What encryption may cost: of upload throughput, and of the time a deployment takes to be READY.
ENCRYPTION_BUDGET = 0.15
TENANT = "bench"
MODEL = "big"
T = TypeVar("T")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(f"{field} not in /proc/{pid}/status")


class RssPeaks:
    """Resident-set growth of named groups of processes over a `with` block: each process's
    peak (VmHWM, reset on entry, and VmRSS sampled every 50 ms) less its VmRSS on entry, summed
    over the group."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.growth: dict[str, float] = {}  # MB, once the block has ended
        self._before: dict[int, int] = {}
        self._peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _pids(self) -> Iterator[int]:
        for pids in self.groups.values():
            yield from pids

    def __enter__(self) -> RssPeaks:
        for pid in self._pids():
            # "5" resets the peak resident set (VmHWM) to the current one.
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            self._before[pid] = self._peak[pid] = _status_kib(pid, "VmRSS")
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            for pid in self._pids():
                with contextlib.suppress(OSError):
                    self._peak[pid] = max(self._peak[pid], _status_kib(pid, "VmRSS"))

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._sampler.join()
        for pid in self._pids():
            self._peak[pid] = max(self._peak[pid], _status_kib(pid, "VmHWM"))
        self.growth = {
            name: sum(self._peak[pid] - self._before[pid] for pid in pids) * 1024 / MB
            for name, pids in self.groups.items()
        }


@dataclass
class Transfer:
    seconds: float
    growth: dict[str, float]  # MB per process group


@dataclass
class Measured:
    transfers: dict[str, list[Transfer]]
    deploy_seconds: float  # create_deployment until READY
    size: int  # the artifact's bytes
    loads: list[float]  # the 1-minute load average before each round
    zygote_mb: float  # the operator-check zygote's resident set after the transfers


def load_1min() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(MB):
            digest.update(block)
    return digest.hexdigest()


def zygote_mb(registry_pid: int) -> float:
    """The resident set of the registry's operator-check zygote (torch imported), 0 if none runs."""
    for pid in process_tree(registry_pid):
        with contextlib.suppress(OSError):
            if b"services.registry.torchscript_ops" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return _status_kib(pid, "VmRSS") * 1024 / MB
    return 0.0


def timed(groups: dict[str, list[int]], transfer: Callable[[], T]) -> tuple[Transfer, T]:
    with RssPeaks(groups) as peaks:
        started = time.perf_counter()
        result = transfer()
        seconds = time.perf_counter() - started
    return Transfer(seconds, peaks.growth), result


def measure(size_mb: int, rounds: int, scratch: Path) -> Measured:
    artifact = scratch / "big.pt"
    torch.jit.save(torch.jit.script(Blob(size_mb)), str(artifact))
    size, digest = artifact.stat().st_size, sha256_of(artifact)
    stack = EphemeralStack()
    stack.env["MAAS_GATEWAY_WORKERS"] = "1"
    with stack:
        key = bench_key(stack)
        children = json.loads((stack.home / "run" / "stack.json").read_text())["children"]
        workers_file = stack.home / "run" / "gateway-workers.json"
        workers = json.loads(workers_file.read_text())["workers"] if workers_file.exists() else []
        groups = {
            "gateway": [children["gateway"]["pid"], *(worker["pid"] for worker in workers)],
            "registry": [children["registry"]["pid"]],
            "client": [os.getpid()],
        }
        token = (stack.home / "internal.token").read_text().strip()
        gateway = Client(stack.gateway, key)
        direct = Client(stack.env["MAAS_REGISTRY_ADDR"])
        # The registry's own port takes the metadata the gateway asserts, not an API key.
        direct._metadata = internal_metadata(token, TENANT)
        gateway.create_model(MODEL)
        results: dict[str, list[Transfer]] = {
            f"{kind}, {path}": [] for kind in ("upload", "download") for path in ("gateway", "registry direct")
        }
        loads = []
        try:
            paths = [("gateway", gateway), ("registry direct", direct)]
            for _ in range(rounds):
                loads.append(load_1min())
                # Each path goes first every other round: the one after another transfer finds the
                # memory that transfer freed still warm (see "Reading it" in BENCHMARKS.md).
                paths.reverse()
                for path, client in paths:
                    upload, version = timed(groups, partial(
                        client.upload_version, MODEL, artifact, format="torchscript", signature=SIGNATURE
                    ))
                    results[f"upload, {path}"].append(upload)
                    copy = scratch / "copy.pt"
                    download, _ = timed(groups, partial(client.download_version, MODEL, version.version, copy))
                    results[f"download, {path}"].append(download)
                    if sha256_of(copy) != digest:
                        raise RuntimeError(f"the download through {path} differs from the upload")
                    copy.unlink()
            zygote = zygote_mb(children["registry"]["pid"])
            started = time.perf_counter()
            gateway.create_deployment(MODEL, MODEL, version=1)
            gateway.wait_ready(MODEL, timeout=600)
            deploy_seconds = time.perf_counter() - started
        finally:
            gateway.close()
            direct.close()
    return Measured(results, deploy_seconds, size, loads, zygote)


def report(measured: Measured, rounds: int) -> str:
    size = measured.size
    lines = [
        f"## A large model through the gateway — {datetime.date.today().isoformat()}",
        "",
        f"Machine: {machine()}. 1-minute load average before each round: "
        f"{', '.join(f'{load:.2f}' for load in measured.loads)}.",
        f"Model: a TorchScript file of {size / MB:,.0f} MB (one random uint8 buffer), sent and fetched "
        "with the SDK (1 MiB chunks) through the gateway (one process) and straight to the registry's "
        f"internal port, on loopback; {rounds} rounds, MB = 10^6 bytes. An upload is timed until its "
        "call returns: the registry has hashed, fsynced, checked (pickle scan, and the operator check "
        "in a process forked from its zygote, which loads the archive with torch) and stored it. RSS "
        "growth: each process's peak during the transfer less its resident set before it, the largest "
        "of the rounds.",
        "",
        "| transfer | MB/s, median | MB/s, best | s, median | gateway RSS growth, MB | registry RSS growth, MB "
        "| client RSS growth, MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in measured.transfers.items():
        seconds = statistics.median(run.seconds for run in runs)
        best = min(run.seconds for run in runs)
        growth = {group: max(run.growth[group] for run in runs) for group in runs[0].growth}
        lines.append(
            f"| {name} | {size / MB / seconds:,.0f} | {size / MB / best:,.0f} | {seconds:.2f} | "
            f"{growth['gateway']:.0f} | {growth['registry']:.0f} | {growth['client']:.0f} |"
        )
    lines += [
        "",
        f"Deployment of version 1 until READY (Triton loads the model): {measured.deploy_seconds:.1f} s. "
        f"The registry's operator-check zygote held {measured.zygote_mb:.0f} MB resident.",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class EncryptionMeasured:
    upload_seconds: dict[str, list[float]]  # per ENCRYPTION name, one per round
    upload_cpu_seconds: dict[str, list[float]]  # the registry's (user + system), as above
    deploy_seconds: dict[str, list[float]]
    size: int  # bytes of the last round's artifact (every round's is the same size)
    loads: list[float]


def measure_encryption(size_mib: int, rounds: int, scratch: Path) -> EncryptionMeasured:
    """Upload (straight to the registry's port, as `measure` does) and deploy until READY (through
    the gateway) a TorchScript of `size_mib` MiB on each of two stacks that differ only in
    MAAS_REGISTRY_ENCRYPTION, both up at once, the first of them alternating by round. Every round
    uploads new bytes: the inference service keeps artifacts by sha256, and a repeated one would
    deploy without being downloaded (and so without being opened)."""
    stacks = {name: EphemeralStack() for name in ENCRYPTION}
    upload: dict[str, list[float]] = {name: [] for name in ENCRYPTION}
    upload_cpu: dict[str, list[float]] = {name: [] for name in ENCRYPTION}
    deploy: dict[str, list[float]] = {name: [] for name in ENCRYPTION}
    loads: list[float] = []
    size = 0
    with contextlib.ExitStack() as held:
        clients: dict[str, tuple[Client, Client]] = {}
        registries: dict[str, CpuProbe] = {}
        for name, stack in stacks.items():
            stack.env["MAAS_GATEWAY_WORKERS"] = "1"
            stack.env["MAAS_REGISTRY_ENCRYPTION"] = ENCRYPTION[name]
            held.enter_context(stack)
            gateway = held.enter_context(Client(stack.gateway, bench_key(stack)))
            direct = held.enter_context(Client(stack.env["MAAS_REGISTRY_ADDR"]))
            # The registry's own port takes the metadata the gateway asserts, not an API key.
            direct._metadata = internal_metadata((stack.home / "internal.token").read_text().strip(), TENANT)
            gateway.create_model(MODEL)
            clients[name] = gateway, direct
            children = json.loads((stack.home / "run" / "stack.json").read_text())["children"]
            registries[name] = CpuProbe({"registry": children["registry"]["pid"]})
        order = list(ENCRYPTION)
        for number in range(rounds):
            loads.append(load_1min())
            artifact = scratch / f"round-{number}.pt"
            torch.manual_seed(number)
            torch.jit.save(torch.jit.script(Blob(size_mib)), str(artifact))
            size = artifact.stat().st_size
            order.reverse()
            for name in order:
                gateway, direct = clients[name]
                cpu_before, started = registries[name].read()["registry"], time.perf_counter()
                version = direct.upload_version(MODEL, artifact, format="torchscript", signature=SIGNATURE)
                upload[name].append(time.perf_counter() - started)
                upload_cpu[name].append(registries[name].read()["registry"] - cpu_before)
                deployment = f"{MODEL}-{number}"
                started = time.perf_counter()
                gateway.create_deployment(deployment, MODEL, version=version.version)
                gateway.wait_ready(deployment, timeout=600)
                deploy[name].append(time.perf_counter() - started)
                gateway.delete_deployment(deployment)
            artifact.unlink()
    return EncryptionMeasured(upload, upload_cpu, deploy, size, loads)


def encryption_report(measured: EncryptionMeasured, rounds: int) -> str:
    plain, sealed = ENCRYPTION
    throughput = {name: measured.size / MB / statistics.median(runs) for name, runs in measured.upload_seconds.items()}
    cpu = {name: statistics.median(runs) for name, runs in measured.upload_cpu_seconds.items()}
    deploy = {name: statistics.median(runs) for name, runs in measured.deploy_seconds.items()}
    upload_cost = 1 - throughput[sealed] / throughput[plain]
    deploy_cost = deploy[sealed] / deploy[plain] - 1
    within = upload_cost <= ENCRYPTION_BUDGET and deploy_cost <= ENCRYPTION_BUDGET
    return "\n".join([
        f"## Encryption at rest: a {measured.size / MB:,.0f} MB artifact — {datetime.date.today().isoformat()}",
        "",
        f"Machine: {machine()}. 1-minute load average before each round: "
        f"{', '.join(f'{load:.2f}' for load in measured.loads)}.",
        "Two stacks alike but for MAAS_REGISTRY_ENCRYPTION, up at once. Each round makes a new TorchScript "
        "file (one random uint8 buffer), uploads it to each stack straight to the registry's port with the SDK "
        "(timed until the registry has hashed, sealed, fsynced, checked and stored it) and deploys it through "
        "the gateway until READY (the inference service downloads it, the registry opening it on the way; "
        f"Triton loads it); the stack that goes first alternates. Median of {rounds} rounds, MB = 10^6 bytes. "
        "The registry's CPU time (from /proc) is steadier than wall time on a shared machine.",
        "",
        "| measure | without encryption | with encryption | with / without |",
        "|---|---:|---:|---:|",
        f"| upload, MB/s | {throughput[plain]:,.0f} | {throughput[sealed]:,.0f} | "
        f"{throughput[sealed] / throughput[plain]:.2f} |",
        f"| registry CPU per upload (user + system), s | {cpu[plain]:.2f} | {cpu[sealed]:.2f} | "
        f"{cpu[sealed] / cpu[plain]:.2f} |",
        f"| deploy until READY, s | {deploy[plain]:.2f} | {deploy[sealed]:.2f} | {deploy[sealed] / deploy[plain]:.2f} |",
        "",
        f"Encryption costs {upload_cost:.1%} of the upload throughput and {deploy_cost:.1%} of the deploy time "
        f"(negative: faster, within the noise); the budget is {ENCRYPTION_BUDGET:.0%} of each: "
        f"{'within it' if within else 'OVER IT'}.",
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=400, help="the model's buffer, MiB")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--encryption-size-mib", type=int, default=96, help="the encryption comparison's buffer")
    parser.add_argument("--encryption-rounds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="maas-artifacts-") as scratch:
        measured = measure(args.size_mb, args.rounds, Path(scratch))
    section = report(measured, args.rounds)
    print(section)
    add_section(args.output, section)
    with tempfile.TemporaryDirectory(prefix="maas-encryption-") as scratch:
        encrypted = measure_encryption(args.encryption_size_mib, args.encryption_rounds, Path(scratch))
    section = encryption_report(encrypted, args.encryption_rounds)
    print(section)
    add_section(args.output, section)


if __name__ == "__main__":
    main()
