"""Domain errors. Services raise these; one interceptor turns them into gRPC status codes.

They carry no gRPC types so that domain code stays plain Python.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MaasError(Exception):
    """Base class: the message is shown to the caller, so write it for a person to act on."""

    # Sent with the status as trailing metadata: e.g. serialized google.rpc details under
    # "grpc-status-details-bin" that a client can act on (retry delay, which quota).
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()


class InvalidArgument(MaasError):
    """The request itself is malformed: fix the request."""


class NotFound(MaasError):
    """A named resource does not exist (in the caller's tenant)."""


def not_found(kind: str, name: str, known: Iterable[str]) -> NotFound:
    """NOT_FOUND for `name`, suggesting the `known` names closest to it (a typo's fix). Pass only
    names the caller may see: those of its own tenant."""
    message = f"{kind} {name[:80]!r} not found"
    if close := difflib.get_close_matches(name[:80], list(known), n=3):
        message += f"; did you mean {' or '.join(repr(match) for match in close)}?"
    return NotFound(message)


class AlreadyExists(MaasError):
    """A resource with that name exists already."""


class FailedPrecondition(MaasError):
    """The request is well-formed but the system is not in a state to run it."""


class PermissionDenied(MaasError):
    """The caller is known but its role does not allow this."""


class Unauthenticated(MaasError):
    """The caller did not prove who it is."""


class ResourceExhausted(MaasError):
    """A limit or quota was hit."""


class Unavailable(MaasError):
    """A dependency is down; retrying later may succeed."""


class DataLoss(MaasError):
    """Bytes arrived damaged or incomplete (size or checksum mismatch)."""


class DeadlineExceeded(MaasError):
    """The work did not finish within the time it was given."""
