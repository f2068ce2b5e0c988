"""The bulk streams' chunk messages as bytes on the wire (maas.wire): framed and
unframed exactly as protobuf would, any other message parsed as before, and the SDK's own
framing against the registry."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import grpc
import pytest
import torch
from maas import Client
from maas.registry.v1 import registry_pb2 as pb
from maas.wire import chunk_tag, frame, unframe

from services.common.channels import internal_metadata
from services.common.server import RunningServer
from services.registry.config import RegistrySettings
from tests.unit.registry.conftest import (
    TOKEN,
    TenantStub,
    expect_status,
    linear_signature,
    sha256_of,
    temp_files,
    upload_requests,
)

MESSAGES = [
    pb.UploadVersionRequest, pb.UploadDatasetVersionRequest, pb.DownloadVersionResponse, pb.DownloadDatasetVersionResponse
]
UPLOAD_VERSION = "/maas.registry.v1.RegistryService/UploadVersion"


@pytest.mark.parametrize("message_class", MESSAGES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("size", [0, 1, 127, 128, 16384, 1024 * 1024 + 7])
def test_framing_is_protobufs_own(message_class, size: int) -> None:
    chunk = bytes(range(256)) * (size // 256) + bytes(size % 256)
    serialized = message_class(chunk=chunk).SerializeToString()
    tag = chunk_tag(message_class)
    assert frame(tag, chunk) == serialized
    assert bytes(unframe(tag, serialized)) == chunk


@pytest.mark.parametrize(
    "message",
    [
        b"",
        pb.UploadVersionRequest(header=pb.VersionHeader(model="m")).SerializeToString(),
        pb.UploadVersionRequest(chunk=b"abc").SerializeToString() + b"\x18\x01",  # another field after it
        pb.UploadVersionRequest(chunk=b"abc").SerializeToString()[:-1],  # cut short
        b"\x12\x80",  # a length that never ends
        b"\x12" + b"\xff" * 10 + b"\x01",  # a varint longer than protobuf allows
    ],
    ids=["empty", "header", "extra-field", "cut", "open-length", "long-varint"],
)
def test_any_other_message_is_left_to_protobuf(message: bytes) -> None:
    assert unframe(chunk_tag(pb.UploadVersionRequest), message) is None


def raw_upload(channel: grpc.aio.Channel, messages: list[bytes], tenant: str = "tenant-a"):
    call = channel.stream_unary(UPLOAD_VERSION, response_deserializer=pb.UploadVersionResponse.FromString)
    return call(iter(messages), metadata=internal_metadata(TOKEN, tenant))


async def upload_ending_with_a_stray(channel: grpc.aio.Channel, messages: list[bytes]) -> pb.UploadVersionResponse:
    """Send `messages`, the last of them one the registry must refuse, and wait for its answer
    without sending more. A client that goes on writing after the server has answered races it:
    grpc-aio reports such a failed send as INTERNAL, whatever status the server sent."""
    call = channel.stream_unary(UPLOAD_VERSION, response_deserializer=pb.UploadVersionResponse.FromString)(
        metadata=internal_metadata(TOKEN, "tenant-a")
    )
    for message in messages:
        await call.write(message)
    return await call


async def test_chunks_protobuf_would_accept_are_accepted_however_encoded(
    stub: TenantStub, channel: grpc.aio.Channel, torchscript_bytes: bytes
) -> None:
    """A chunk with an unknown field beside it, or sent as two chunk fields (the last wins), is
    what protobuf makes of it, as before."""
    await stub.create_model("m")
    header, *chunks = [m.SerializeToString() for m in upload_requests("m", torchscript_bytes, chunk_bytes=100)]
    chunks[0] += b"\x98\x06\x01"  # field 99, varint 1: unknown to the registry
    chunks[1] = pb.UploadVersionRequest(chunk=b"overwritten").SerializeToString() + chunks[1]
    version = (await raw_upload(channel, [header, *chunks])).version
    assert version.sha256 == sha256_of(torchscript_bytes)


async def test_stray_messages_are_refused_as_before(
    stub: TenantStub, channel: grpc.aio.Channel, registry_settings: RegistrySettings, torchscript_bytes: bytes
) -> None:
    await stub.create_model("m")
    header, first, *_ = [m.SerializeToString() for m in upload_requests("m", torchscript_bytes, chunk_bytes=100)]
    await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        upload_ending_with_a_stray(channel, [header, first, header]),
        "only the first message may carry the header",
    )
    await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        upload_ending_with_a_stray(channel, [header, first, b"\x12\x80"]),
        f"the request is not a valid protobuf message for {UPLOAD_VERSION}",
    )
    await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        upload_ending_with_a_stray(channel, [b"\xff"]),
        f"the request is not a valid protobuf message for {UPLOAD_VERSION}",
    )
    assert temp_files(registry_settings) == []


class Bulky(torch.nn.Module):
    """A TorchScript module of a few MiB: several of the SDK's 1 MiB chunks, the last one short."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weights", torch.arange(700_000, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


async def test_the_sdk_round_trip(registry_server: RunningServer, tmp_path: Path) -> None:
    artifact, copy = tmp_path / "bulky.pt", tmp_path / "copy.pt"
    torch.jit.save(torch.jit.script(Bulky()), str(artifact))
    sent: list[int] = []

    def round_trip() -> tuple[pb.Version, pb.Version]:
        with Client(f"127.0.0.1:{registry_server.port}") as client:
            client._metadata = internal_metadata(TOKEN, "tenant-a")  # the registry's own port
            client.create_model("bulky")
            version = client.upload_version(
                "bulky", artifact, format="torchscript", signature=linear_signature(), progress=sent.append
            )
            return version, client.download_version("bulky", version.version, copy)

    version, record = await asyncio.to_thread(round_trip)
    data = artifact.read_bytes()
    assert len(sent) == 3 and sum(sent) == len(data)
    assert version.sha256 == record.sha256 == hashlib.sha256(data).hexdigest()
    assert copy.read_bytes() == data
