"""Typed settings from MAAS_* environment variables, read once at each entry point."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_home() -> Path:
    return REPO_ROOT / ".maas"


class CommonSettings(BaseSettings):
    """What every service reads. Each service's config.py extends it with its own fields."""

    model_config = SettingsConfigDict(env_prefix="MAAS_", extra="ignore")

    home: Path = Field(default_factory=default_home, description="Root of all local state")
    log_level: str = "info"
    # Shared secret between the gateway and the internal services. Empty disables the check
    # (only sensible in unit tests); `maas up` always sets one.
    internal_token: str = ""
    # Largest gRPC message a service accepts; bigger ones get RESOURCE_EXHAUSTED.
    max_message_bytes: int = 64 * 1024 * 1024
    # Seconds in-flight RPCs get to finish after SIGTERM.
    shutdown_grace_seconds: float = 10.0

    def sqlite_url(self, service: str) -> str:
        return f"sqlite:///{self.home / service / f'{service}.db'}"
