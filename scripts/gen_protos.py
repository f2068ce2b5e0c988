"""Generate the SDK's Python stubs from protos/ (run by `make protos`).

With --check, generate into a scratch folder and fail if the checked-in stubs differ.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
SDK = ROOT / "sdk"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out: Path) -> None:
    # protoc finds the mypy plugins by name on PATH; they live beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Every folder on the way down is a package, so `import maas.registry.v1.registry_pb2` works.
    for proto in files:
        folder = out / Path(proto).parent
        while folder != out:
            (folder / "__init__.py").touch()
            folder = folder.parent


def generated_files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.name.endswith(GENERATED_SUFFIXES)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if checked-in stubs drift")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as scratch:
        if not check:
            # Generate aside first: a proto that fails to compile leaves the SDK as it was.
            generate(Path(scratch))
            for stale in generated_files(SDK):
                (SDK / stale).unlink()
            packages = {p.relative_to(scratch) for p in Path(scratch).rglob("__init__.py")}
            for fresh in sorted(generated_files(Path(scratch)) | packages):
                target = SDK / fresh
                target.parent.mkdir(parents=True, exist_ok=True)
                if fresh.name != "__init__.py" or not target.exists():
                    shutil.copyfile(Path(scratch) / fresh, target)
            return 0
        fresh = Path(scratch)
        generate(fresh)
        want, have = generated_files(fresh), generated_files(SDK)
        drift = sorted(str(p) for p in want ^ have)
        drift += sorted(str(p) for p in want & have if not filecmp.cmp(fresh / p, SDK / p, shallow=False))
    if drift:
        print("stubs drift from protos/ (run `make protos`):", *drift, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
