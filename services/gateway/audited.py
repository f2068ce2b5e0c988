"""The decorator that writes each call of a gateway-owned servicer method (the AdminService's and
the BillingService's changes) to the audit log with its outcome, committed before the answer."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from services.gateway.audit import outcome
from services.gateway.auth import current_caller

Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]
# The resource an audit row names, from the request and the response (None when the call failed).
Describe = Callable[[Any, Any], str]


def audited(service: str, describe: Describe) -> Callable[[Handler], Handler]:
    """Audit the decorated method of `service`; its servicer holds the AuditLog as `self.audit`."""

    def decorate(handler: Handler) -> Handler:
        method = f"/{service}/{handler.__name__}"

        @functools.wraps(handler)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            code, response = "OK", None
            try:
                response = await handler(self, request, context)
                return response
            except BaseException as error:
                code = outcome(error, context)
                raise
            finally:
                if self.audit is not None:
                    caller = current_caller()
                    await self.audit.commit(caller.tenant, caller.key_id, method, describe(request, response), code)

        return wrapper

    return decorate
