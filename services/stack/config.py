from __future__ import annotations

from pathlib import Path

from services.common.settings import CommonSettings


class StackSettings(CommonSettings):
    # Start redis-server ourselves on redis_url's port; false when redis_url points elsewhere.
    redis_managed: bool = True
    # Seconds to wait for every service to report SERVING.
    start_timeout_seconds: float = 300.0

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "stack.json"

    @property
    def admin_key_file(self) -> Path:
        return self.home / "admin.key"

    @property
    def internal_token_file(self) -> Path:
        return self.home / "internal.token"
