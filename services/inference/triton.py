"""NVIDIA Triton: the calls the service makes to it, and the supervisor of the tritonserver process.

The binary, the python backend and its stub come from the nvidia-pytriton wheel. Triton listens
on loopback only, and every protocol but health needs the secret header of TRITON_TOKEN_KEY: its
repository API loads python models, i.e. runs code, so only this service (and the gateway, for
inference) may reach it. Triton runs with no secret in its environment, in a directory holding
nothing but models, and each model's stub runs inside the Landlock fence of stub_fence.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import sysconfig
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import pytriton
from google.protobuf import json_format, text_format
from prometheus_client import Counter
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from services.common import errors
from services.common.channels import KEEPALIVE, TRITON_TOKEN_KEY, open_channel, triton_metadata
from services.common.remote_errors import domain_error
from services.common.serving import execution_limit_error
from services.inference import stub_fence

log = logging.getLogger(__name__)

WHEEL_DIR = Path(pytriton.__file__).parent / "tritonserver"
BINARY = WHEEL_DIR / "bin" / "tritonserver"
RESTARTS = Counter("maas_inference_triton_restarts_total", "Times tritonserver exited and was started again")
# Everything but health (liveness probes stay open) needs the header.
RESTRICTED_PROTOCOLS = "metadata,inference,shared-memory,model-config,model-repository,statistics,trace,logging"
# What tritonserver keeps of the service's environment: nothing secret (tokens, database URLs).
TRITON_ENVIRONMENT = ("PATH", "LD_LIBRARY_PATH", "LANG", "LC_ALL", "TZ")
TRITON_ENVIRONMENT_PREFIXES = ("CUDA_", "NVIDIA_", "OMP_")


class Triton(Protocol):
    """What the deployments need of a Triton server (TritonClient; a fake in unit tests)."""

    address: str

    async def load(self, triton_model: str, timeout: float) -> None: ...
    async def is_live(self, timeout: float = 1.0) -> bool: ...
    async def unload(self, triton_model: str) -> None: ...
    async def is_ready(self, triton_model: str) -> bool: ...
    async def loaded_models(self) -> set[str]: ...
    async def request_counts(self, triton_model: str) -> tuple[int, int]: ...
    async def statistics(self, triton_model: str) -> list[service_pb2.ModelStatistics]: ...
    async def infer(
        self, request: service_pb2.ModelInferRequest, timeout: float
    ) -> service_pb2.ModelInferResponse: ...
    def stream(
        self, request: service_pb2.ModelInferRequest, timeout: float
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]: ...


class ModelLoadError(Exception):
    """Triton refused to load a model; the message is Triton's reason."""


class TritonStartError(Exception):
    """tritonserver did not come up; the message carries the end of its log."""


