"""python -m services.registry"""

from services.common.entrypoint import run_service
from services.registry.config import RegistrySettings
from services.registry.server import create_app

if __name__ == "__main__":
    settings = RegistrySettings()
    run_service("registry", settings, create_app, settings.registry_metrics_addr)
