"""The gateway's tenants and keys on a real PostgreSQL (throwaway database per run)."""

from __future__ import annotations

import pytest

from services.common.database import make_engine, upgrade
from services.common.errors import AlreadyExists
from services.gateway.keys import parse_key, secret_matches
from services.gateway.server import MIGRATIONS
from services.gateway.service import Admin
from services.gateway.store import GatewayStore, Role

pytestmark = pytest.mark.postgres


async def test_tenants_keys_and_revocation_on_postgres(postgres_url, tmp_path) -> None:
    engine = make_engine(postgres_url)
    upgrade(engine, MIGRATIONS)
    upgrade(engine, MIGRATIONS)  # a second start-up finds the schema current
    admin = Admin(GatewayStore(engine))
    try:
        first = await admin.bootstrap_admin(tmp_path / "admin.key")
        assert first is not None and (tmp_path / "admin.key").stat().st_mode & 0o777 == 0o600
        assert await admin.bootstrap_admin(tmp_path / "admin.key") is None
        await admin.create_tenant("acme", "Acme")
        with pytest.raises(AlreadyExists):
            await admin.create_tenant("acme", "")
        created = await admin.create_key("acme", Role.READER, "ci")
        key_id, secret = parse_key(created.plaintext)
        stored = await admin.get_key(key_id)
        assert stored.tenant == "acme" and secret_matches(secret, stored.secret_hash)
        assert created.plaintext not in stored.secret_hash
        revoked = await admin.revoke_key(key_id)
        assert revoked.revoked and revoked.revoke_time is not None
        keys, _ = await admin.list_keys("acme", 10, "")
        assert [k.id for k in keys] == [key_id]
    finally:
        engine.dispose()
