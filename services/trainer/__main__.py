"""python -m services.trainer"""

from services.common.entrypoint import run_service
from services.trainer.config import TrainerSettings
from services.trainer.server import create_app

if __name__ == "__main__":
    settings = TrainerSettings()
    run_service("trainer", settings, create_app, settings.trainer_metrics_addr)
