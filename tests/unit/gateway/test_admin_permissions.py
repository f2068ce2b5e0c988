"""Who may call which AdminService method on which tenant, through the real gateway (interceptors
included): a platform admin (an admin key of the `admin` tenant) reaches every tenant, a tenant's
admin only its own, developers and readers what they could always do."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

import grpc
import pytest
from google.protobuf.message import Message
from maas.cli.admin import admin_app
from maas.gateway.v1 import admin_pb2
from maas.registry.v1 import registry_pb2
from typer.testing import CliRunner, Result

from tests.unit.gateway.gateway_fakes import Stack, gateway_stack

OK, DENIED, NOT_FOUND = "OK", "PERMISSION_DENIED", "NOT_FOUND"
# A cell whose call succeeded but whose answer names a tenant the caller may not see.
LEAK = "OK+LEAK"

CALLERS = {
    "platform": "admin-of-admin",
    "acme-admin": "admin",
    "acme-dev": "developer",
    "acme-reader": "reader",
}
# Column -> the tenant the request names; "-" names none (the method's default scope).
TARGETS = {"-": "", "own": "acme", "other": "other", "admin": "admin", "missing": "nobody"}
NOT_ASKED = "."

# Rows: caller; columns in TARGETS order. NOT_ASKED where a method has no such target.
_ = NOT_ASKED
EXPECTED: dict[str, dict[str, tuple[str, ...]]] = {
    "CreateTenant": {
        "platform": (OK, _, _, _, _),
        "acme-admin": (DENIED, _, _, _, _),
        "acme-dev": (DENIED, _, _, _, _),
        "acme-reader": (DENIED, _, _, _, _),
    },
    "GetTenant": {
        "platform": (_, OK, OK, OK, NOT_FOUND),
        "acme-admin": (_, OK, DENIED, DENIED, DENIED),
        "acme-dev": (_, DENIED, DENIED, DENIED, DENIED),
        "acme-reader": (_, DENIED, DENIED, DENIED, DENIED),
    },
    "ListTenants": {
        "platform": (OK, _, _, _, _),
        "acme-admin": (OK, _, _, _, _),
        "acme-dev": (DENIED, _, _, _, _),
        "acme-reader": (DENIED, _, _, _, _),
    },
    "CreateApiKey": {  # an admin key: the most a caller could mint
        "platform": (_, OK, OK, OK, NOT_FOUND),
        "acme-admin": (_, OK, DENIED, DENIED, DENIED),
        "acme-dev": (_, DENIED, DENIED, DENIED, DENIED),
        "acme-reader": (_, DENIED, DENIED, DENIED, DENIED),
    },
    "ListApiKeys": {
        "platform": (OK, OK, OK, OK, NOT_FOUND),
        "acme-admin": (OK, OK, DENIED, DENIED, DENIED),
        "acme-dev": (DENIED, DENIED, DENIED, DENIED, DENIED),
        "acme-reader": (DENIED, DENIED, DENIED, DENIED, DENIED),
    },
    "RevokeApiKey": {  # another tenant's key is as unknown as a missing one
        "platform": (_, OK, OK, OK, NOT_FOUND),
        "acme-admin": (_, OK, NOT_FOUND, NOT_FOUND, NOT_FOUND),
        "acme-dev": (_, DENIED, DENIED, DENIED, DENIED),
        "acme-reader": (_, DENIED, DENIED, DENIED, DENIED),
    },
    "WhoAmI": {
        "platform": (OK, _, _, _, _),
        "acme-admin": (OK, _, _, _, _),
        "acme-dev": (OK, _, _, _, _),
        "acme-reader": (OK, _, _, _, _),
    },
    "SetApiKeyRateLimit": {
        "platform": (_, OK, OK, OK, NOT_FOUND),
        "acme-admin": (_, OK, NOT_FOUND, NOT_FOUND, NOT_FOUND),
        "acme-dev": (_, DENIED, DENIED, DENIED, DENIED),
        "acme-reader": (_, DENIED, DENIED, DENIED, DENIED),
    },
    "SetQuota": {  # a tenant must not lift its own quota
        "platform": (_, OK, OK, OK, NOT_FOUND),
        "acme-admin": (_, DENIED, DENIED, DENIED, DENIED),
        "acme-dev": (_, DENIED, DENIED, DENIED, DENIED),
        "acme-reader": (_, DENIED, DENIED, DENIED, DENIED),
    },
    "GetQuota": {
        "platform": (_, OK, OK, OK, NOT_FOUND),
        "acme-admin": (_, OK, DENIED, DENIED, DENIED),
        "acme-dev": (_, DENIED, DENIED, DENIED, DENIED),
        "acme-reader": (_, DENIED, DENIED, DENIED, DENIED),
    },
    "GetUsage": {  # any role reads its own tenant's usage, as before
        "platform": (OK, OK, OK, OK, OK),
        "acme-admin": (OK, OK, DENIED, DENIED, DENIED),
        "acme-dev": (OK, OK, DENIED, DENIED, DENIED),
        "acme-reader": (OK, OK, DENIED, DENIED, DENIED),
    },
    "ListAuditEvents": {
        "platform": (OK, OK, OK, OK, OK),
        "acme-admin": (OK, OK, DENIED, DENIED, DENIED),
        "acme-dev": (DENIED, DENIED, DENIED, DENIED, DENIED),
        "acme-reader": (DENIED, DENIED, DENIED, DENIED, DENIED),
    },
    # The serving fleet and the registry's key-encryption key are shared by every tenant:
    # platform admins only.
    **{
        method: {
            "platform": (OK, _, _, _, _),
            "acme-admin": (DENIED, _, _, _, _),
            "acme-dev": (DENIED, _, _, _, _),
            "acme-reader": (DENIED, _, _, _, _),
        }
        for method in ("ListNodes", "DrainNode", "ResumeNode", "RotateKek")
    },
}
del _


@pytest.fixture
async def stack(tmp_path):
    async with gateway_stack(tmp_path) as started:
        # Something of every tenant to leak: an audit event and usage of "other" and of "acme".
        for who in ("other", "developer"):
            await started.registry_stub.CreateModel(
                registry_pb2.CreateModelRequest(name="m"), metadata=started.auth(who)
            )
        yield started


Build = Callable[[Stack, str], Awaitable[Message]]
_new_tenants = itertools.count()


async def _victim_key(stack: Stack, tenant: str) -> str:
    """A fresh reader key of `tenant` to revoke or limit, so no cell changes another's keys."""
    if tenant == TARGETS["missing"]:
        return "nosuchkey234"
    created = await stack.admin.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant=tenant, role=admin_pb2.ROLE_READER, description="victim"),
        metadata=stack.auth("admin-of-admin"),
    )
    return created.api_key.id


