"""What every service's __main__ does: settings, logging, serve until signalled."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from services.common.logs import configure_logging
from services.common.server import App, serve_until_signalled
from services.common.settings import CommonSettings, make_private

S = TypeVar("S", bound=CommonSettings)


def run_service(
    name: str, settings: S, create_app: Callable[[S], Awaitable[App]], metrics_address: str | None
) -> None:
    configure_logging(name, settings.log_level)
    make_private(settings.home)

    async def main() -> None:
        app = await create_app(settings)
        await serve_until_signalled(app, metrics_address=metrics_address, grace=settings.shutdown_grace_seconds)

    asyncio.run(main())
