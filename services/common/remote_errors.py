"""A peer's gRPC status as the domain error this service raises in turn."""

from __future__ import annotations

import grpc

from services.common.interceptors import STATUS_OF_ERROR

ERROR_OF_STATUS = {status: error for error, status in STATUS_OF_ERROR.items()}


def domain_error(peer: str, error: grpc.aio.AioRpcError) -> Exception:
    """NOT_FOUND stays NotFound and so on; a code with no domain error (INTERNAL, UNKNOWN, ...)
    becomes a plain exception that the interceptor logs and reports as INTERNAL."""
    details = error.details() or ""
    kind = ERROR_OF_STATUS.get(error.code())
    if kind is None:
        return RuntimeError(f"{peer} answered {error.code().name}: {details}")
    return kind(details)
