"""python -m services.trainer.worker JOB_FOLDER: one training or optimization job in its own process.

The trainer service starts it (through `torchrun` when the job has several workers) and reads
its events, one JSON object per line, from its stdout: started, progress, checkpoint, log,
result or error. Everything else the process prints goes to stderr (the job's worker.log).
The job folder holds job.json (written by the service), the checkpoint and the exported model;
an optimization job's also holds source.pt, the version it starts from, TorchScript or ONNX (see
optimization.py, and optimization_uploaded.py for versions without a training spec).
A worker whose trainer dies exits too: the restarted trainer resumes the job from its checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

JOB_FILE = "job.json"
LOCK_FILE = "worker.lock"
# The trainer's pid: a worker outliving it would race the resumed job for the same folder.
TRAINER_PID_ENV = "MAAS_TRAINER_PID"


class EventWriter:
    def __init__(self, stream: IO[str], enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(event, default=float) + "\n"
        with self.lock:
            self.stream.write(line)
            self.stream.flush()


class EventLogHandler(logging.Handler):
    """Log records at INFO and above also travel to the trainer as log events."""

    def __init__(self, emit: EventWriter) -> None:
        super().__init__(logging.INFO)
        self.emit_event = emit

    def emit(self, record: logging.LogRecord) -> None:
        self.emit_event({"type": "log", "level": record.levelname.lower(), "message": record.getMessage()})


def watch_trainer(trainer_pid: int, parent_pid: int) -> None:
    """Exit as soon as the process that started us, or the trainer, is gone."""
    while True:
        if os.getppid() != parent_pid or not _alive(trainer_pid):
            os._exit(3)
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The state follows the parenthesised command name; Z is a zombie (dead, not yet reaped).
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return True


def main(folder: Path) -> int:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    # Events own the real stdout; anything else printed to stdout lands in stderr instead.
    events = EventWriter(os.fdopen(os.dup(1), "w"), enabled=rank == 0)
    os.dup2(2, 1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    logging.getLogger().addHandler(EventLogHandler(events))
    if trainer_pid := int(os.environ.get(TRAINER_PID_ENV, "0")):
        threading.Thread(target=watch_trainer, args=(trainer_pid, os.getppid()), daemon=True).start()
    try:
        run(folder, rank, world, events)
    except Exception as exc:  # every failure becomes the job's reason, not a bare exit code
        logging.getLogger(__name__).debug("job failed", exc_info=True)
        logging.getLogger(__name__).error("the job failed: %s", exc, exc_info=False)
        events({"type": "error", "message": f"{type(exc).__name__}: {exc}" if not _is_domain(exc) else str(exc)})
        return 1
    return 0


def run(folder: Path, rank: int, world: int, events: EventWriter) -> None:
    import torch
    import torch.distributed as dist

    from services.trainer.spec import TrainingSpec
    from services.trainer.training import Job, train

    if rank == 0:
        # Held for the life of the process: a resumed job waits here until its previous worker
        # (orphaned by a trainer crash, exiting on its own) has let go of the folder.
        lock = (folder / LOCK_FILE).open("a")
        fcntl.flock(lock, fcntl.LOCK_EX)
    config = json.loads((folder / JOB_FILE).read_text())
    torch.set_num_threads(int(config.get("threads", 1)))
    if config.get("kind") == "optimization":
        # A version without a training spec (or ONNX) is optimized as the artifact it is.
        if config.get("uploaded"):
            from services.trainer.optimization_uploaded import optimize
        else:
            from services.trainer.optimization import optimize

        events(optimize(folder, config, events, pick_device(config["optimization"]["device"], rank)))
        return
    spec = TrainingSpec.from_dict(config["spec"])
    device = pick_device(spec.device, rank)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    job = Job(
        folder=folder,
        spec=spec,
        dataset_file=folder / config["dataset_file"] if config.get("dataset_file") else None,
        dataset_format=config.get("dataset_format", ""),
        target_column=config.get("target_column", ""),
        rank=rank,
        world=world,
    )
    try:
        result = train(job, events, device)
    finally:
        if world > 1:
            dist.destroy_process_group()
    if result is not None:
        events(result)


def pick_device(wanted: str, rank: int):  # type: ignore[no-untyped-def]
    import torch

    from services.common.errors import FailedPrecondition

    if wanted == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition("device cuda was asked for, but this trainer has no CUDA device")
    if wanted != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _is_domain(exc: Exception) -> bool:
    from services.common.errors import MaasError

    return isinstance(exc, MaasError)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
