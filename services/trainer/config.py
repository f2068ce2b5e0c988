from __future__ import annotations

from services.common.settings import CommonSettings


class TrainerSettings(CommonSettings):
    trainer_addr: str = "127.0.0.1:50054"
    trainer_metrics_addr: str = "127.0.0.1:9154"
