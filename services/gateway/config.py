from __future__ import annotations

from pydantic import model_validator

from services.common.settings import CommonSettings


class GatewaySettings(CommonSettings):
    # The public endpoint (MAAS_GATEWAY_ADDR): clients, the SDK and the CLI dial it.
    gateway_addr: str = "127.0.0.1:50051"
    gateway_metrics_addr: str = "127.0.0.1:9151"
    # Empty means the embedded SQLite file under `home`.
    gateway_database_url: str = ""
    # How long a key lookup (found or not) is reused; bounds how late a revocation takes effect.
    auth_cache_seconds: float = 1.0
    # Deadline for the call to Triton when the client sent none, so that nothing waits forever.
    predict_timeout_seconds: float = 60.0

    @model_validator(mode="after")
    def _default_database(self) -> GatewaySettings:
        if not self.gateway_database_url:
            self.gateway_database_url = self.sqlite_url("gateway")
        return self
