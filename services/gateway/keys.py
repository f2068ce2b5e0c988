"""API keys: "maas_<id>_<secret>". The id is public (safe to log, the lookup key); only a
sha256 of the secret is stored. Keys are high-entropy random tokens, so a fast hash is enough."""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from services.common.errors import Unauthenticated

PREFIX = "maas_"
ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
ID_LENGTH = 12
KEY_PATTERN = re.compile(rf"{PREFIX}([{ID_ALPHABET}]{{{ID_LENGTH}}})_([A-Za-z0-9_-]{{43}})")


class Role(enum.IntEnum):
    """Ordered: each role may do everything the ones below it may."""

    READER = 1
    DEVELOPER = 2
    ADMIN = 3


# The platform's own tenant (`maas up` bootstraps the first key here): its admins administer every
# tenant; an admin of any other tenant administers only its own.
ADMIN_TENANT = "admin"


@dataclass(frozen=True)
class NewKey:
    id: str
    secret_hash: str
    plaintext: str  # shown to the caller once, never stored


def generate_key() -> NewKey:
    key_id = "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))
    secret = secrets.token_urlsafe(32)
    return NewKey(key_id, hash_secret(secret), f"{PREFIX}{key_id}_{secret}")


def parse_key(plaintext: str) -> tuple[str, str]:
    """(id, secret) of a well-formed key; Unauthenticated otherwise."""
    match = KEY_PATTERN.fullmatch(plaintext)
    if match is None:
        raise Unauthenticated(
            "malformed API key: expected maas_<id>_<secret> exactly as CreateApiKey returned it"
        )
    return match.group(1), match.group(2)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), secret_hash)
