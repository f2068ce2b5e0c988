"""The operator allowlist for TorchScript uploads.

A TorchScript archive is code: each compiled function is a graph of operators, and some of them
reach outside the model (aten::from_file maps any file into a tensor, aten::save writes one, a
custom op from torch.ops.<namespace> runs whatever a library registered). Every function the
archive compiles is checked: each method of every module and class, hooks, and the free functions
they call, recursively into the blocks of control flow and into subgraphs.

The registry does not import torch. `check_operators(path)` has a short-lived process load the
archive with torch, walk its graphs and print one JSON verdict as its last line. That process is
forked from a zygote (`python -m services.registry.torchscript_ops`), which the registry starts on
first use: the zygote imports torch once, which took most of a check's time (about 1 s of 1.3 s
for a 400 MB model), and does nothing else but fork checkers and watch them. Loading runs the
archive's `__setstate__` methods, so the checker is given nothing worth taking: no MAAS_* or
other environment (the zygote starts without one), an empty scratch working directory, no file
descriptor but its own output files, no byte it may write to a file beyond that small output
(RLIMIT_FSIZE), a CPU-time limit, a wall-clock timeout and a resident-memory cap the zygote
enforces, and no exception text of the archive's making in what the caller is told.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import resource
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from services.common.errors import InvalidArgument

log = logging.getLogger(__name__)

# Operators outside these namespaces are refused: custom ops (torch.ops.<anything else>), the
# distributed, profiler and test namespaces. quantized:: is what the trainer's int8 tier runs.
ALLOWED_NAMESPACES = frozenset({"aten", "prim", "quantized"})
# Torchbind classes (torch.classes.<namespace>.<Class>) the int8 tier holds: packed linear
# weights and quantized RNN cells.
ALLOWED_TORCHBIND_NAMESPACES = frozenset({"quantized", "rnn"})
TORCHBIND_PREFIX = "__torch__.torch.classes."
# Inside the allowed namespaces: file access, Python calls and remote calls.
REFUSED_OPERATORS = frozenset(
    {"aten::from_file", "aten::save", "prim::PythonOp", "prim::IgnoredPythonOp"}
)
# And anything named like file, serialisation, process or network access, today's or a future one.
REFUSED_NAME = re.compile(
    r"file|save|load|pickle|rpc|process|system|exec|spawn|popen|socket|shm|mmap|environ|dlopen|library",
    re.IGNORECASE,
)
MANGLE = re.compile(r"___torch_mangle_\d+\.")
# How many refused operators a verdict lists; the message names the first few.
MAX_REPORTED = 20
MESSAGE_NAMES = 3

# Limits of each checker (forked from the zygote, which imported torch: ~250 MB of it).
CHECK_TIMEOUT_S = 120.0
CHECK_CPU_SECONDS = 120
# Loading holds the archive's bytes and its tensors: room for both, above torch's own footprint.
CHECK_BASE_MEMORY_BYTES = 1024 * 1024 * 1024
CHECK_MEMORY_PER_ARTIFACT_BYTE = 3
# A checker's stdout and stderr go to files; nothing it writes to any file may exceed this.
CHECK_OUTPUT_BYTES = 1024 * 1024
# How often the zygote looks at its running checkers.
POLL_S = 0.02
# How long the zygote outlives its last check (it holds torch's ~250 MB), and how long past a
# check's timeout the registry waits for a zygote that stopped answering.
ZYGOTE_IDLE_S = 600.0
ZYGOTE_GRACE_S = 30.0


def check_operators(path: Path, *, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Raise InvalidArgument naming the first refused operators (and the methods holding them)
    unless every function the archive compiles uses allowed operators only."""
    verdict = _run_checker(path, timeout_s)
    if "load_error" in verdict:
        raise InvalidArgument(
            f"this TorchScript archive cannot be loaded by torch.jit.load ({verdict['load_error']}); "
            "save it with torch.jit.save from torch 2.x"
        )
    refused = verdict["refused"]
    if refused:
        named = "; ".join(f"{item['operator']} in {item['function']}" for item in refused[:MESSAGE_NAMES])
        more = f" (and {len(refused) - MESSAGE_NAMES} more)" if len(refused) > MESSAGE_NAMES else ""
        raise InvalidArgument(
            f"this TorchScript model uses operators the platform does not run: {named}{more}. "
            "Models may use aten math and nn operators, control flow and the int8 quantized "
            "operators; file, save/load, process, network and custom (torch.ops.*) operators are refused"
        )


def warm_up() -> None:
    """Start the zygote now if it is not running, so that its torch import overlaps an upload."""
    _ZYGOTE.start()


