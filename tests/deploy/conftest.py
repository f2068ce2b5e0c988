"""Tools the deployment tests need: helm (installed into .tools/bin by scripts/install-system-deps.sh)
and PyYAML. Missing ones skip the tests locally and fail them under CI."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing; CI must run the deployment tests (run scripts/install-system-deps.sh)")
    pytest.skip(f"{what} is missing (scripts/install-system-deps.sh installs it)")


@pytest.fixture(scope="session")
def helm() -> str:
    found = shutil.which("helm", path=str(REPO / ".tools" / "bin")) or shutil.which("helm")
    if not found:
        missing("helm")
    return found  # type: ignore[return-value]


@pytest.fixture(scope="session")
def yaml():  # type: ignore[no-untyped-def]
    try:
        import yaml as module
    except ImportError:
        missing("PyYAML")
    return module


@pytest.fixture(scope="module")
def charts(helm: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/ with every chart's file:// dependencies vendored (offline)."""
    deploy = tmp_path_factory.mktemp("deploy") / "deploy"
    shutil.copytree(REPO / "deploy", deploy, symlinks=True, ignore=shutil.ignore_patterns("charts", "Chart.lock"))
    subprocess.run([str(deploy / "helm" / "build-deps.sh")], env={"HELM": helm, "PATH": "/usr/bin:/bin"},
                   check=True, capture_output=True)
    return deploy / "helm"
