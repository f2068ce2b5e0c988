"""The SDK's quota, usage and audit methods and the `maas usage` / `maas admin quota` commands
against the real gateway (fake backends, Redis fallbacks)."""

from __future__ import annotations

import asyncio

import pytest
import typer
from maas.cli.admin import quota_app
from maas.cli.usage import usage
from maas.client import Client
from maas.errors import ApiError
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


async def test_quota_set_changes_only_the_fields_given(tmp_path):
    async with gateway_stack(tmp_path) as stack:
        address = f"127.0.0.1:{stack.port}"
        app = typer.Typer()
        app.add_typer(quota_app, name="quota")
        env = {"MAAS_API_KEY": stack.keys["admin-of-admin"], "MAAS_GATEWAY_ADDR": address, "COLUMNS": "200"}

        def quota_set(*args: str):  # type: ignore[no-untyped-def]
            return CliRunner().invoke(app, ["quota", "set", "acme", *args], env=env)

        def calls() -> tuple:
            with Client(address, stack.keys["admin-of-admin"]) as client:
                steps = [
                    quota_set("--rps", "200", "--burst", "400"),
                    quota_set("--requests-per-day", "100000"),
                    after_both := client.get_quota("acme"),
                    quota_set("--clear", "rps", "--tokens-per-day", "7"),
                    after_clear := client.get_quota("acme"),
                    quota_set("--clear", "nonsense"),
                    quota_set("--rps", "3", "--clear", "rps"),
                    quota_set(),
                    # The SDK: an empty mask still replaces the whole quota.
                    client.set_quota(admin_pb2.Quota(tenant="acme", tokens_per_month=9)),
                ]
                with pytest.raises(ApiError, match=r"cannot set \['update_time'\]"):
                    client.set_quota(admin_pb2.Quota(tenant="acme"), ["update_time"])
                return steps, after_both, after_clear

        steps, after_both, after_clear = await asyncio.to_thread(calls)
        first, second, _, cleared, _, unknown, contradiction, empty, replaced = steps
        assert first.exit_code == second.exit_code == cleared.exit_code == 0, first.output + second.output
        assert after_both.rate_limit.requests_per_second == 200 and after_both.rate_limit.burst == 400
        assert after_both.requests_per_day == 100_000
        assert "requests per second 200 burst 400" in " ".join(second.output.split())  # the whole quota
        assert after_clear.rate_limit.requests_per_second == after_clear.rate_limit.burst == 0
        assert after_clear.requests_per_day == 100_000 and after_clear.tokens_per_day == 7
        assert unknown.exit_code == 2 and "rps" in unknown.output
        assert contradiction.exit_code == 2 and "both given and cleared" in contradiction.output
        assert empty.exit_code == 2
        assert replaced.tokens_per_month == 9 and replaced.requests_per_day == replaced.tokens_per_day == 0


async def test_usage_names_the_tenant_and_days_it_looked_at(tmp_path):
    async with gateway_stack(tmp_path) as stack:
        await stack.wait_for_routes()  # a metered call of acme's reader
        address = f"127.0.0.1:{stack.port}"
        app = typer.Typer()
        app.command()(usage)

        def usage_of(who: str, *args: str):  # type: ignore[no-untyped-def]
            env = {"MAAS_API_KEY": stack.keys[who], "MAAS_GATEWAY_ADDR": address, "COLUMNS": "200"}
            return CliRunner().invoke(app, list(args), env=env)

        def calls() -> tuple:
            return (
                usage_of("admin-of-admin", "--end", "2020-01-07"),
                usage_of("admin-of-admin", "--tenant", "acme", "--start", "2020-01-01", "--end", "2020-01-02"),
                usage_of("reader", "--start", "2020-01-01", "--end", "2020-01-02"),
                usage_of("reader"),
            )

        platform, other, reader_none, reader_own = await asyncio.to_thread(calls)
        assert platform.output.strip() == (
            "no usage for tenant admin between 2020-01-01 and 2020-01-07; pass --tenant NAME for another tenant's"
        )
        assert other.output.strip() == "no usage for tenant acme between 2020-01-01 and 2020-01-02"
        assert reader_none.output.strip() == "no usage for tenant acme between 2020-01-01 and 2020-01-02"
        assert "usage of tenant acme" in reader_own.output  # the default tenant is named too