def _run_checker(path: Path, timeout_s: float) -> dict[str, Any]:
    memory_cap = CHECK_BASE_MEMORY_BYTES + CHECK_MEMORY_PER_ARTIFACT_BYTE * path.stat().st_size
    with tempfile.TemporaryDirectory(prefix="maas-operator-check-") as scratch:
        returncode, failure = _ZYGOTE.check(
            {"path": str(path.resolve()), "scratch": scratch, "timeout_s": timeout_s, "memory_cap": memory_cap}
        )
        if failure:
            raise InvalidArgument(f"the TorchScript operator check was stopped: {failure}")
        output = _read(Path(scratch) / "stdout").decode("utf-8", "replace")
        diagnostics = _read(Path(scratch) / "stderr")[-2000:].decode("utf-8", "replace")
    if returncode != 0:
        log.warning("operator check of %s exited %s: %s", path.name, returncode, diagnostics)
        raise InvalidArgument(
            f"the TorchScript operator check could not finish (exit status {returncode}); "
            "save the model with torch.jit.save"
        )
    return _parse_verdict(output)


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


class _Zygote:
    """The registry's side of the zygote: started on first use and again after it exits, shared
    by concurrent checks (a request line each; a reader thread hands each answer line to its
    caller), let go once no check has used it for ZYGOTE_IDLE_S."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        # Request id -> the zygote it went to and its answer, once that zygote gives it.
        self._answers: dict[int, tuple[subprocess.Popen[bytes], Future[dict[str, Any]]]] = {}
        self._ids = itertools.count()
        self._idle_timer: threading.Timer | None = None

    def start(self) -> None:
        with self._lock:
            self._started()
            self._restart_idle_timer()

    def check(self, request: dict[str, Any]) -> tuple[int, str]:
        """Send one check; (its exit status, "") or (-1, why it was stopped)."""
        answer: Future[dict[str, Any]] = Future()
        with self._lock:
            process = self._started()
            request_id = next(self._ids)
            self._answers[request_id] = (process, answer)
            try:
                assert process.stdin is not None
                process.stdin.write(json.dumps({**request, "id": request_id}).encode() + b"\n")
                process.stdin.flush()
            except OSError:
                pass  # the zygote has exited: its reader answers for it
        try:
            # The zygote enforces the timeout; this bound is for a zygote that stopped answering.
            reply = answer.result(timeout=request["timeout_s"] + ZYGOTE_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            reply = {"failure": f"loading the archive took longer than {request['timeout_s']:g} s"}
        finally:
            with self._lock:
                del self._answers[request_id]
                self._restart_idle_timer()
        return reply.get("returncode", -1), reply.get("failure", "")

    def _started(self) -> subprocess.Popen[bytes]:
        if self._process is not None and self._process.poll() is None:
            return self._process
        # Each checker gets a scratch folder of its own; the zygote runs no archive's code.
        temp = tempfile.gettempdir()
        process = subprocess.Popen(
            # -I: no PYTHON* variables, no user site, not the working directory on sys.path.
            [sys.executable, "-I", "-m", __name__],
            cwd=temp,
            env=_checker_environment(temp),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            # Its own process group, which its checkers share: killing the group ends them all.
            start_new_session=True,
        )
        threading.Thread(target=self._read_answers, args=(process,), daemon=True).start()
        self._process = process
        return process

    def _read_answers(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            reply = json.loads(line)
            with self._lock:
                asked = self._answers.get(reply.pop("id"))  # None: its check gave up waiting
            if asked is not None:
                asked[1].set_result(reply)
        process.wait()
        with self._lock:
            for asked, answer in self._answers.values():
                if asked is process and not answer.done():
                    answer.set_result({"failure": "the checking process ended unexpectedly"})
            if self._process is process:
                self._process = None

    def _restart_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = threading.Timer(ZYGOTE_IDLE_S, self._stop_if_idle)
        self._idle_timer.daemon = True
        self._idle_timer.start()

    def _stop_if_idle(self) -> None:
        with self._lock:
            if self._process is not None and not self._answers:
                assert self._process.stdin is not None
                self._process.stdin.close()  # the zygote exits at the end of its input
                self._process = None


_ZYGOTE = _Zygote()


def _checker_environment(scratch: str) -> dict[str, str]:
    """Built from nothing, so no MAAS_* secret, token or credential reaches the archive's code."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": scratch,
        "TMPDIR": scratch,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
    }


