"""A large artifact goes up and comes back down in chunks, never whole in memory."""

from __future__ import annotations

import contextlib
import hashlib
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from maas.registry.v1 import registry_pb2 as pb

from services.registry.config import RegistrySettings
from tests.unit.registry.conftest import TOKEN, TenantStub, linear_signature, temp_files

MIB = 1024 * 1024
ARTIFACT_MIB = 200


@pytest.fixture
def registry_settings(tmp_path: Path) -> RegistrySettings:
    # The production chunk size, so the download is realistic.
    return RegistrySettings(home=tmp_path / "home", registry_addr="127.0.0.1:0", internal_token=TOKEN)


class Blob(torch.nn.Module):
    """A real TorchScript module whose bulk is one uint8 buffer; forward is the identity."""

    def __init__(self, mib: int) -> None:
        super().__init__()
        self.register_buffer("blob", torch.randint(0, 256, (mib * MIB,), dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def write_large_torchscript(path: Path, mib: int) -> str:
    """A TorchScript archive with `mib` MiB of tensor data; returns its sha256. The module is
    freed before the caller measures anything."""
    torch.jit.save(torch.jit.script(Blob(mib)), str(path))
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def vm_peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/self/status")


@contextlib.contextmanager
def peak_memory_growth() -> Iterator[Callable[[], int]]:
    """Bytes by which the process's peak memory grew inside the block: the resident-set high-water
    mark when Linux lets us reset it, else the peak of Python allocations (tracemalloc)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        tracemalloc.start()
        try:
            yield lambda: tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return
    baseline = vm_peak_kib()
    yield lambda: (vm_peak_kib() - baseline) * 1024


@pytest.mark.slow
async def test_a_large_artifact_streams_through_without_being_held(
    stub: TenantStub, registry_settings: RegistrySettings, tmp_path: Path
) -> None:
    artifact = tmp_path / "big.pt"
    digest = write_large_torchscript(artifact, ARTIFACT_MIB)
    size = artifact.stat().st_size
    await stub.create_model("big")

    async def requests():
        header = pb.VersionHeader(
            model="big",
            format=pb.ARTIFACT_FORMAT_TORCHSCRIPT,
            signature=linear_signature(),
            sha256=digest,
            size_bytes=size,
        )
        yield pb.UploadVersionRequest(header=header)
        with artifact.open("rb") as file:
            while chunk := file.read(MIB):
                yield pb.UploadVersionRequest(chunk=chunk)

    with peak_memory_growth() as growth:
        version = (await stub.UploadVersion(requests())).version
        downloaded, received = hashlib.sha256(), 0
        async for response in stub.DownloadVersion(
            pb.DownloadVersionRequest(model="big", version=version.version)
        ):
            downloaded.update(response.chunk)
            received += len(response.chunk)
        peak = growth()

    assert (version.sha256, version.size_bytes) == (digest, size)
    assert (downloaded.hexdigest(), received) == (digest, size)
    assert temp_files(registry_settings) == []
    # Chunks in flight, gRPC buffers and allocator slack only (about 30 MiB here, 55 MiB for 1 GiB).
    assert peak < 80 * MIB, f"peak memory grew by {peak / MIB:.0f} MiB for a {size / MIB:.0f} MiB artifact"
