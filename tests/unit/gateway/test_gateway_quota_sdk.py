"""The SDK's quota, usage and audit methods and the `maas usage` / `maas admin quota` commands
against the real gateway (fake backends, Redis fallbacks)."""

from __future__ import annotations

import asyncio

import typer
from maas.cli.admin import quota_app
from maas.cli.usage import usage
from maas.client import Client
from maas.gateway.v1 import admin_pb2
from typer.testing import CliRunner

from tests.unit.gateway.gateway_fakes import gateway_stack


async def test_sdk_and_cli_for_quotas_usage_and_audit(tmp_path):
    async with gateway_stack(tmp_path) as stack:
        await stack.wait_for_routes()  # a metered call of the reader
        address = f"127.0.0.1:{stack.port}"
        root = stack.keys["admin-of-admin"]

        def sdk_calls() -> tuple:
            with Client(address, root) as client:
                saved = client.set_quota(admin_pb2.Quota(tenant="acme", requests_per_day=1000))
                limited = client.set_api_key_rate_limit(stack.key_ids["reader"], 50.0, burst=100)
                cleared = client.set_api_key_rate_limit(stack.key_ids["reader"], None)
                rows = client.get_usage("acme")
                events = client.list_audit_events(tenant="admin", limit=2)  # the caller's tenant
                return saved, client.get_quota("acme"), limited, cleared, rows, events

        saved, got, limited, cleared, rows, events = await asyncio.to_thread(sdk_calls)
        assert saved.requests_per_day == got.requests_per_day == 1000
        assert limited.rate_limit.burst == 100 and not cleared.HasField("rate_limit")
        assert rows and rows[-1].requests > 0  # the fixture's own calls
        assert [e.method.rpartition("/")[2] for e in events] == ["SetApiKeyRateLimit"] * 2

        app = typer.Typer()
        app.add_typer(quota_app, name="quota")
        app.command()(usage)
        runner = CliRunner()
        env = {"MAAS_API_KEY": root, "MAAS_GATEWAY_ADDR": address, "COLUMNS": "200"}

        def cli_calls() -> tuple:
            quota = runner.invoke(
                app, ["quota", "set", "acme", "--requests-per-day", "5", "--rps", "2"], env=env
            )
            shown = runner.invoke(app, ["quota", "get", "acme"], env=env)
            used = runner.invoke(app, ["usage", "--tenant", "acme"], env=env)
            return quota, shown, used

        quota, shown, used = await asyncio.to_thread(cli_calls)
        assert quota.exit_code == 0, quota.output
        assert "requests per day" in shown.output and "unlimited" in shown.output
        assert used.exit_code == 0 and "usage of tenant acme" in used.output and "requests" in used.output
