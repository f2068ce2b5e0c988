"""The checked-in stubs match protos/, and the protos pass buf's STANDARD lint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"


def test_stubs_do_not_drift_from_protos() -> None:
    result = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_buf_lint_and_format() -> None:
    if not BUF.exists():
        if os.environ.get("CI"):
            pytest.fail("buf is missing: scripts/install-system-deps.sh installs it into .tools/")
        pytest.skip("buf not installed (run `make install`)")
    for command in ([str(BUF), "lint"], [str(BUF), "format", "--exit-code"]):
        result = subprocess.run(command, cwd=ROOT / "protos", capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
