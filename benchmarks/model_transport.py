"""`make bench`: how a model reaches a Triton node without a shared folder, for the serving fleet
(issue 12). One 100 MB TorchScript model, loaded into a real tritonserver (our python backend,
the Landlock-fenced stub, the token) three ways, in one run:

- shared folder: the model directory written into the node's repository, then a load by name
  (what a single node does today; the baseline);
- files in the load request: config and files sent in Triton's RepositoryModelLoad call, no
  folder shared with the node;
- S3: the node's repository is an S3 bucket (a real SeaweedFS server on loopback) that Triton
  reads itself on load.

Each load is timed from the call to the model answering an inference, then unloaded; the
median of a few rounds is reported with the inference service's CPU time for the load.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import boto3
import numpy as np
import torch
from google.protobuf import json_format, text_format
from maas.common.v1 import common_pb2
from tritonclient.grpc import model_config_pb2, service_pb2

from benchmarks.run import ROOT, add_section, machine
from services.common.channels import TRITON_TOKEN_HEADER
from services.inference.repository import ARTIFACT_FILE, RUNNER_FILES, ModelRepository, ModelSpec, config_text
from services.inference.triton import TritonClient, TritonLaunch, TritonSupervisor
from services.stack.ephemeral import free_port
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, run_s3_server

MIB = 1024 * 1024
SIGNATURE = common_pb2.Signature(
    inputs=[common_pb2.TensorSpec(name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=[4])],
    outputs=[common_pb2.TensorSpec(name="y", datatype=common_pb2.DATA_TYPE_FP32, shape=[4])],
)


class Blob(torch.nn.Module):
    """Doubles its input; its bulk is one buffer of `mib` MiB."""

    def __init__(self, mib: int) -> None:
        super().__init__()
        self.register_buffer("blob", torch.randint(0, 256, (mib * MIB,), dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0


def model_files(artifact: Path, name: str) -> dict[str, bytes]:
    """The files of one model directory, by path inside it, as the inference service writes them."""
    sha256 = hashlib.sha256(artifact.read_bytes()).hexdigest()
    spec = ModelSpec(
        triton_model=name, format="TORCHSCRIPT", sha256=sha256, signature=SIGNATURE, max_batch_size=8,
        instances=1, device="CPU", on_gpu=False,
    )
    files = {"config.pbtxt": config_text(spec).encode()}
    files |= {f"1/{file}": source.read_bytes() for file, source in RUNNER_FILES[spec.task].items()}
    files[f"1/{ARTIFACT_FILE['TORCHSCRIPT']}"] = artifact.read_bytes()
    return files


async def answered(client: TritonClient, name: str) -> None:
    request = service_pb2.ModelInferRequest(model_name=name)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    response = await client.infer(request, timeout=60)
    assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [2.0] * 4


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def timed(load, client: TritonClient, name: str) -> tuple[float, float]:
    started, cpu = time.perf_counter(), cpu_seconds()
    await load()
    await answered(client, name)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    await client.unload(name)
    while await client.is_ready(name):
        await asyncio.sleep(0.1)
    await asyncio.sleep(1)  # the stub's exit
    return seconds, cpu


async def start_node(directory: Path, token: str, repository: str | None = None, env: dict | None = None):
    """A tritonserver as the inference service runs it; `repository` replaces its local folder."""
    ports = [free_port() for _ in range(3)]
    client = TritonClient(f"127.0.0.1:{ports[0]}", token)

    async def nothing() -> None:
        return None

    launch = TritonLaunch(directory=directory, grpc_port=ports[0], http_port=ports[1], metrics_port=ports[2],
                          token=token)
    supervisor = TritonSupervisor(
        launch=launch, client=client, external=False, start_timeout=60, on_start=nothing, on_exit=nothing
    )
    if repository is None:
        await supervisor.start()
        return supervisor, client, None
    await asyncio.to_thread(supervisor._prepare)
    command = [repository if arg.startswith("--model-repository=") else arg for arg in supervisor.launch.command()]
    log = (directory / "triton.log").open("ab")
    process = subprocess.Popen(command, env={**supervisor.launch.environment(), **(env or {})}, stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while not await client.is_live():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((directory / "triton.log").read_text()[-3000:])
        await asyncio.sleep(0.2)
    return None, client, process


async def measure(mib: int, rounds: int, scratch: Path) -> dict[str, tuple[float, float]]:
    artifact = scratch / "blob.pt"
    torch.jit.save(torch.jit.script(Blob(mib)), str(artifact))
    token = os.urandom(16).hex()
    results: dict[str, list[tuple[float, float]]] = {}

    supervisor, client, _ = await start_node(scratch / "node", token)
    repository = ModelRepository(scratch / "node" / "models", scratch / "node" / "staging")
    try:
        for index in range(rounds):
            name = f"shared_{index}"
            files = model_files(artifact, name)

            async def shared(name=name, files=files) -> None:
                for path, data in files.items():
                    target = repository.path(name) / path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                await client.load(name, timeout=300)

            results.setdefault("shared folder, load by name (today's single node)", []).append(
                await timed(shared, client, name)
            )
            name = f"sent_{index}"
            files = model_files(artifact, name)

            async def sent(name=name, files=files) -> None:
                # The config goes as JSON beside the files; Triton writes them to a folder of its own.
                config = text_format.Parse(files["config.pbtxt"].decode(), model_config_pb2.ModelConfig())
                await client._control.load_model(
                    name,
                    config=json_format.MessageToJson(config),
                    files={f"file:{path}": data for path, data in files.items() if path != "config.pbtxt"},
                    headers={TRITON_TOKEN_HEADER: token},
                    client_timeout=300,
                )

            results.setdefault("files in the load request (no shared folder)", []).append(
                await timed(sent, client, name)
            )
    finally:
        await client.close()
        await supervisor.stop()

    s3_dir = scratch / "s3"
    s3_dir.mkdir()
    servers = run_s3_server(s3_dir, bucket="models")
    s3 = next(servers)
    try:
        bucket = boto3.client(
            "s3", endpoint_url=s3.endpoint_url, region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        )
        # Triton checks at start that the repository is a folder: one object makes the prefix one.
        bucket.put_object(Bucket="models", Key="repository/README", Body=b"models for the transport benchmark\n")
        host = s3.endpoint_url.removeprefix("http://")
        env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}
        _, client, process = await start_node(
            scratch / "s3node", token, f"--model-repository=s3://http://{host}/models/repository", env
        )
        try:
            for index in range(rounds):
                name = f"s3_{index}"
                files = model_files(artifact, name)

                async def from_s3(name=name, files=files) -> None:
                    for path, data in files.items():
                        await asyncio.to_thread(
                            bucket.put_object, Bucket="models", Key=f"repository/{name}/{path}", Body=data
                        )
                    await client.load(name, timeout=300)

                results.setdefault("S3 repository Triton reads itself (upload included)", []).append(
                    await timed(from_s3, client, name)
                )
        finally:
            await client.close()
            process.terminate()
            process.wait(timeout=30)
    finally:
        next(servers, None)
    return {
        path: (statistics.median(s for s, _ in runs), statistics.median(c for _, c in runs))
        for path, runs in results.items()
    }


def report(results: dict[str, tuple[float, float]], mib: int, rounds: int) -> str:
    today = datetime.date.today().isoformat()
    baseline = next(iter(results.values()))[0]
    lines = [
        f"## Model transport to a Triton node — {today}",
        "",
        f"Machine: {machine()}. No GPU.",
        f"Model: a {mib} MiB TorchScript module (python backend, fenced stub, 1 CPU instance). Time from "
        "the load call until the model answered one inference; the median of "
        f"{rounds} rounds. CPU: this process (the inference service's side) during the load.",
        "",
        "| how the files reach the node | load → first answer, s | ratio | CPU of the caller, s |",
        "|---|---:|---:|---:|",
    ]
    for path, (seconds, cpu) in results.items():
        lines.append(f"| {path} | {seconds:.2f} | {seconds / baseline:.2f} | {cpu:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="maas-transport-") as scratch:
        results = asyncio.run(measure(args.mib, args.rounds, Path(scratch)))
    section = report(results, args.mib, args.rounds)
    print(section)
    add_section(args.output, section)


if __name__ == "__main__":
    main()
