"""python -m services.stack: run the whole local stack in the foreground until SIGTERM/SIGINT."""

import logging
import sys

from services.stack.config import StackSettings
from services.stack.supervisor import Supervisor

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s stack %(levelname)s %(message)s")
    sys.exit(Supervisor(StackSettings()).run())
