"""python -m services.stack: run the whole local stack in the foreground until SIGTERM/SIGINT."""

import logging
import sys

from services.common.settings import make_private
from services.stack.config import StackSettings
from services.stack.supervisor import Supervisor

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s stack %(levelname)s %(message)s")
    settings = StackSettings()
    make_private(settings.home)
    sys.exit(Supervisor(settings).run())