async def _create_tenant(stack: Stack, tenant: str) -> Message:
    return admin_pb2.CreateTenantRequest(name=f"new{next(_new_tenants)}")


async def _revoke(stack: Stack, tenant: str) -> Message:
    return admin_pb2.RevokeApiKeyRequest(id=await _victim_key(stack, tenant))


async def _set_rate_limit(stack: Stack, tenant: str) -> Message:
    return admin_pb2.SetApiKeyRateLimitRequest(
        id=await _victim_key(stack, tenant), rate_limit=admin_pb2.RateLimit(requests_per_second=1e6)
    )


def _plain(make: Callable[[str], Message]) -> Build:
    async def build(stack: Stack, tenant: str) -> Message:
        return make(tenant)

    return build


REQUESTS: dict[str, Build] = {
    "CreateTenant": _create_tenant,
    "GetTenant": _plain(lambda tenant: admin_pb2.GetTenantRequest(name=tenant)),
    "ListTenants": _plain(lambda tenant: admin_pb2.ListTenantsRequest()),
    "CreateApiKey": _plain(
        lambda tenant: admin_pb2.CreateApiKeyRequest(tenant=tenant, role=admin_pb2.ROLE_ADMIN)
    ),
    "ListApiKeys": _plain(lambda tenant: admin_pb2.ListApiKeysRequest(tenant=tenant)),
    "RevokeApiKey": _revoke,
    "WhoAmI": _plain(lambda tenant: admin_pb2.WhoAmIRequest()),
    "SetApiKeyRateLimit": _set_rate_limit,
    "SetQuota": _plain(
        lambda tenant: admin_pb2.SetQuotaRequest(quota=admin_pb2.Quota(tenant=tenant, requests_per_day=10**9))
    ),
    "GetQuota": _plain(lambda tenant: admin_pb2.GetQuotaRequest(tenant=tenant)),
    "GetUsage": _plain(lambda tenant: admin_pb2.GetUsageRequest(tenant=tenant)),
    "ListAuditEvents": _plain(lambda tenant: admin_pb2.ListAuditEventsRequest(tenant=tenant)),
    "ListNodes": _plain(lambda tenant: admin_pb2.ListNodesRequest()),
    "DrainNode": _plain(lambda tenant: admin_pb2.DrainNodeRequest(name="triton-0")),
    "ResumeNode": _plain(lambda tenant: admin_pb2.ResumeNodeRequest(name="triton-0")),
    "RotateKek": _plain(lambda tenant: admin_pb2.RotateKekRequest()),
}


def _tenants_named(message: Message) -> set[str]:
    """Every tenant an answer names: `tenant` fields, and the names of Tenant messages."""
    named: set[str] = set()
    for field, value in message.ListFields():
        if field.name == "tenant" and isinstance(value, str):
            named.add(value)
        elif field.name == "name" and isinstance(message, admin_pb2.Tenant):
            named.add(value)
        elif field.message_type is not None:
            values = value if field.is_repeated else [value]
            for item in values:
                named |= _tenants_named(item)
    return named


async def _outcome(stack: Stack, method: str, caller: str, tenant: str) -> str:
    request = await REQUESTS[method](stack, tenant)
    who = CALLERS[caller]
    try:
        response = await getattr(stack.admin, method)(request, metadata=stack.auth(who))
    except grpc.aio.AioRpcError as error:
        return error.code().name
    if caller != "platform" and _tenants_named(response) - {"acme"}:
        return LEAK
    return OK


