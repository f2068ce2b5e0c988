from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from services.common.settings import CommonSettings


def _default_database_url(data: dict[str, Any]) -> str:
    return f"sqlite:///{Path(data['home']) / 'trainer' / 'trainer.db'}"


def _default_jobs_dir(data: dict[str, Any]) -> Path:
    return Path(data["home"]) / "trainer" / "jobs"


class TrainerSettings(CommonSettings):
    # trainer_addr (where it listens) lives in CommonSettings: the gateway reads it too.
    trainer_metrics_addr: str = "127.0.0.1:9154"
    # SQLite under $MAAS_HOME by default; PostgreSQL by URL, e.g.
    # postgresql+psycopg://postgres@127.0.0.1:5432/trainer
    trainer_database_url: str = Field(default_factory=_default_database_url)
    # One folder per job: spec, downloaded dataset, checkpoint, worker log, exported model.
    trainer_jobs_dir: Path = Field(default_factory=_default_jobs_dir)
    # Jobs running at once on this trainer, and per tenant (fair between tenants).
    trainer_max_running_jobs: int = 2
    trainer_max_running_jobs_per_tenant: int = 1
    # Upper bounds a spec may ask for.
    trainer_max_workers: int = 8
    trainer_max_epochs: int = 1000
    # CPU threads each worker process uses; 0 shares the cores between the running jobs.
    trainer_threads_per_job: int = 0
    # A job interrupted this many times (trainer restarts) is marked FAILED instead of resumed.
    trainer_max_attempts: int = 3
    # Seconds a cancelled or stopped worker gets after SIGTERM before SIGKILL.
    trainer_stop_grace_seconds: float = 1.0
    # Retraining policies: how often the trainer holding the leader lock looks for new dataset
    # versions and due schedules and carries runs on (0: never; tests drive it by hand), and
    # the longest one evaluation of a candidate against the serving version may take.
    # The serving version is asked of the inference service at inference_addr (CommonSettings).
    trainer_retrain_poll_seconds: float = 10.0
    trainer_retrain_evaluation_timeout_seconds: float = 600.0

    @model_validator(mode="after")
    def _check_limits(self) -> TrainerSettings:
        if self.trainer_max_running_jobs < 1 or self.trainer_max_running_jobs_per_tenant < 1:
            raise ValueError("trainer_max_running_jobs and trainer_max_running_jobs_per_tenant must be at least 1")
        if self.trainer_max_workers < 1 or self.trainer_max_epochs < 1 or self.trainer_max_attempts < 1:
            raise ValueError("trainer_max_workers, trainer_max_epochs and trainer_max_attempts must be at least 1")
        if self.trainer_retrain_poll_seconds < 0 or self.trainer_retrain_evaluation_timeout_seconds <= 0:
            raise ValueError("trainer_retrain_poll_seconds must not be negative, and the evaluation timeout must be positive")
        return self

    def threads_per_job(self) -> int:
        if self.trainer_threads_per_job > 0:
            return self.trainer_threads_per_job
        return max(1, (os.cpu_count() or 1) // self.trainer_max_running_jobs)
