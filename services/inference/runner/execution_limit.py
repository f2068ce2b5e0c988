"""The per-request execution limit of a model process; copied beside every runner, so it
imports nothing of the platform.

A request's model call runs in a worker thread (torch and onnxruntime release the GIL while
they compute) and the runner waits for it at most the deployment's limit. Past it nothing can
stop that thread, so the runner answers with an error and kills its own process a moment later:
Triton starts a new one and the core the runaway call held is free again.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

# Callers get RESOURCE_EXHAUSTED for errors holding this (services/common/serving.py).
EXECUTION_LIMIT_PREFIX = "execution limit exceeded: "
# Time for the error responses to leave the process before it goes.
KILL_DELAY_SECONDS = 1.0
DEFAULT_SECONDS = 30.0

T = TypeVar("T")


class ExecutionLimitExceeded(Exception):
    """A model call ran past the limit; the process is about to be killed."""


class ExecutionLimit:
    def __init__(self, seconds: float, kill: Callable[[], None] | None = None) -> None:
        self.seconds = seconds
        self._kill = kill or _kill_this_process
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-call")

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> ExecutionLimit:
        return cls(float(parameters.get("execution_limit_seconds") or DEFAULT_SECONDS))

    def prepare(self, function: Callable[..., T], *args) -> T:
        """Run `function` (a model's loading) on the thread of the model calls, without the limit.
        Torch's OpenMP threads belong to the thread that computes: with a second thread computing
        (loading on the main thread), libgomp sees more threads than cores and stops spinning
        between parallel regions, which made decoding three times slower on two cores."""
        return self._worker.submit(function, *args).result()

    def call(self, function: Callable[..., T], *args) -> T:
        future = self._worker.submit(function, *args)
        try:
            return future.result(timeout=self.seconds)
        except FutureTimeout:
            timer = threading.Timer(KILL_DELAY_SECONDS, self._kill)
            timer.daemon = True
            timer.start()
            raise ExecutionLimitExceeded(
                f"{EXECUTION_LIMIT_PREFIX}the model ran longer than this deployment's limit of "
                f"{self.seconds:g} s (execution_limit_seconds); its process is being restarted"
            ) from None


def _kill_this_process() -> None:
    # SIGKILL: a thread stuck in native code would keep the process alive through anything else.
    os.kill(os.getpid(), signal.SIGKILL)