def _table(cells: dict[tuple[str, str, str], str]) -> str:
    width = max(len(value) for value in cells.values()) + 2
    lines = [f"{'method':<20}{'caller':<13}" + "".join(f"{column:<{width}}" for column in TARGETS)]
    for method, caller in itertools.product(EXPECTED, CALLERS):
        row = "".join(f"{cells[method, caller, column]:<{width}}" for column in TARGETS)
        lines.append(f"{method:<20}{caller:<13}{row}")
    return "\n".join(lines)


def test_every_admin_method_has_a_row_for_every_caller():
    """A new AdminService method must say here who may call it."""
    methods = [m.name for m in admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods]
    assert sorted(EXPECTED) == sorted(methods) == sorted(REQUESTS)
    for method, rows in EXPECTED.items():
        assert sorted(rows) == sorted(CALLERS), method
        assert all(len(cells) == len(TARGETS) for cells in rows.values()), method


async def test_permission_matrix(stack):
    expected, actual = {}, {}
    for method, caller in itertools.product(EXPECTED, CALLERS):
        for column, cell in zip(TARGETS, EXPECTED[method][caller], strict=True):
            expected[method, caller, column] = cell
            actual[method, caller, column] = (
                NOT_ASKED if cell == NOT_ASKED else await _outcome(stack, method, caller, TARGETS[column])
            )
    wrong = sorted(cell for cell in expected if expected[cell] != actual[cell])
    assert not wrong, (
        f"{len(wrong)} cells out of place: {wrong}\nexpected:\n{_table(expected)}\nactual:\n{_table(actual)}"
    )


async def test_tenant_admin_sees_and_manages_only_its_own_tenant(stack):
    admin, acme = stack.admin, stack.auth("admin")
    tenants = await admin.ListTenants(admin_pb2.ListTenantsRequest(), metadata=acme)
    assert [t.name for t in tenants.tenants] == ["acme"] and not tenants.next_page_token

    keys = await admin.ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=acme)
    assert {k.tenant for k in keys.api_keys} == {"acme"}
    assert {k.id for k in keys.api_keys} >= {stack.key_ids[who] for who in ("reader", "developer", "admin")}

    # A second admin of its own tenant, which is no more than a tenant admin either.
    minted = await admin.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant="acme", role=admin_pb2.ROLE_ADMIN), metadata=acme
    )
    second = (("authorization", f"Bearer {minted.plaintext}"),)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await admin.ListApiKeys(admin_pb2.ListApiKeysRequest(tenant="other"), metadata=second)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    revoked = await admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(id=minted.api_key.id), metadata=acme)
    assert revoked.api_key.revoked

    events = await admin.ListAuditEvents(admin_pb2.ListAuditEventsRequest(), metadata=acme)
    assert events.audit_events and {e.tenant for e in events.audit_events} == {"acme"}
    # A key filter naming another tenant's key finds nothing rather than that tenant's events.
    foreign = await admin.ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(api_key_id=stack.key_ids["other"]), metadata=acme
    )
    assert list(foreign.audit_events) == []


async def test_denials_say_what_key_is_needed(stack):
    acme = stack.auth("admin")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.admin.SetQuota(
            admin_pb2.SetQuotaRequest(quota=admin_pb2.Quota(tenant="acme", requests_per_day=0)), metadata=acme
        )
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "platform admin key" in error.value.details() and "'admin'" in error.value.details()
    assert stack.key_ids["admin"] in error.value.details()

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.admin.GetUsage(admin_pb2.GetUsageRequest(tenant="other"), metadata=acme)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "platform admin key" in error.value.details() and "'other'" in error.value.details()

    # Another tenant's key reads as missing: its existence is not given away.
    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await stack.admin.RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(id=stack.key_ids["other"]), metadata=acme
        )
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stack.admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(id="nosuchkey234"), metadata=acme)
    assert foreign.value.code() == missing.value.code() == grpc.StatusCode.NOT_FOUND
    who = await stack.admin.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=stack.auth("other"))
    assert not who.api_key.revoked


async def test_cli_with_a_tenant_admin_key(stack):
    env = {
        "MAAS_API_KEY": stack.keys["admin"],
        "MAAS_GATEWAY_ADDR": f"127.0.0.1:{stack.port}",
        "COLUMNS": "200",
    }
    runner = CliRunner()

    def cli(*args: str) -> Result:
        return runner.invoke(admin_app, list(args), env=env)

    listed, lifted = await asyncio.to_thread(
        lambda: (cli("key", "list"), cli("quota", "set", "acme", "--requests-per-day", "0"))
    )
    assert listed.exit_code == 0, listed.output
    assert stack.key_ids["reader"] in listed.output and stack.key_ids["other"] not in listed.output
    assert lifted.exit_code == 1 and "PERMISSION_DENIED" in lifted.output
    assert "platform admin key" in lifted.output
