"""Downloads through the real gateway: readers are refused, the caller's role reaches the registry
as the gateway asserts it (a client cannot forge it), a no-download model goes to admins only
(against the real registry), and every download is in the audit log with the bytes it sent,
a refused, failed or abandoned one too. `maas models` and `maas admin audit` show both."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from maas.cli import _shared, app
from maas.gateway.v1 import admin_pb2
from maas.registry.v1 import registry_pb2
from typer.testing import CliRunner

from services.common.channels import CALLER_ROLE_KEY
from services.common.interceptors import INTERNAL_TOKEN_KEY
from services.common.server import running
from services.registry.config import RegistrySettings
from services.registry.server import create_app as create_registry
from tests.unit.gateway.gateway_fakes import TOKEN, Stack, gateway_stack
from tests.unit.registry.conftest import make_onnx, upload_requests

DOWNLOAD = "DownloadVersion"
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture
async def stack(tmp_path) -> AsyncIterator[Stack]:
    async with gateway_stack(tmp_path) as started:
        yield started


@pytest.fixture
async def real_stack(tmp_path) -> AsyncIterator[Stack]:
    """The gateway in front of a real registry."""
    settings = RegistrySettings(home=tmp_path / "registry", registry_addr="127.0.0.1:0", internal_token=TOKEN)
    async with running(await create_registry(settings)) as registry:
        async with gateway_stack(tmp_path / "gateway", registry_addr=f"127.0.0.1:{registry.port}") as started:
            yield started


async def download(stack: Stack, who: str, model: str, version: int = 1, extra=()) -> bytes:
    call = stack.registry_stub.DownloadVersion(
        registry_pb2.DownloadVersionRequest(model=model, version=version),
        metadata=(*stack.auth(who), *extra),
        timeout=10,
    )
    return b"".join([message.chunk async for message in call])


async def refused(call, match: str = "") -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == DENIED, caught.value.details()
    assert match in caught.value.details(), caught.value.details()
    return caught.value.details()


async def audit_events(stack: Stack, method: str, count: int) -> list[admin_pb2.AuditEvent]:
    """The method's newest audit events, oldest first, once `count` are there: downloads are
    written in the background, just after the call ends."""
    for _ in range(300):
        events = await stack.admin.ListAuditEvents(
            admin_pb2.ListAuditEventsRequest(method=method), metadata=stack.auth("admin-of-admin")
        )
        if len(events.audit_events) >= count:
            return list(reversed(events.audit_events))
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(events.audit_events)} {method} events, expected {count}")


async def test_the_gateway_asserts_the_callers_role_and_drops_a_forged_one(stack: Stack) -> None:
    forged = ((CALLER_ROLE_KEY, "admin"), (INTERNAL_TOKEN_KEY, "forged"))
    for who, role in (("reader", "reader"), ("developer", "developer"), ("admin", "admin")):
        await stack.registry_stub.GetModel(
            registry_pb2.GetModelRequest(name="m"), metadata=(*stack.auth(who), *forged)
        )
        seen = stack.registry.metadata[-1]
        assert seen[CALLER_ROLE_KEY] == role and seen[INTERNAL_TOKEN_KEY] == TOKEN
    assert await download(stack, "developer", "m", extra=forged) == b"abcdef"
    assert stack.registry.metadata[-1][CALLER_ROLE_KEY] == "developer"


async def test_readers_are_refused_at_the_gateway_and_the_refusal_is_audited(stack: Stack) -> None:
    calls = len(stack.registry.metadata)
    await refused(download(stack, "reader", "m"), "needs the developer role")
    dataset = stack.registry_stub.DownloadDatasetVersion(
        registry_pb2.DownloadDatasetVersionRequest(dataset="rows", version=1), metadata=stack.auth("reader")
    )
    await refused(dataset.read(), "needs the developer role")
    assert len(stack.registry.metadata) == calls  # never forwarded

    (event,) = await audit_events(stack, DOWNLOAD, 1)
    assert (event.tenant, event.api_key_id, event.code) == ("acme", stack.key_ids["reader"], "PERMISSION_DENIED")
    assert event.HasField("bytes") and event.bytes == 0
    (event,) = await audit_events(stack, "DownloadDatasetVersion", 1)
    assert event.code == "PERMISSION_DENIED" and event.bytes == 0


async def test_every_download_is_audited_with_the_bytes_it_sent(stack: Stack) -> None:
    assert await download(stack, "developer", "m", 2) == b"abcdef"
    # A download that ran to its end is in SQL before its status reached the caller.
    listed = await stack.admin.ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(method=DOWNLOAD), metadata=stack.auth("admin")
    )
    assert [(e.resource, e.bytes) for e in listed.audit_events] == [("m/2", 6)]
    with pytest.raises(grpc.aio.AioRpcError):
        await download(stack, "developer", "missing")
    # Abandoned half-way: the endless download sends 1 KiB chunks until the caller goes away.
    call = stack.registry_stub.DownloadVersion(
        registry_pb2.DownloadVersionRequest(model="endless", version=3), metadata=stack.auth("admin")
    )
    for _ in range(4):  # the version, then three chunks
        await call.read()
    call.cancel()
    await asyncio.wait_for(stack.registry.download_cancelled.wait(), timeout=2)

    whole, failed, cancelled = await audit_events(stack, DOWNLOAD, 3)
    assert (whole.resource, whole.code, whole.bytes) == ("m/2", "OK", 6)
    assert whole.api_key_id == stack.key_ids["developer"]
    assert (failed.code, failed.bytes) == ("NOT_FOUND", 0)
    assert (cancelled.resource, cancelled.code) == ("endless/3", "CANCELLED")
    assert cancelled.api_key_id == stack.key_ids["admin"]
    # What was handed on before the caller left: whole chunks, at least the three it read.
    assert cancelled.bytes >= 3 * 1024 and cancelled.bytes % 1024 == 0
    # Other calls carry no byte count.
    await stack.registry_stub.CreateModel(registry_pb2.CreateModelRequest(name="n"), metadata=stack.auth("developer"))
    (created,) = await audit_events(stack, "CreateModel", 1)
    assert not created.HasField("bytes")


async def test_a_no_download_model_through_the_gateway_and_the_real_registry(real_stack: Stack) -> None:
    stack, weights = real_stack, make_onnx(0.75)
    registry = stack.registry_stub
    developer, admin = stack.auth("developer"), stack.auth("admin")
    await registry.CreateModel(registry_pb2.CreateModelRequest(name="open"), metadata=developer)
    await registry.CreateModel(registry_pb2.CreateModelRequest(name="secret", no_download=True), metadata=developer)
    for model in ("open", "secret"):
        await registry.UploadVersion(
            upload_requests(model, weights, format=registry_pb2.ARTIFACT_FORMAT_ONNX), metadata=developer
        )

    await refused(download(stack, "reader", "open"), "needs the developer role")
    assert await download(stack, "developer", "open") == weights
    details = await refused(download(stack, "developer", "secret"), "model 'secret' is marked no-download")
    assert "only an admin key" in details
    # The role and the token a client sends itself are dropped: the registry hears "developer".
    forged = ((CALLER_ROLE_KEY, "admin"), (INTERNAL_TOKEN_KEY, TOKEN), ("x-maas-tenant", "acme"))
    await refused(download(stack, "developer", "secret", extra=forged), "marked no-download")
    assert await download(stack, "admin", "secret") == weights
    # Another tenant's admin has no such model.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await download(stack, "other", "secret")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    # A developer marks a model, but only an admin lifts the mark.
    lift = registry_pb2.UpdateModelRequest(
        model=registry_pb2.Model(name="secret", no_download=False), update_mask=FieldMask(paths=["no_download"])
    )
    await refused(registry.UpdateModel(lift, metadata=developer), "only an admin key")
    await refused(registry.UpdateModel(lift, metadata=stack.auth("reader")), "needs the developer role")
    assert not (await registry.UpdateModel(lift, metadata=admin)).model.no_download
    assert await download(stack, "developer", "secret") == weights

    events = await audit_events(stack, DOWNLOAD, 7)
    assert [(e.api_key_id, e.code, e.bytes) for e in events] == [
        (stack.key_ids["reader"], "PERMISSION_DENIED", 0),
        (stack.key_ids["developer"], "OK", len(weights)),
        (stack.key_ids["developer"], "PERMISSION_DENIED", 0),
        (stack.key_ids["developer"], "PERMISSION_DENIED", 0),
        (stack.key_ids["admin"], "OK", len(weights)),
        (stack.key_ids["other"], "NOT_FOUND", 0),
        (stack.key_ids["developer"], "OK", len(weights)),
    ]
    assert {e.resource for e in events} >= {"open/1", "secret/1"}
    updates = await audit_events(stack, "UpdateModel", 3)
    assert [e.code for e in updates] == ["PERMISSION_DENIED", "PERMISSION_DENIED", "OK"]


async def test_the_cli_marks_lists_refuses_and_audits(real_stack: Stack, tmp_path, monkeypatch) -> None:
    stack, runner = real_stack, CliRunner()
    address = f"127.0.0.1:{stack.port}"

    async def maas(who: str, *args: str):
        return await asyncio.to_thread(
            runner.invoke, app, [*args, "--api-key", stack.keys[who], "--address", address]
        )

    created = await maas("developer", "models", "create", "secret", "--no-download")
    assert created.exit_code == 0 and "(no-download)" in created.output
    await stack.registry_stub.UploadVersion(
        upload_requests("secret", make_onnx(), format=registry_pb2.ARTIFACT_FORMAT_ONNX), metadata=stack.auth("admin")
    )
    listed = await maas("reader", "models", "list")
    assert listed.exit_code == 0 and "download" in listed.output and "admins" in listed.output

    target = tmp_path / "secret.onnx"
    refused_download = await maas("developer", "models", "download", "secret", "1", "-o", str(target))
    assert refused_download.exit_code != 0 and "marked no-download" in refused_download.output
    assert not target.exists() and not list(tmp_path.glob("secret.onnx*"))
    lifted = await maas("developer", "models", "update", "secret", "--allow-download")
    assert lifted.exit_code != 0 and "only an admin key" in lifted.output
    lifted = await maas("admin", "models", "update", "secret", "--allow-download")
    assert lifted.exit_code == 0 and "downloads by developer and admin keys" in lifted.output
    downloaded = await maas("developer", "models", "download", "secret", "1", "-o", str(target))
    assert downloaded.exit_code == 0 and target.read_bytes() == make_onnx()
    nothing = await maas("developer", "models", "update", "secret")
    assert nothing.exit_code != 0 and "--no-download" in nothing.output

    await audit_events(stack, DOWNLOAD, 2)
    monkeypatch.setattr(_shared.console, "_width", 80)
    audit = await maas("admin", "admin", "audit", "--method", DOWNLOAD)
    assert audit.exit_code == 0, audit.output
    header, _, whole_row, refused_row = audit.output.splitlines()[:4]  # newest first
    assert header.endswith("bytes") and refused_row.endswith(" 0")
    assert whole_row.endswith(f" {len(make_onnx())}")  # a count is never cut
    as_json = await maas("admin", "admin", "audit", "--method", DOWNLOAD, "--json")
    assert [(e["code"], e.get("bytes")) for e in json.loads(as_json.output)] == [
        ("OK", str(len(make_onnx()))),  # int64 in the proto3 JSON mapping: a string
        ("PERMISSION_DENIED", "0"),
    ]
