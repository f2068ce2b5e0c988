"""AdminService through the real gateway: tenants, keys, roles, revocation, bootstrap."""

from __future__ import annotations

import asyncio
import logging
import stat
import time

import grpc
import pytest
from maas.gateway.v1 import admin_pb2
from maas.registry.v1 import registry_pb2

from services.common.logs import JsonFormatter
from services.gateway.__main__ import main
from services.gateway.config import GatewaySettings
from services.gateway.keys import Role
from services.gateway.server import bootstrap_admin, open_store
from services.gateway.service import Admin
from services.gateway.store import KeyRecord, utc_now
from tests.unit.gateway.gateway_fakes import gateway_stack


@pytest.fixture
async def stack(tmp_path):
    async with gateway_stack(tmp_path) as started:
        yield started


async def test_admin_creates_tenant_and_key_shown_once(stack):
    admin, root = stack.admin, stack.auth("admin-of-admin")
    created = await admin.CreateTenant(
        admin_pb2.CreateTenantRequest(name="globex", display_name="Globex Corp"), metadata=root
    )
    assert created.tenant.name == "globex" and created.tenant.create_time.seconds > 0
    got = await admin.GetTenant(admin_pb2.GetTenantRequest(name="globex"), metadata=root)
    assert got.tenant.display_name == "Globex Corp"

    key = await admin.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant="globex", role=admin_pb2.ROLE_DEVELOPER, description="ci"),
        metadata=root,
    )
    assert key.plaintext.startswith(f"maas_{key.api_key.id}_")
    listed = await admin.ListApiKeys(admin_pb2.ListApiKeysRequest(tenant="globex"), metadata=root)
    assert [k.id for k in listed.api_keys] == [key.api_key.id]
    # The listing never carries the secret.
    assert key.plaintext.split("_")[-1] not in str(listed)
    assert listed.api_keys[0].role == admin_pb2.ROLE_DEVELOPER and not listed.api_keys[0].revoked

    own_key = (("authorization", f"Bearer {key.plaintext}"),)
    who = await admin.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=own_key)
    assert who.api_key.id == key.api_key.id and who.api_key.tenant == "globex"


async def test_tenant_validation_and_duplicates(stack):
    admin, root = stack.admin, stack.auth("admin-of-admin")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await admin.CreateTenant(admin_pb2.CreateTenantRequest(name="acme"), metadata=root)
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await admin.CreateTenant(admin_pb2.CreateTenantRequest(name="Bad Name"), metadata=root)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await admin.GetTenant(admin_pb2.GetTenantRequest(name="nobody"), metadata=root)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_create_key_needs_existing_tenant_and_role(stack):
    admin, root = stack.admin, stack.auth("admin-of-admin")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant="nobody", role=admin_pb2.ROLE_READER), metadata=root
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(tenant="acme"), metadata=root)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "role is required" in error.value.details()


async def test_list_tenants_pages(stack):
    admin, root = stack.admin, stack.auth("admin-of-admin")
    first = await admin.ListTenants(admin_pb2.ListTenantsRequest(page_size=2), metadata=root)
    assert [t.name for t in first.tenants] == ["acme", "admin"] and first.next_page_token
    second = await admin.ListTenants(
        admin_pb2.ListTenantsRequest(page_size=2, page_token=first.next_page_token), metadata=root
    )
    assert [t.name for t in second.tenants] == ["other"] and not second.next_page_token


async def test_revoke_is_immediate_on_this_gateway_and_idempotent(stack):
    admin, root = stack.admin, stack.auth("admin-of-admin")
    who = await admin.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=stack.auth("reader"))  # now cached
    assert who.api_key.role == admin_pb2.ROLE_READER

    revoke = admin_pb2.RevokeApiKeyRequest(id=stack.key_ids["reader"])
    revoked = await admin.RevokeApiKey(revoke, metadata=root)
    assert revoked.api_key.revoked and revoked.api_key.revoke_time.seconds > 0
    again = await admin.RevokeApiKey(revoke, metadata=root)
    assert again.api_key.revoke_time == revoked.api_key.revoke_time

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await admin.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=stack.auth("reader"))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in error.value.details()

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(id="nosuchkey234"), metadata=root)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_revocation_elsewhere_takes_effect_within_a_second(stack):
    """Another gateway replica revokes the key: this one's cache must let go within 1 s."""
    whoami = admin_pb2.WhoAmIRequest()
    await stack.admin.WhoAmI(whoami, metadata=stack.auth("developer"))  # cached as valid
    store = await open_store(stack.settings)
    await Admin(store).revoke_key(stack.key_ids["developer"])
    revoked_at = time.monotonic()
    while True:
        try:
            await stack.admin.WhoAmI(whoami, metadata=stack.auth("developer"))
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            break
        assert time.monotonic() - revoked_at < 1.2, "revocation took longer than the 1 s cache"
        await asyncio.sleep(0.05)
    store.engine.dispose()


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "missing API key"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "malformed authorization"),
        ((("authorization", "Bearer not-a-key"),), "malformed API key"),
        ((("authorization", "Bearer maas_aaaaaaaaaaaa_" + "A" * 43),), "not recognised"),
    ],
)
async def test_bad_credentials_are_unauthenticated(stack, metadata, message):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.admin.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=metadata)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert message in error.value.details()


async def test_wrong_secret_for_a_real_key_id_is_unknown(stack):
    real = stack.keys["reader"]
    forged = real[: -len("A" * 43)] + "A" * 43
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.admin.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=(("authorization", f"Bearer {forged}"),))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not recognised" in error.value.details()


