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
from benchmarks.run import ROOT, add_section, bench_key, machine, process_tree
from services.common.channels import internal_metadata
from services.stack.ephemeral import EphemeralStack

MB = 1_000_000
SAMPLE_SECONDS = 0.05
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=400, help="the model's buffer, MiB")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="maas-artifacts-") as scratch:
        measured = measure(args.size_mb, args.rounds, Path(scratch))
    section = report(measured, args.rounds)
    print(section)
    add_section(args.output, section)


if __name__ == "__main__":
    main()
