"""The authenticator on its own: key parsing, the lookup cache, roles, and garbage input."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.database import make_engine, upgrade
from services.common.errors import PermissionDenied, Unauthenticated
from services.gateway import auth
from services.gateway.auth import INTERNAL_METHODS, REQUIRED_ROLE, ApiKeyAuthenticator, caller_var
from services.gateway.keys import Role, generate_key, parse_key
from services.gateway.keys import secret_matches as matches
from services.gateway.server import MIGRATIONS
from services.gateway.service import Admin
from services.gateway.store import GatewayStore

WHOAMI = "/maas.gateway.v1.AdminService/WhoAmI"
CREATE_TENANT = "/maas.gateway.v1.AdminService/CreateTenant"
UPLOAD = "/maas.registry.v1.RegistryService/UploadVersion"
DOWNLOAD = "/maas.registry.v1.RegistryService/DownloadVersion"


class CountingStore(GatewayStore):
    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.lookups = 0

    def get_key(self, key_id):
        self.lookups += 1
        return super().get_key(key_id)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('auth')}/gateway.db")
    upgrade(engine, MIGRATIONS)
    yield CountingStore(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def keys(store):
    """Plaintext keys by role name, in tenant "acme"."""

    async def create() -> dict[str, str]:
        admin = Admin(store)
        await admin.create_tenant("acme", "")
        return {role.name: (await admin.create_key("acme", role, "")).plaintext for role in Role}

    return asyncio.run(create())


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_generated_keys_parse_and_stay_distinct():
    made = {generate_key().plaintext for _ in range(100)}
    assert len(made) == 100
    for plaintext in made:
        key_id, secret = parse_key(plaintext)
        assert plaintext == f"maas_{key_id}_{secret}" and len(key_id) == 12


async def test_roles_are_ordered_per_method(store, keys):
    authenticate = ApiKeyAuthenticator(store, 1.0)
    await authenticate(WHOAMI, bearer(keys["READER"]))
    assert caller_var.get().tenant == "acme" and caller_var.get().role is Role.READER
    with pytest.raises(PermissionDenied, match="needs the developer role"):
        await authenticate(DOWNLOAD, bearer(keys["READER"]))
    await authenticate(DOWNLOAD, bearer(keys["DEVELOPER"]))
    with pytest.raises(PermissionDenied):
        await authenticate(UPLOAD, bearer(keys["READER"]))
    await authenticate(UPLOAD, bearer(keys["DEVELOPER"]))
    with pytest.raises(PermissionDenied):
        await authenticate(CREATE_TENANT, bearer(keys["DEVELOPER"]))
    await authenticate(CREATE_TENANT, bearer(keys["ADMIN"]))
    await authenticate(UPLOAD, bearer(keys["ADMIN"]))
    with pytest.raises(PermissionDenied, match="not available through the gateway"):
        await authenticate("/maas.inference.v1.RoutingService/WatchRoutes", bearer(keys["ADMIN"]))


async def test_billings_usage_calls_need_a_role_no_key_has(store, keys):
    authenticate = ApiKeyAuthenticator(store, 1.0)
    assert INTERNAL_METHODS and not INTERNAL_METHODS & REQUIRED_ROLE.keys()
    for internal in sorted(INTERNAL_METHODS):
        with pytest.raises(PermissionDenied, match="not available through the gateway"):
            await authenticate(internal, bearer(keys["ADMIN"]))


async def test_lookups_are_cached_for_the_configured_time_only(store, keys):
    clock = Clock()
    authenticate = ApiKeyAuthenticator(store, 1.0, clock=clock)
    unknown = "maas_aaaaaaaaaaaa_" + "B" * 43
    before = store.lookups
    for _ in range(5):
        await authenticate(WHOAMI, bearer(keys["READER"]))
        with pytest.raises(Unauthenticated):
            await authenticate(WHOAMI, bearer(unknown))
    assert store.lookups - before == 2  # one found, one not found: both cached
    clock.now += 1.01
    await authenticate(WHOAMI, bearer(keys["READER"]))
    assert store.lookups - before == 3


async def test_forget_drops_a_cached_key(store, keys):
    authenticate = ApiKeyAuthenticator(store, 60.0)
    admin = Admin(store, on_revoke=authenticate.forget)
    created = await admin.create_key("acme", Role.DEVELOPER, "to revoke")
    await authenticate(WHOAMI, bearer(created.plaintext))
    await admin.revoke_key(created.key.id)
    with pytest.raises(Unauthenticated, match="revoked"):
        await authenticate(WHOAMI, bearer(created.plaintext))


async def test_a_verified_key_is_not_hashed_again_but_still_checked_against_the_store(store, keys, monkeypatch):
    hashed = []
    monkeypatch.setattr(auth, "secret_matches", lambda secret, digest: hashed.append(secret) or matches(secret, digest))
    authenticate = ApiKeyAuthenticator(store, 0.0)  # every call looks the key up
    for _ in range(3):
        await authenticate(WHOAMI, bearer(keys["READER"]))
    assert len(hashed) == 1
    # Another secret under the same key id is checked in full, and refused.
    key_id, secret = parse_key(keys["READER"])
    forged = f"maas_{key_id}_{'A' if secret[0] != 'A' else 'B'}{secret[1:]}"
    with pytest.raises(Unauthenticated, match="not recognised"):
        await authenticate(WHOAMI, bearer(forged))
    # The key as stored changes (a new secret under its id): the remembered token no longer passes.
    found = store.get_key
    monkeypatch.setattr(store, "get_key", lambda wanted: dataclasses.replace(found(wanted), secret_hash="0" * 64))
    with pytest.raises(Unauthenticated, match="not recognised"):
        await authenticate(WHOAMI, bearer(keys["READER"]))


metadata_values = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=64),
    st.builds(lambda text: f"Bearer {text}", st.text(max_size=120)),
    st.builds(lambda text: f"Bearer maas_{text}", st.text(max_size=80)),
    st.sampled_from(["Bearer", "Bearer ", "bearer  x", "Bearer maas__", "Bearer maas_aaaaaaaaaaaa_"]),
)
methods = st.one_of(st.sampled_from(sorted(REQUIRED_ROLE)), st.text(max_size=80))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=methods,
    metadata=st.dictionaries(
        st.one_of(st.just("authorization"), st.text(max_size=20)), metadata_values, max_size=4
    ),
    use_real_key=st.sampled_from([None, "READER", "DEVELOPER", "ADMIN"]),
)
def test_garbage_only_ever_yields_auth_errors(store, keys, method, metadata, use_real_key):
    if use_real_key:
        metadata = {**metadata, **bearer(keys[use_real_key])}
    authenticate = ApiKeyAuthenticator(store, 1.0)
    try:
        asyncio.run(authenticate(method, metadata))
    except (Unauthenticated, PermissionDenied):
        return
    assert use_real_key and method in REQUIRED_ROLE
