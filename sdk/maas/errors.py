"""Errors the SDK raises: one class per gRPC status a caller may want to handle."""

from __future__ import annotations

import grpc


class ApiError(Exception):
    """A call failed; `code` is the gRPC status, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class NotFound(ApiError):
    pass


class InvalidArgument(ApiError):
    pass


class AlreadyExists(ApiError):
    pass


class PermissionDenied(ApiError):
    pass


class Unauthenticated(ApiError):
    pass


class Unavailable(ApiError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[ApiError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def from_rpc_error(error: grpc.RpcError) -> ApiError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return _BY_CODE.get(code, ApiError)(code, details or "")
