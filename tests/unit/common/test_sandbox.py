"""The Landlock fence (services/common/sandbox.py) in a child process: what it may read, what it
may not, and that it opens no TCP connection."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from services.common import sandbox
from services.inference import stub_fence

pytestmark = pytest.mark.skipif(not sandbox.available(), reason="this kernel has no Landlock")


def run_confined(readable: list[Path], code: str) -> str:
    """Run `code` in a child that fences itself first; returns what it prints."""
    script = textwrap.dedent(f"""
        from pathlib import Path
        from services.common import sandbox
        sandbox.confine([*map(Path, {[str(p) for p in readable]!r}), *sandbox.python_runtime(),
                         *map(Path, sandbox.SYSTEM_READABLE)])
    """) + textwrap.dedent(code)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[3])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_fenced_process_reads_its_own_files_and_nothing_beside_them(tmp_path: Path):
    mine, secret = tmp_path / "model", tmp_path / "admin.key"
    mine.mkdir()
    (mine / "model.pt").write_text("weights")
    secret.write_text("the platform's key")
    printed = run_confined([mine], f"""
        print(Path({str(mine / 'model.pt')!r}).read_text())
        for path in ({str(secret)!r}, "/proc/1/environ"):
            try:
                print(open(path).read())
            except PermissionError:
                print("denied")
    """)
    assert printed.splitlines() == ["weights", "denied", "denied"]


def test_a_fenced_process_connects_nowhere(tmp_path: Path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        printed = run_confined([], f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=5)
                print("connected")
            except PermissionError:
                print("denied")
        """)
    assert printed == "denied"


def test_the_stub_keeps_no_secret_variable_and_fences_its_own_model_directory(tmp_path: Path):
    environment = stub_fence.stub_environment({
        "PATH": "/usr/bin", "MAAS_INTERNAL_TOKEN": "t", "MAAS_TRITON_TOKEN": "t", "AWS_SECRET_ACCESS_KEY": "k",
        "LD_LIBRARY_PATH": "/lib", "CUDA_VISIBLE_DEVICES": "0", "HOME": "/root",
    })
    assert environment == {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/lib", "CUDA_VISIBLE_DEVICES": "0",
                           "HOME": "/nonexistent"}
    model = tmp_path / "models" / "m_abc" / "1" / "model.py"
    argv = ["stub", str(model), "region_1", "1048576", "1048576", "42", str(tmp_path / "backends"), "336", "m_abc_0"]
    readable, writable = stub_fence.fenced_paths(argv)
    assert model.parent.parent in readable and tmp_path / "models" not in readable
    assert Path("/dev/shm/region_1") in writable and Path("/dev/shm") not in writable
