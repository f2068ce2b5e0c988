"""The operator allowlist for TorchScript uploads.

A TorchScript archive is code: each compiled function is a graph of operators, and some of them
reach outside the model (aten::from_file maps any file into a tensor, aten::save writes one, a
custom op from torch.ops.<namespace> runs whatever a library registered). Every function the
archive compiles is checked: each method of every module and class, hooks, and the free functions
they call, recursively into the blocks of control flow and into subgraphs.

The registry does not import torch. `check_operators(path)` runs this module as a short-lived
subprocess (`python -m services.registry.torchscript_ops PATH`) that loads the archive with torch,
walks its graphs and prints one JSON verdict as its last line. Loading runs the archive's
`__setstate__` methods, so the subprocess is given nothing worth taking: no MAAS_* or other
environment, an empty scratch working directory, no byte it may write to a file beyond its own
small output (RLIMIT_FSIZE), a CPU-time limit, a wall-clock timeout and a resident-memory cap the
parent enforces, and no exception text of the archive's making in what the caller is told.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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

# Limits of the checking subprocess. Importing torch alone takes ~2.5 s and ~250 MB here.
CHECK_TIMEOUT_S = 120.0
CHECK_CPU_SECONDS = 120
# Loading holds the archive's bytes and its tensors: room for both, above torch's own footprint.
CHECK_BASE_MEMORY_BYTES = 1024 * 1024 * 1024
CHECK_MEMORY_PER_ARTIFACT_BYTE = 3
# The subprocess's stdout and stderr go to files; nothing it writes to any file may exceed this.
CHECK_OUTPUT_BYTES = 1024 * 1024
POLL_S = 0.05


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


def _run_checker(path: Path, timeout_s: float) -> dict[str, Any]:
    memory_cap = CHECK_BASE_MEMORY_BYTES + CHECK_MEMORY_PER_ARTIFACT_BYTE * path.stat().st_size
    with tempfile.TemporaryDirectory(prefix="maas-operator-check-") as scratch:
        stdout_path, stderr_path = Path(scratch) / "stdout", Path(scratch) / "stderr"
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            process = subprocess.Popen(
                # -I: no PYTHON* variables, no user site, not the working directory on sys.path.
                [sys.executable, "-I", "-m", __name__, str(path.resolve())],
                cwd=scratch,
                env=_checker_environment(scratch),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
            failure = _wait(process, timeout_s, memory_cap)
        if failure:
            raise InvalidArgument(f"the TorchScript operator check was stopped: {failure}")
        output = stdout_path.read_bytes().decode("utf-8", "replace")
        diagnostics = stderr_path.read_bytes()[-2000:].decode("utf-8", "replace")
    if process.returncode != 0:
        log.warning("operator check of %s exited %s: %s", path.name, process.returncode, diagnostics)
        raise InvalidArgument(
            f"the TorchScript operator check could not finish (exit status {process.returncode}); "
            "save the model with torch.jit.save"
        )
    return _parse_verdict(output)


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
    # either breaks the import or bounds nothing; _wait caps the resident set instead.


def _wait(process: subprocess.Popen[bytes], timeout_s: float, memory_cap: int) -> str:
    """Wait for the checker; kill it and say why when it runs past the timeout or the memory cap."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            process.wait(timeout=POLL_S)
            return ""
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() > deadline:
            failure = f"loading the archive took longer than {timeout_s:g} s"
        elif (resident := _resident_bytes(process.pid)) > memory_cap:
            failure = f"loading the archive used more than {memory_cap // (1024 * 1024)} MiB ({resident} bytes)"
        else:
            continue
        process.kill()
        process.wait()
        return failure


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


def main() -> None:
    _limit_resources()  # before any of the archive's code can run
    verdict = inspect_archive(sys.argv[1])
    sys.stdout.flush()
    # One line, last: whatever the archive's code printed while loading came before it.
    os.write(1, b"\n" + json.dumps(verdict).encode() + b"\n")


if __name__ == "__main__":
    main()
