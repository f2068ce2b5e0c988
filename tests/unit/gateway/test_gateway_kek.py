"""`maas admin rotate-kek` through the real gateway: a platform admin's call reaches the real
registry, which re-wraps every data key and keeps every version downloadable; anyone else is
refused before the registry hears of it; both are audited; the registry's own RotateKek is
never served to a client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from maas.cli import app
from maas.gateway.v1 import admin_pb2
from maas.registry.v1 import registry_pb2
from typer.testing import CliRunner

from services.common.server import running
from services.registry.config import RegistrySettings
from services.registry.keys import load_kek_file
from services.registry.server import create_app as create_registry
from tests.unit.gateway.gateway_fakes import TOKEN, Stack, gateway_stack
from tests.unit.registry.conftest import make_onnx, upload_requests


@pytest.fixture
async def stack(tmp_path) -> AsyncIterator[Stack]:
    async with gateway_stack(tmp_path) as started:
        yield started


@pytest.fixture
async def real_stack(tmp_path) -> AsyncIterator[Stack]:
    """The gateway in front of a real registry (its KEK at <home>/kek)."""
    settings = RegistrySettings(home=tmp_path / "registry", registry_addr="127.0.0.1:0", internal_token=TOKEN)
    async with running(await create_registry(settings)) as registry:
        async with gateway_stack(tmp_path / "gateway", registry_addr=f"127.0.0.1:{registry.port}") as started:
            yield started


async def download(stack: Stack, model: str, version: int) -> bytes:
    call = stack.registry_stub.DownloadVersion(
        registry_pb2.DownloadVersionRequest(model=model, version=version), metadata=stack.auth("developer")
    )
    return b"".join([message.chunk async for message in call])


async def rotation_events(stack: Stack, count: int) -> list[admin_pb2.AuditEvent]:
    events = await stack.admin.ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(method="RotateKek"), metadata=stack.auth("admin-of-admin")
    )
    assert len(events.audit_events) == count
    return list(reversed(events.audit_events))


async def test_a_rotation_rewraps_every_key_and_every_version_still_downloads(real_stack: Stack, tmp_path) -> None:
    stack = real_stack
    artifacts = [make_onnx(weight) for weight in (0.25, 0.5)]
    await stack.registry_stub.CreateModel(registry_pb2.CreateModelRequest(name="m"), metadata=stack.auth("developer"))
    for artifact in [*artifacts, artifacts[0]]:  # the third version shares the first one's blob
        await stack.registry_stub.UploadVersion(
            upload_requests("m", artifact, format=registry_pb2.ARTIFACT_FORMAT_ONNX), metadata=stack.auth("developer")
        )
    kek_file = tmp_path / "registry" / "kek"
    first = load_kek_file(kek_file).id

    rotated = await stack.admin.RotateKek(admin_pb2.RotateKekRequest(), metadata=stack.auth("admin-of-admin"))
    assert (rotated.rewrapped_keys, rotated.previous_kek_id) == (2, first)
    assert rotated.kek_id == load_kek_file(kek_file).id != first
    assert not kek_file.with_name("kek.next").exists()
    for version, artifact in zip((1, 2, 3), [*artifacts, artifacts[0]], strict=True):
        assert await download(stack, "m", version) == artifact

    again = await stack.admin.RotateKek(admin_pb2.RotateKekRequest(), metadata=stack.auth("admin-of-admin"))
    assert (again.rewrapped_keys, again.previous_kek_id) == (2, rotated.kek_id)
    (event, _) = await rotation_events(stack, 2)
    assert (event.tenant, event.resource, event.code) == ("admin", rotated.kek_id, "OK")
    assert stack.keys["admin-of-admin"].startswith(f"maas_{event.api_key_id}_")


async def test_only_a_platform_admin_may_rotate_and_refusals_are_audited(stack: Stack) -> None:
    for who in ("admin", "developer", "reader"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stack.admin.RotateKek(admin_pb2.RotateKekRequest(), metadata=stack.auth(who))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "platform admin key" in refused.value.details() or "admin role" in refused.value.details()
    assert stack.registry.kek_rotations == 0  # the registry never heard of them

    for _ in range(50):  # refusals before the handler are written in the background
        events = await stack.admin.ListAuditEvents(
            admin_pb2.ListAuditEventsRequest(method="RotateKek"), metadata=stack.auth("admin-of-admin")
        )
        if len(events.audit_events) == 3:
            break
        await asyncio.sleep(0.02)
    assert sorted((e.api_key_id, e.code) for e in events.audit_events) == sorted(
        (stack.key_ids[who], "PERMISSION_DENIED") for who in ("admin", "developer", "reader")
    )


async def test_the_registrys_own_rotate_kek_is_not_served_to_any_key(stack: Stack) -> None:
    rotate = stack.channel.unary_unary(
        "/maas.registry.v1.RegistryService/RotateKek",
        request_serializer=registry_pb2.RotateKekRequest.SerializeToString,
        response_deserializer=registry_pb2.RotateKekResponse.FromString,
    )
    for who in ("admin-of-admin", "admin", "developer"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await rotate(registry_pb2.RotateKekRequest(), metadata=stack.auth(who))
        # The proxy has no handler for it: gRPC itself answers that no such method is served.
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert stack.registry.kek_rotations == 0


async def test_the_cli_says_what_was_rotated_and_to_keep_the_previous_kek(stack: Stack) -> None:
    address = f"127.0.0.1:{stack.port}"
    runner = CliRunner()

    def cli(*args: str):  # type: ignore[no-untyped-def]
        return runner.invoke(
            app, ["admin", "rotate-kek", *args, "--api-key", stack.keys["admin-of-admin"], "--address", address]
        )

    shown = await asyncio.to_thread(cli)
    assert shown.exit_code == 0, shown.output
    assert "re-wrapped 7 data key(s)" in shown.output and "kek-1" in shown.output and "kek-0" in shown.output
    assert "keep the previous one" in shown.output
    as_json = await asyncio.to_thread(cli, "--json")
    assert json.loads(as_json.stdout) == {"rewrappedKeys": "7", "kekId": "kek-2", "previousKekId": "kek-1"}
    assert stack.registry.kek_rotations == 2
