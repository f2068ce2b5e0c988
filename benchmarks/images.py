"""Image sizes and the cold build time: removes every maas/* image and the build cache, runs
deploy/docker/build.sh once from nothing (debootstrap included), and records each step's seconds
and each image's size in BENCHMARKS.md. Needs a Docker engine (scripts/install-docker.sh).

    python -m benchmarks.images
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.run import add_section, machine

REPO = Path(__file__).resolve().parents[1]


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout


def main() -> None:
    subprocess.run([str(REPO / "scripts/install-docker.sh")], check=True)
    images = [line for line in docker("image", "ls", "--format", "{{.Repository}}:{{.Tag}}").split() if line.startswith("maas/")]
    if images:
        docker("image", "rm", "-f", *images)
    docker("builder", "prune", "-af")
    started = time.monotonic()
    subprocess.run([str(REPO / "deploy/docker/build.sh")], check=True, cwd=REPO,
                   env=dict(os.environ, MAAS_PYTHON=sys.executable, MAAS_REBUILD_DEBIAN="1"))
    total = time.monotonic() - started
    steps = [line.split("\t") for line in (REPO / ".build/build-times.tsv").read_text().splitlines()]
    rows = []
    for line in docker("image", "ls", "--format", "{{json .}}").splitlines():
        image = json.loads(line)
        if image["Repository"].startswith("maas/"):
            size = json.loads(docker("image", "inspect", image["ID"]))[0]["Size"]
            rows.append((f"{image['Repository']}:{image['Tag']}", size))
    section = [
        f"## Container images, cold build — {datetime.date.today().isoformat()}",
        "",
        f"Machine: {machine()}. `deploy/docker/build.sh` from nothing: no maas image, no build cache,",
        "the Debian base debootstrapped again; the wheelhouse comes from this machine's pip cache.",
        "Sizes are each image's own total (the service images share maas/base's layers: pulling all",
        "of them costs maas/base once, plus a few KB each).",
        "",
        "| step | seconds |",
        "|---|---:|",
        *(f"| {name} | {seconds} |" for name, seconds in steps),
        f"| **total** | **{total:.0f}** |",
        "",
        "| image | size (MB) |",
        "|---|---:|",
        *(f"| {name} | {size / 1e6:,.0f} |" for name, size in sorted(rows)),
        "",
    ]
    add_section(REPO / "BENCHMARKS.md", "\n".join(section))
    print("\n".join(section))


if __name__ == "__main__":
    main()
