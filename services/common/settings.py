"""Typed settings from MAAS_* environment variables, read once at each entry point."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_private(home: Path) -> None:
    """From here on this process creates files 0600 and folders 0700, starting with `home`:
    it holds keys, databases, blobs and the Redis file of cached outputs."""
    os.umask(0o077)
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    home.chmod(0o700)


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
    # The header value Triton's restricted protocols require (all but health): the inference
    # service and the gateway send it. Empty: Triton runs unrestricted (unit tests); `maas up`
    # always sets one.
    triton_token: str = ""
    # Largest gRPC message a service accepts; bigger ones get RESOURCE_EXHAUSTED.
    max_message_bytes: int = 64 * 1024 * 1024
    # Seconds in-flight RPCs get to finish after SIGTERM.
    shutdown_grace_seconds: float = 10.0

    # Where each service listens (host:port). Peers find each other through the same fields.
    gateway_addr: str = "127.0.0.1:50051"
    registry_addr: str = "127.0.0.1:50052"
    inference_addr: str = "127.0.0.1:50053"
    trainer_addr: str = "127.0.0.1:50054"
    # The stack's own redis-server (not the machine's shared one on 6379).
    redis_url: str = "redis://127.0.0.1:6390/0"

    # TLS on this service's gRPC port (PEM files). Both set: TLS; neither: plaintext.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Set: callers must present a client certificate signed by this CA (mTLS between services).
    tls_client_ca_file: Path | None = None
    # Set: the internal services this one dials are reached over TLS, verified against this CA;
    # with tls_cert_file/tls_key_file the same certificate is presented as the client's.
    tls_ca_file: Path | None = None
    # Whether Triton's gRPC port speaks TLS (our own tritonserver then serves this service's
    # certificate). Unset: yes when TLS is configured (tls_cert_file and tls_ca_file). An external
    # Triton that serves plaintext inside its NetworkPolicy fence needs false.
    triton_tls: bool | None = None

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        # Children run with another working directory; a relative home would move.
        return home.expanduser().resolve()

    @model_validator(mode="after")
    def _check_tls(self) -> CommonSettings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("set both MAAS_TLS_CERT_FILE and MAAS_TLS_KEY_FILE, or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("MAAS_TLS_CLIENT_CA_FILE (mTLS) needs MAAS_TLS_CERT_FILE and MAAS_TLS_KEY_FILE")
        return self

    @property
    def uses_triton_tls(self) -> bool:
        if self.triton_tls is None:
            return bool(self.tls_cert_file and self.tls_ca_file)
        return self.triton_tls

    def sqlite_url(self, service: str) -> str:
        return f"sqlite:///{self.home / service / f'{service}.db'}"