def _limit_resources() -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (CHECK_CPU_SECONDS, CHECK_CPU_SECONDS))
    resource.setrlimit(resource.RLIMIT_FSIZE, (CHECK_OUTPUT_BYTES, CHECK_OUTPUT_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # No address-space limit: torch reserves far more virtual memory than it uses, so RLIMIT_AS
    # either breaks the import or bounds nothing; the zygote caps the resident set instead.


def _overrun(pid: int, deadline: float, timeout_s: float, memory_cap: int) -> str:
    """Why a running checker must be stopped, or "" while it keeps within its limits."""
    if time.monotonic() > deadline:
        return f"loading the archive took longer than {timeout_s:g} s"
    if (resident := _resident_bytes(pid)) > memory_cap:
        return f"loading the archive used more than {memory_cap // (1024 * 1024)} MiB ({resident} bytes)"
    return ""


def _resident_bytes(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _parse_verdict(output: str) -> dict[str, Any]:
    """The verdict is the last line: the checker prints it after the archive's own code has run,
    so whatever that code printed comes before it. Anything else fails closed."""
    lines = output.strip().splitlines()
    try:
        verdict = json.loads(lines[-1])
    except (IndexError, ValueError):
        verdict = None
    if isinstance(verdict, dict) and isinstance(verdict.get("load_error"), str):
        return verdict
    if isinstance(verdict, dict) and isinstance(verdict.get("refused"), list) and all(
        isinstance(item, dict) and isinstance(item.get("operator"), str) and isinstance(item.get("function"), str)
        for item in verdict["refused"]
    ):
        return verdict
    raise InvalidArgument("the TorchScript operator check gave no verdict; save the model with torch.jit.save")


# The checking subprocess


def inspect_archive(path: str) -> dict[str, Any]:
    """Load the archive in this process and list its refused operators."""
    import torch

    torch.set_num_threads(1)
    # What torch.jit.load does, keeping the compilation unit: it holds every compiled function
    # (each method of every module and class, hooks, free functions), reachable or not.
    unit = torch._C.CompilationUnit()
    try:
        torch._C.import_ir_module(unit, path, torch.device("cpu"), {}, False)
    except Exception as exc:  # the archive's own __setstate__ may raise: its text is not echoed
        print(f"load failed: {type(exc).__name__}", file=sys.stderr)
        return {"load_error": type(exc).__name__}
    refused: dict[tuple[str, str], None] = {}
    for function in unit.get_functions():
        for node in _nodes(function.graph):
            operator = _refused_operator(node)
            if operator:
                refused[(operator, _readable(function.qualified_name))] = None
    return {
        "refused": [{"operator": op, "function": fn} for op, fn in list(refused)[:MAX_REPORTED]],
        "functions": len(unit.get_functions()),
    }


def _nodes(graph: Any) -> Iterator[Any]:
    """Every node of a graph or block, into the blocks of If/Loop and subgraph attributes (fork)."""
    for node in graph.nodes():
        yield node
        for block in node.blocks():
            yield from _nodes(block)
        for name in node.attributeNames():
            kind = node.kindOf(name)
            if kind == "g":
                yield from _nodes(node.g(name))
            elif kind == "gs":
                for subgraph in node.gs(name):
                    yield from _nodes(subgraph)


def _refused_operator(node: Any) -> str:
    kind = node.kind()
    namespace, _, name = kind.partition("::")
    if namespace not in ALLOWED_NAMESPACES or kind in REFUSED_OPERATORS or REFUSED_NAME.search(name):
        return kind
    # Methods of torchbind objects are operators too: only the int8 tier's classes may be used.
    for value in [*node.inputs(), *node.outputs()]:
        value_type = value.type()
        if value_type.kind() == "ClassType":
            qualified = value_type.qualified_name()
            if qualified.startswith(TORCHBIND_PREFIX):
                if qualified[len(TORCHBIND_PREFIX) :].split(".")[0] not in ALLOWED_TORCHBIND_NAMESPACES:
                    return qualified.removeprefix("__torch__.")
    return ""


def _readable(qualified_name: str) -> str:
    return MANGLE.sub("", qualified_name.removeprefix("__torch__."))


@dataclass
class _Checker:
    request: dict[str, Any]
    deadline: float


def serve() -> None:
    """The zygote: import torch once, then fork one checker per request line on stdin and answer
    each with one line when it has ended. Runs no archive's code itself."""
    # Answers go to a descriptor of their own: nothing printed by accident can garble them.
    answers = os.dup(1)
    os.dup2(2, 1)
    import torch

    torch.set_num_threads(1)
    checkers: dict[int, _Checker] = {}
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], POLL_S if checkers else None)
        if readable:
            data = os.read(0, 65536)
            if not data:  # the registry let the zygote go, or is gone itself
                for pid in checkers:
                    os.kill(pid, signal.SIGKILL)
                return
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _run_in_child(request)
                checkers[pid] = _Checker(request, time.monotonic() + request["timeout_s"])
        for pid, checker in list(checkers.items()):
            reply = _ended(pid, checker)
            if reply is not None:
                del checkers[pid]
                os.write(answers, json.dumps({"id": checker.request["id"], **reply}).encode() + b"\n")


def _ended(pid: int, checker: _Checker) -> dict[str, Any] | None:
    """A checker's answer once it has ended (stopped, if it ran past a limit); None while it runs."""
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        return {"returncode": os.waitstatus_to_exitcode(status)}
    failure = _overrun(pid, checker.deadline, checker.request["timeout_s"], checker.request["memory_cap"])
    if not failure:
        return None
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return {"failure": failure}


def _run_in_child(request: dict[str, Any]) -> NoReturn:
    """A forked checker: its own scratch folder and output files, nothing else of the zygote's."""
    code = 1
    try:
        scratch = request["scratch"]
        os.chdir(scratch)
        os.environ.clear()
        os.environ.update(_checker_environment(scratch))
        for fd, name in ((0, os.devnull), (1, "stdout"), (2, "stderr")):
            opened = os.open(name, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.dup2(opened, fd)
            os.close(opened)
        os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        _limit_resources()  # before any of the archive's code can run
        verdict = inspect_archive(request["path"])
        sys.stdout.flush()
        # One line, last: whatever the archive's code printed while loading came before it.
        os.write(1, b"\n" + json.dumps(verdict).encode() + b"\n")
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    serve()
