"""python -m services.gateway                      serve the gateway (MAAS_GATEWAY_WORKERS processes)
python -m services.gateway bootstrap-admin --key-file PATH   issue the first admin key
python -m services.gateway worker --index N --primary PID   one of the workers (started by the gateway)"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from services.common.entrypoint import run_service
from services.common.logs import configure_logging
from services.common.settings import make_private
from services.gateway.config import GatewaySettings
from services.gateway.server import bootstrap_admin, create_app
from services.gateway.workers import die_with_parent, serve_workers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.gateway", description="The MaaS gateway.")
    commands = parser.add_subparsers(dest="command")
    bootstrap = commands.add_parser(
        "bootstrap-admin",
        help="create tenant 'admin' and an admin API key unless an active one exists (idempotent)",
    )
    bootstrap.add_argument(
        "--key-file", type=Path, required=True, help="where to write the new key (mode 0600)"
    )
    bootstrap.add_argument(
        "--force", action="store_true", help="issue another admin key even if one exists (lost key file)"
    )
    worker = commands.add_parser("worker", help="serve as one of the gateway's workers (internal)")
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--primary", type=int, required=True, help="the primary's pid")
    args = parser.parse_args(argv)
    settings = GatewaySettings()
    if args.command == "bootstrap-admin":
        configure_logging("gateway", settings.log_level)
        asyncio.run(bootstrap_admin(settings, args.key_file, args.force))
    elif args.command == "worker":
        die_with_parent(args.primary)
        # The primary serves the workers' merged metrics.
        run_service(f"gateway-{args.index}", settings, create_app, metrics_address=None)
    elif settings.gateway_workers > 1:
        configure_logging("gateway", settings.log_level)
        make_private(settings.home)
        serve_workers(settings)
    else:
        run_service("gateway", settings, create_app, settings.gateway_metrics_addr)


if __name__ == "__main__":
    main()