async def test_roles_are_enforced(stack):
    for who in ("developer", "reader"):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stack.admin.ListTenants(admin_pb2.ListTenantsRequest(), metadata=stack.auth(who))
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.registry_stub.CreateModel(
            registry_pb2.CreateModelRequest(name="m"), metadata=stack.auth("reader")
        )
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "developer role" in error.value.details()

    async def header_only():
        yield registry_pb2.UploadVersionRequest(header=registry_pb2.VersionHeader(model="m"))

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.registry_stub.UploadVersion(header_only(), metadata=stack.auth("reader"))
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stack.registry.metadata == []  # nothing reached the backend


async def test_keys_never_reach_the_log(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    async with gateway_stack(tmp_path) as stack:
        await stack.admin.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=stack.auth("reader"))
        await stack.admin.RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(id=stack.key_ids["reader"]), metadata=stack.auth("admin-of-admin")
        )
        secrets = [key.split("_", 2)[2] for key in stack.keys.values()]
    # What the service really writes: every record as JSON, extra fields included.
    formatter = JsonFormatter("gateway")
    written = "\n".join(formatter.format(record) for record in caplog.records)
    assert stack.key_ids["reader"] in written  # the public id is logged...
    assert not any(secret in written for secret in secrets)  # ...the secret never


def test_bootstrap_admin_is_idempotent_and_private(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MAAS_HOME", str(tmp_path))
    # main() would install the JSON log handler on the root logger and outlive this test.
    monkeypatch.setattr("services.gateway.__main__.configure_logging", lambda *args: None)
    key_file = tmp_path / "secrets" / "admin.key"
    main(["bootstrap-admin", "--key-file", str(key_file)])
    first = key_file.read_text()
    assert first.startswith("maas_")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    main(["bootstrap-admin", "--key-file", str(key_file)])
    assert key_file.read_text() == first
    assert [p.name for p in key_file.parent.iterdir()] == ["admin.key"]  # no stray temp files

    key_file.unlink()
    caplog.set_level(logging.WARNING)
    main(["bootstrap-admin", "--key-file", str(key_file)])
    assert not key_file.exists()
    assert "--force" in caplog.text


async def test_bootstrap_force_issues_a_new_key(tmp_path):
    settings = GatewaySettings(home=tmp_path)
    first = await bootstrap_admin(settings, tmp_path / "a.key")
    assert first is not None and first.tenant == "admin"
    assert await bootstrap_admin(settings, tmp_path / "b.key") is None
    second = await bootstrap_admin(settings, tmp_path / "b.key", force=True)
    assert second is not None and second.id != first.id
    assert stat.S_IMODE((tmp_path / "b.key").stat().st_mode) == 0o600


async def _add_keys(stack, tenant: str, *key_ids: str) -> None:
    """Keys with chosen ids, straight into the store: prefixes that collide on purpose."""
    store = await open_store(stack.settings)
    for key_id in key_ids:
        record = KeyRecord(key_id, tenant, Role.DEVELOPER, "0" * 64, "", False, utc_now(), None)
        await asyncio.to_thread(store.create_key, record)


async def _fails(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() == code, error.value.details()
    return error.value.details()


async def test_a_unique_prefix_names_a_key_within_the_callers_reach(stack):
    admin, acme, root = stack.admin, stack.auth("admin"), stack.auth("admin-of-admin")
    await _add_keys(stack, "acme", "pfx%aaaaaaaa", "pfx_aaaaaaaa", "pfxaaaaaaaab", "pfxaaaaaaaac")
    await _add_keys(stack, "acme", *(f"many{n}aaaaaaa" for n in range(7)))
    await _add_keys(stack, "other", "pfxbbbbbbbbb", "qrstbbbbbbbb")

    def revoke(key_id: str):
        return admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(id=key_id), metadata=acme)

    # `%` and `_` are no wildcards: each names the one key that holds it.
    assert (await revoke("pfx%")).api_key.id == "pfx%aaaaaaaa"
    limited = await admin.SetApiKeyRateLimit(
        admin_pb2.SetApiKeyRateLimitRequest(id="pfx_", rate_limit=admin_pb2.RateLimit(requests_per_second=2)),
        metadata=acme,
    )
    assert limited.api_key.id == "pfx_aaaaaaaa"
    assert (await revoke(stack.key_ids["reader"][:6])).api_key.id == stack.key_ids["reader"]
    # The audit log names the key revoked, not the prefix typed.
    events = await admin.ListAuditEvents(admin_pb2.ListAuditEventsRequest(method="RevokeApiKey"), metadata=acme)
    assert {e.resource for e in events.audit_events} == {"pfx%aaaaaaaa", stack.key_ids["reader"]}

    # Several matches are refused, naming them (five at most); the other tenant's never counts.
    details = await _fails(revoke("pfxa"), grpc.StatusCode.INVALID_ARGUMENT)
    assert "pfxaaaaaaaab, pfxaaaaaaaac" in details and "give more characters" in details
    details = await _fails(revoke("many"), grpc.StatusCode.INVALID_ARGUMENT)
    assert details.count("many") == 6 and "many4aaaaaaa, ..." in details
    # Another tenant's key is as unknown as a missing one; a platform admin reaches it.
    assert await _fails(revoke("pfxb"), grpc.StatusCode.NOT_FOUND) == "API key 'pfxb' not found in tenant 'acme'"
    assert await _fails(revoke("zzzz"), grpc.StatusCode.NOT_FOUND) == "API key 'zzzz' not found in tenant 'acme'"
    as_root = await admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(id="qrst"), metadata=root)
    assert as_root.api_key.id == "qrstbbbbbbbb"
    assert "at least 4 characters" in await _fails(revoke("pfx"), grpc.StatusCode.INVALID_ARGUMENT)
