"""README.md runs as written: its marked examples, in order, against a stack of their own.

A block whose fence follows a `<!-- readme-test -->` line is one of them. They run in one bash
session (so the tour's `export MAAS_API_KEY=...` holds for what follows) in an empty folder, with
the stack's MAAS_HOME and MAAS_GATEWAY_ADDR in the environment and the venv first on PATH;
python blocks run through the venv's python. A reader who follows the README does the same."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.stack.ephemeral import EphemeralStack

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- readme-test -->"
FENCE = re.compile(r"```(bash|python)\n(.*?)\n```", re.DOTALL)
# What the runnable examples must cover, so that none can silently drop out of the test.
COVERED = {
    "the tour": "maas predict digits",
    "the SDK": "client.predict(",
    "stock tritonclient": "tritonclient.grpc",
    "training": "maas train ",
    "training jobs": "maas jobs get",
    "optimization": "maas optimize digits",
    "comparing versions": "maas models compare digits",
    "a canary": "maas deploy canary",
    "a promotion": "maas deploy promote",
    "quotas": "maas admin quota set",
    "key limits": "maas admin key limit",
    "prices by tier": "maas billing price set requests",
    "invoices": "maas billing invoice",
}


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence in README.md
    language: str
    code: str


def runnable_blocks(text: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n")
        if before.endswith(MARKER):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append(Block(line, match.group(1), match.group(2)))
    return blocks


def script(blocks: list[Block]) -> str:
    """One bash script: each block announced by its README line, then run as written."""
    parts = ["set -euo pipefail"]
    for block in blocks:
        parts.append(f"echo '### README.md line {block.line} ({block.language})'")
        if block.language == "python":
            parts.append(f"python - <<'README_PYTHON'\n{block.code}\nREADME_PYTHON")
        else:
            parts.append(f"set -x\n{block.code}\nset +x")
    return "\n".join(parts) + "\n"


def test_the_runnable_examples_cover_what_the_readme_teaches() -> None:
    code = "\n".join(block.code for block in runnable_blocks(README.read_text()))
    missing = [topic for topic, needle in COVERED.items() if needle not in code]
    assert not missing, f"README.md has no runnable example ({MARKER}) of: {', '.join(missing)}"


@pytest.mark.slow
def test_the_readme_runs_as_written(tmp_path: Path) -> None:
    work = tmp_path / "reader"
    work.mkdir()
    (tmp_path / "tour.sh").write_text(script(runnable_blocks(README.read_text())))
    with EphemeralStack(home=tmp_path / "maas-home") as stack:
        env = dict(stack.env, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        result = subprocess.run(
            ["bash", str(tmp_path / "tour.sh")], cwd=work, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1500,
        )
        if result.returncode == 0:
            # A reader's first mistake, on what the tour deployed: the whole expected shape shows.
            reader = stack.maas("admin", "key", "create", "--tenant", "acme", "--role", "reader").stdout.strip()
            wrong = stack.maas("predict", "digits", "--inputs", '{"x": [0.1, 0.2, 0.3]}', check=False,
                               env=dict(stack.env, MAAS_API_KEY=reader))
    assert result.returncode == 0, f"README example failed (exit {result.returncode}):\n{result.stdout[-8000:]}"
    assert wrong.returncode == 1
    assert "INVALID_ARGUMENT" in wrong.stderr and "[batch, 64]" in wrong.stderr, wrong.stderr
