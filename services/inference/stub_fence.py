"""The launcher Triton's python backend runs in place of its model stub: it fences the stub, then
becomes it.

The python backend starts one stub process per model instance, as
`triton_python_backend_stub <model dir>/<version>/model.py <shm region> <size> <growth> <parent pid>
<backend dir> ...`. TritonSupervisor installs this launcher under that name and the real stub
beside it (REAL_STUB). The launcher keeps only the environment the stub needs, confines the
process with Landlock (services/common/sandbox.py) to the model's own directory, the Python
runtime and its shared-memory region, and execs the real stub, which stays confined: a tenant's
model reads no secret, no database, no other model's files, and opens no connection.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from services.common import sandbox

LAUNCHER_NAME = "triton_python_backend_stub"
REAL_STUB = "triton_python_backend_stub.real"
# Set by the inference service in Triton's environment: "off" runs stubs unfenced.
FENCE_SETTING = "MAAS_MODEL_FENCE"
# What the stub needs of its environment; everything else (tokens, URLs, cloud credentials) goes.
KEPT_VARIABLES = ("PATH", "LD_LIBRARY_PATH", "LANG", "LC_ALL", "TZ")
KEPT_PREFIXES = ("CUDA_", "NVIDIA_", "OMP_", "MKL_", "OPENBLAS_", "TRITON_")


def stub_environment(environment: dict[str, str]) -> dict[str, str]:
    kept = {
        name: value
        for name, value in environment.items()
        if name in KEPT_VARIABLES or name.startswith(KEPT_PREFIXES)
    }
    kept["HOME"] = "/nonexistent"
    return kept


def fenced_paths(argv: list[str]) -> tuple[list[Path], list[Path]]:
    """(readable, writable) for the stub started with `argv` (the launcher's own argv)."""
    model_file, shm_region, backend_dir = Path(argv[1]), argv[2], Path(argv[6])
    # <repository>/<triton model>/<version>/model.py: the whole model directory, not the repository.
    model_dir = model_file.resolve().parent.parent
    readable = [model_dir, backend_dir.resolve(), *sandbox.python_runtime(), *map(Path, sandbox.SYSTEM_READABLE)]
    writable = [Path("/dev/shm") / shm_region, *map(Path, sandbox.DEVICES)]
    return readable, writable


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    real_stub = str(Path(argv[0]).resolve().parent / REAL_STUB)
    environment = stub_environment(dict(os.environ))
    # Triton also runs the stub with no arguments to probe it; there is no model to fence then.
    if len(argv) > 6 and os.environ.get(FENCE_SETTING, "required") != "off":
        readable, writable = fenced_paths(argv)
        try:
            sandbox.confine(readable, writable, devices=sandbox.gpu_devices())
        except sandbox.FenceUnavailable as error:
            # Fail closed: an unfenced model could read the platform's secrets.
            sys.stderr.write(f"maas: refusing to start the model stub: {error} (MAAS_MODEL_FENCE=off to allow)\n")
            sys.exit(1)
    os.execve(real_stub, [real_stub, *argv[1:]], environment)


if __name__ == "__main__":
    main()