@dataclass(frozen=True)
class TritonTls:
    """The certificate our own tritonserver serves gRPC with; client_ca_file set: mutual TLS."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


class TritonClient:
    """The calls the service makes to one Triton gRPC endpoint, over long-lived channels.

    With `ships_from` set (a Triton on another host), a load sends the model's directory from
    that local repository in the request: Triton writes the files to a folder of its own, so no
    volume is shared with it (benchmarks/model_transport.py measured the three ways)."""

    def __init__(
        self,
        address: str,
        token: str = "",
        credentials: grpc.ChannelCredentials | None = None,
        ships_from: Path | None = None,
    ) -> None:
        self.address = address
        self.ships_from = ships_from
        self._metadata = triton_metadata(token)
        self._headers = dict(self._metadata)
        # Repository and health calls through tritonclient; inference on a raw stub (the hot path).
        self._control = InferenceServerClient(address, creds=credentials)
        self._channel = open_channel(address, credentials)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def is_live(self, timeout: float = 1.0) -> bool:
        try:
            return bool(await self._control.is_server_live(client_timeout=timeout))
        except InferenceServerException:
            return False

    async def load(self, triton_model: str, timeout: float) -> None:
        """Load (or reload) a model from the repository; returns once it is ready."""
        shipped = {}
        if self.ships_from is not None:
            shipped = await asyncio.to_thread(_shipped_model, self.ships_from / triton_model)
        try:
            await self._control.load_model(triton_model, client_timeout=timeout, headers=self._headers, **shipped)
        except InferenceServerException as exc:
            raise ModelLoadError(_clean(exc.message())) from None

    async def unload(self, triton_model: str) -> None:
        """Start unloading; Triton finishes it in the background."""
        with contextlib.suppress(InferenceServerException):
            await self._control.unload_model(triton_model, client_timeout=30, headers=self._headers)

    async def is_ready(self, triton_model: str) -> bool:
        try:
            return bool(await self._control.is_model_ready(triton_model, client_timeout=5, headers=self._headers))
        except InferenceServerException:
            return False

    async def loaded_models(self) -> set[str]:
        """Models Triton has loaded or is loading."""
        index = await self._control.get_model_repository_index(client_timeout=10, headers=self._headers)
        return {model.name for model in index.models if model.state in ("READY", "LOADING")}

    async def request_counts(self, triton_model: str) -> tuple[int, int]:
        """(succeeded, failed) inference requests since the model was loaded."""
        stats = [model.inference_stats for model in await self.statistics(triton_model)]
        return sum(s.success.count for s in stats), sum(s.fail.count for s in stats)

    async def statistics(self, triton_model: str) -> list[service_pb2.ModelStatistics]:
        """Triton's cumulative statistics of each loaded version of a model; none if it is not loaded."""
        try:
            response = await self._control.get_inference_statistics(triton_model, client_timeout=5, headers=self._headers)
        except InferenceServerException:
            return []
        return list(response.model_stats)

    async def infer(
        self, request: service_pb2.ModelInferRequest, timeout: float
    ) -> service_pb2.ModelInferResponse:
        try:
            return await self._stub.ModelInfer(request, timeout=timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _infer_error(exc) from None

    async def stream(
        self, request: service_pb2.ModelInferRequest, timeout: float
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        """The responses of a decoupled model to one request; leaving early cancels the call,
        which stops the model at its next response."""
        call = self._stub.ModelStreamInfer(timeout=timeout, metadata=self._metadata)
        try:
            await call.write(request)
            await call.done_writing()
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            raise _infer_error(exc) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._control.close()
        await self._channel.close()


def _shipped_model(model_dir: Path) -> dict:
    """load_model's arguments that carry a model directory in the request: the config as JSON,
    every other file as `file:<path in the directory>`."""
    try:
        config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    except OSError:
        raise ModelLoadError("the model's directory is missing on the inference service") from None
    files = {
        f"file:{path.relative_to(model_dir)}": path.read_bytes()
        for path in sorted(model_dir.rglob("*"))
        if path.is_file() and path.name != "config.pbtxt"
    }
    return {"config": json_format.MessageToJson(config), "files": files}


def _infer_error(error: grpc.aio.AioRpcError) -> Exception:
    """Triton's answer to ModelInfer as the domain error the caller should see."""
    details = error.details() or ""
    if error.code() is grpc.StatusCode.UNAVAILABLE or "unknown model" in details or "is not ready" in details:
        # Triton is restarting, or reloading the model after a restart: retrying will succeed.
        return errors.Unavailable(
            f"the model server is not ready for this deployment ({details}); retry shortly"
        )
    if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.DeadlineExceeded("the model did not answer within the deadline")
    return execution_limit_error(details) or domain_error("Triton", error)


def _clean(message: str) -> str:
    """Triton's load error without the status prefix and the Python traceback."""
    message = message.split("\n\nAt:")[0].strip()
    if message.startswith("[StatusCode."):
        message = message.split("] ", 1)[-1]
    return message[:2000]


@dataclass(frozen=True)
class TritonLaunch:
    """How one tritonserver starts: its directory (models and backends), where it listens and what
    it lets in. The supervisor runs it under the inference service; a node container or pod runs it
    on its own (services/inference/node.py)."""

    directory: Path
    grpc_port: int
    http_port: int
    metrics_port: int
    # Loopback under the service; a node of its own listens on its pod's or container's addresses.
    listen_host: str = "127.0.0.1"
    token: str = ""
    fence_models: bool = True
    tls: TritonTls | None = None

    @property
    def model_repository(self) -> Path:
        return self.directory / "models"

    @property
    def backend_dir(self) -> Path:
        return self.directory / "backends"

    def prepare(self) -> None:
        """The python backend from the wheel, with the stub built for this interpreter."""
        python_dir = self.backend_dir / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = WHEEL_DIR / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():
            raise TritonStartError(
                f"the nvidia-pytriton wheel ships no python backend stub for Python {version}"
            )
        wheel_backend = WHEEL_DIR / "backends" / "python"
        for source, name in (
            (wheel_backend / "libtriton_python.so", "libtriton_python.so"),
            (wheel_backend / "triton_python_backend_utils.py", "triton_python_backend_utils.py"),
            (stub, stub_fence.REAL_STUB),
        ):
            target = python_dir / name
            if not target.exists() or target.stat().st_size != source.stat().st_size:
                shutil.copyfile(source, target)
                target.chmod(0o700)
        # The backend starts the stub by this name: the launcher that fences it and then execs it.
        launcher = python_dir / stub_fence.LAUNCHER_NAME
        launcher.write_text(f"#!{sys.executable}\nfrom services.inference.stub_fence import main\n\nmain()\n")
        launcher.chmod(0o700)
        self.model_repository.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        command = [
            str(BINARY),
            f"--model-repository={self.model_repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={self.backend_dir}",
            f"--grpc-address={self.listen_host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.listen_host}",
            f"--http-port={self.http_port}",
            "--allow-metrics=true",
            f"--metrics-address={self.listen_host}",
            f"--metrics-port={self.metrics_port}",
            "--strict-readiness=true",
            "--exit-timeout-secs=5",
            *KEEPALIVE.triton_flags(),
        ]
        if self.tls is not None:
            command += [
                "--grpc-use-ssl=true",
                f"--grpc-server-cert={self.tls.cert_file}",
                f"--grpc-server-key={self.tls.key_file}",
            ]
            if self.tls.client_ca_file is not None:
                command += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={self.tls.client_ca_file}"]
        if self.token:
            restriction = f"{RESTRICTED_PROTOCOLS}:{TRITON_TOKEN_KEY}={self.token}"
            command += [f"--grpc-restricted-protocol={restriction}", f"--http-restricted-api={restriction}"]
        return command

    def environment(self) -> dict[str, str]:
        env = {
            name: value
            for name, value in os.environ.items()
            if name in TRITON_ENVIRONMENT or name.startswith(TRITON_ENVIRONMENT_PREFIXES)
        }
        env["HOME"] = str(self.model_repository)
        env[stub_fence.FENCE_SETTING] = "required" if self.fence_models else "off"
        # The stub links libpython: this interpreter's own copy must win over any system one.
        libraries = [
            sysconfig.get_config_var("LIBDIR"),
            str(WHEEL_DIR.parent.parent / "nvidia_pytriton.libs"),
        ]
        if env.get("LD_LIBRARY_PATH"):
            libraries.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libraries)
        # The stub finds its site-packages (torch, onnxruntime) through `python` on PATH.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env


class TritonSupervisor:
    """Runs tritonserver and keeps it running, or watches an external Triton's liveness.

    After every (re)start it awaits `on_start` so that the service reloads its deployments;
    when Triton goes away it awaits `on_exit` so that routes stop pointing at it.
    """

    # How often an external Triton's liveness is checked, and how long one check may take:
    # together under 2 s, the most a dead node may keep its replicas in the routes.
    liveness_interval = 0.5
    liveness_timeout = 1.0

    def __init__(
        self,
        *,
        launch: TritonLaunch,
        client: TritonClient,
        external: bool,
        start_timeout: float,
        on_start: Callable[[], Awaitable[None]],
        on_exit: Callable[[], Awaitable[None]],
    ) -> None:
        self.launch = launch
        self.client = client
        self.external = external
        self.start_timeout = start_timeout
        self.on_start = on_start
        self.on_exit = on_exit
        self.model_repository = launch.model_repository
        self.log_path = launch.directory / "triton.log"
        self.pid_path = launch.directory / "triton.pid"
        self._process: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task | None = None

    async def start(self) -> None:
        """Bring Triton up (or wait for the external one), run on_start, then keep watching."""
        started = time.perf_counter()
        if self.external:
            await self._wait_live(deadline=time.monotonic() + self.start_timeout)
        else:
            await asyncio.to_thread(self._prepare)
            await self._spawn()
        log.info(
            "triton up",
            extra={"address": self.client.address, "seconds": round(time.perf_counter() - started, 2)},
        )
        await self._notify(self.on_start)
        self._watcher = asyncio.create_task(
            self._watch_external() if self.external else self._watch_process()
        )

    async def stop(self) -> None:
        if self._watcher:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._process and self._process.returncode is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._process.wait(), timeout=15)
            except TimeoutError:
                log.warning("tritonserver ignored SIGTERM; killing it")
                self._process.kill()
                await self._process.wait()
        if self._process:
            _kill_group(self._process.pid)
        self.pid_path.unlink(missing_ok=True)

    def _prepare(self) -> None:
        self.launch.prepare()
        self._kill_leftover()

    def _kill_leftover(self) -> None:
        """A tritonserver left behind by a service that died without stopping it holds our ports."""
        try:
            pid = int(self.pid_path.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"tritonserver" in cmdline and str(self.model_repository).encode() in cmdline:
            log.warning("killing a tritonserver left over from an earlier run", extra={"pid": pid})
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.05)

    async def _spawn(self) -> None:
        with open(self.log_path, "ab") as log_file:
            log_file.write(f"\n==== starting tritonserver at {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            log_file.flush()
            # Its own session: a Ctrl-C meant for the service must not kill Triton behind our back.
            self._process = await asyncio.create_subprocess_exec(
                *self.launch.command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=self.launch.environment(),
                # Nothing but models where Triton and its stubs run: no MAAS_HOME, no secrets.
                cwd=self.model_repository,
                start_new_session=True,
            )
        self.pid_path.write_text(str(self._process.pid))
        try:
            await self._wait_live(deadline=time.monotonic() + self.start_timeout)
        except TritonStartError:
            if self._process.returncode is None:
                self._process.kill()
                await self._process.wait()
            raise

    async def _wait_live(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self._process and self._process.returncode is not None:
                raise TritonStartError(
                    f"tritonserver exited with status {self._process.returncode}: {self._log_tail()}"
                )
            if await self.client.is_live(timeout=1.0):
                return
            await asyncio.sleep(0.1)
        raise TritonStartError(
            f"Triton at {self.client.address} was not live within {self.start_timeout:.0f} s"
        )

    async def _watch_process(self) -> None:
        delay = 0.5
        while True:
            assert self._process is not None
            up_since = time.monotonic()
            status = await self._process.wait()
            _kill_group(self._process.pid)
            log.error(
                "tritonserver exited; restarting it", extra={"status": status, "log_tail": self._log_tail()}
            )
            await self._notify(self.on_exit)
            if time.monotonic() - up_since > 60:
                delay = 0.5  # it ran well for a while: this is a fresh failure, not a crash loop
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                try:
                    await self._spawn()
                    break
                except (TritonStartError, OSError) as exc:
                    log.error("tritonserver restart failed", extra={"error": str(exc)})
            RESTARTS.inc()
            log.info("tritonserver restarted", extra={"pid": self._process.pid})
            await self._notify(self.on_start)

    async def _watch_external(self) -> None:
        live = True
        while True:
            await asyncio.sleep(self.liveness_interval)
            now_live = await self.client.is_live(timeout=self.liveness_timeout)
            if live and not now_live:
                log.error("external Triton is not live", extra={"address": self.client.address})
                await self._notify(self.on_exit)
            elif now_live and not live:
                log.info("external Triton is live again", extra={"address": self.client.address})
                await self._notify(self.on_start)
            live = now_live

    @staticmethod
    async def _notify(callback: Callable[[], Awaitable[None]]) -> None:
        try:
            await callback()
        except Exception:
            log.exception("Triton lifecycle callback failed")

    def _log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - 8192))
                return "\n".join(handle.read().decode(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _kill_group(pid: int) -> None:
    """Kill what is left of a tritonserver's process group (it leads its own session): a model's
    python stub that outlived a killed server would hold its memory and cores for good."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
