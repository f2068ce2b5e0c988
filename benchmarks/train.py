"""`make bench` (training part): the same training job through the trainer service vs. a plain
PyTorch loop in this process. Writes its section into BENCHMARKS.md.

The service path is everything a user waits for: CreateTrainingJob, the queue, the worker
process start-up (Python + torch import), the per-epoch validation and checkpoint, the
TorchScript export and the upload to the registry, until the job is SUCCEEDED. The plain loop is
the same architecture, data, optimiser, batch size and epochs with no validation, checkpoints,
export or registration. Both use the same number of CPU threads.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch
import torch.nn.functional as F
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from sklearn.datasets import load_digits

from benchmarks.run import add_section
from services.common.channels import internal_metadata
from services.common.server import running
from services.registry.config import RegistrySettings
from services.registry.server import create_app as create_registry
from services.trainer.config import TrainerSettings
from services.trainer.models import Cnn
from services.trainer.server import create_app as create_trainer

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"
BATCH = 64


def plain_loop(epochs: int, threads: int) -> tuple[float, float]:
    """Seconds and test accuracy of a bare training loop over the same data and model."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32))
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    test, train = order[:269], order[538:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    model = Cnn((8, 8), 10, [32, 64], 128, 0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(epochs):
        model.train()
        shuffled = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))]
        for step in range(len(shuffled) // BATCH):
            batch = shuffled[step * BATCH : (step + 1) * BATCH]
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    return time.perf_counter() - started, accuracy


async def through_service(epochs: int, threads: int, home: Path) -> dict[str, float]:
    registry_settings = RegistrySettings(home=home, registry_addr="127.0.0.1:0", internal_token=TOKEN)
    async with running(await create_registry(registry_settings)) as registry:
        settings = TrainerSettings(
            home=home, trainer_addr="127.0.0.1:0", registry_addr=f"127.0.0.1:{registry.port}",
            internal_token=TOKEN, trainer_max_running_jobs=1, trainer_threads_per_job=threads,
        )
        async with running(await create_trainer(settings)) as trainer, \
                grpc.aio.insecure_channel(f"127.0.0.1:{trainer.port}") as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            metadata = internal_metadata(TOKEN, "bench")
            spec = trainer_pb2.TrainingSpec(
                architecture=trainer_pb2.Architecture(cnn=trainer_pb2.CnnArchitecture()),
                dataset=trainer_pb2.DatasetSource(builtin="digits"), epochs=epochs, batch_size=BATCH,
                device=trainer_pb2.DEVICE_CPU,
            )
            started = time.perf_counter()
            request = trainer_pb2.CreateTrainingJobRequest(spec=spec, model="bench-cnn")
            job = (await stub.CreateTrainingJob(request, metadata=metadata)).job
            marks: dict[str, float] = {}
            rate = 0.0
            async for response in stub.WatchJob(trainer_pb2.WatchJobRequest(id=job.id), metadata=metadata):
                kind = response.event.WhichOneof("kind")
                marks.setdefault(kind, time.perf_counter() - started)
                if kind == "progress":
                    rate = response.event.progress.samples_per_second
                if kind == "finished":
                    finished = response.event.finished
            assert finished.state == trainer_pb2.JOB_STATE_SUCCEEDED, finished.reason
            return {"seconds": time.perf_counter() - started, "started": marks["started"],
                    "accuracy": finished.result.metrics["test_accuracy"], "samples_per_second": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 300])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=2, help="Runs per path; the fastest counts")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    train_samples = 1797 - 2 * 269
    rows = []
    for epochs in args.epochs:
        plain_runs, service_runs = [], []
        for _ in range(args.repeat):  # interleaved, so a burst of load elsewhere hits both paths
            plain_runs.append(plain_loop(epochs, args.threads))
            with tempfile.TemporaryDirectory() as home:
                service_runs.append(asyncio.run(through_service(epochs, args.threads, Path(home))))
        plain_seconds, plain_accuracy = min(plain_runs)
        service = min(service_runs, key=lambda run: run["seconds"])
        samples = epochs * (train_samples // BATCH) * BATCH
        rows.append(
            f"| {epochs} | {plain_seconds:.2f} | {service['seconds']:.2f} | {service['seconds'] / plain_seconds:.2f} "
            f"| {samples / plain_seconds:,.0f} | {samples / service['seconds']:,.0f} "
            f"| {service['samples_per_second']:,.0f} | {service['started']:.2f} "
            f"| {plain_accuracy:.4f} | {service['accuracy']:.4f} |"
        )
    section = "\n".join([
        f"## Training: trainer service vs. a plain PyTorch loop — {datetime.date.today().isoformat()}",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}, {args.threads} threads in both paths. "
        f"Job: CNN (32, 64 channels, 128 hidden) on scikit-learn digits, Adam 1e-3, batch {BATCH}, "
        f"{train_samples} training samples.",
        "Service wall time = CreateTrainingJob until the SUCCEEDED event: queue, worker process start-up, "
        "per-epoch validation and checkpoint, TorchScript export, registry upload. Plain loop = the "
        f"training steps only, in this process (torch already imported). Fastest of {args.repeat} interleaved "
        "runs per path.",
        "",
        "| epochs | plain s | service s | wall-time ratio | plain samples/s | service samples/s (end to end) "
        "| worker samples/s (its own report) | worker started after s | plain test acc | service test acc |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ])
    print(section)
    add_section(args.output, section)


if __name__ == "__main__":
    main()
