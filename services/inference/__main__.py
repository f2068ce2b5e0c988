"""python -m services.inference"""

from services.common.entrypoint import run_service
from services.inference.config import InferenceSettings
from services.inference.server import create_app

if __name__ == "__main__":
    settings = InferenceSettings()
    run_service("inference", settings, create_app, settings.inference_metrics_addr)
