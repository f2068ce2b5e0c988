"""The parts of services.inference.triton that need no running Triton (the integration test
drives the real one): command line, environment, backend dir, error mapping, external watching."""

from __future__ import annotations

import asyncio
import sys
import sysconfig
from pathlib import Path

import grpc
import pytest

from services.common import errors
from services.inference import stub_fence
from services.inference.triton import (
    TritonLaunch,
    TritonStartError,
    TritonSupervisor,
    TritonTls,
    _clean,
    _infer_error,
)


class FakeClient:
    address = "triton.internal:8001"

    def __init__(self) -> None:
        self.live = True

    async def is_live(self, timeout: float = 1.0) -> bool:
        return self.live


def supervisor_arguments(
    tmp_path: Path, client=None, external: bool = False, events: list | None = None, start_timeout=2.0
) -> dict:
    events = [] if events is None else events

    async def started() -> None:
        events.append("start")

    async def exited() -> None:
        events.append("exit")

    return dict(
        launch=launch(tmp_path),
        client=client or FakeClient(),
        external=external,
        start_timeout=start_timeout,
        on_start=started,
        on_exit=exited,
    )


def launch(tmp_path: Path, **options) -> TritonLaunch:
    return TritonLaunch(directory=tmp_path, grpc_port=18001, http_port=18002, metrics_port=18003, **options)


def supervisor(tmp_path: Path, *positional, **arguments) -> TritonSupervisor:
    return TritonSupervisor(**supervisor_arguments(tmp_path, *positional, **arguments))


def test_command_binds_loopback_in_explicit_mode(tmp_path: Path):
    command = launch(tmp_path).command()
    assert command[0].endswith("/bin/tritonserver")
    for flag in (
        f"--model-repository={tmp_path / 'models'}",
        "--model-control-mode=explicit",
        f"--backend-directory={tmp_path / 'backends'}",
        "--grpc-address=127.0.0.1",
        "--grpc-port=18001",
        "--http-address=127.0.0.1",
        "--http-port=18002",
        "--metrics-address=127.0.0.1",
        "--metrics-port=18003",
        "--strict-readiness=true",
        # Our channels ping every 30 s; Triton must not answer that with GOAWAY too_many_pings.
        "--grpc-keepalive-permit-without-calls=true",
        "--grpc-http2-min-recv-ping-interval-without-data=15000",
        "--grpc-http2-max-ping-strikes=0",
    ):
        assert flag in command


def test_a_node_of_its_own_listens_on_every_address(tmp_path: Path):
    command = launch(tmp_path, listen_host="0.0.0.0").command()
    assert {"--grpc-address=0.0.0.0", "--http-address=0.0.0.0", "--metrics-address=0.0.0.0"} <= set(command)


def test_environment_puts_this_interpreter_first(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("LD_LIBRARY_PATH", "/somewhere/else")
    env = launch(tmp_path).environment()
    libraries = env["LD_LIBRARY_PATH"].split(":")
    assert libraries[0] == sysconfig.get_config_var("LIBDIR")
    assert libraries[1].endswith("nvidia_pytriton.libs") and libraries[-1] == "/somewhere/else"
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


def test_prepare_copies_the_python_backend_with_this_pythons_stub(tmp_path: Path):
    supervisor(tmp_path)._prepare()
    backend = tmp_path / "backends" / "python"
    names = {path.name for path in backend.iterdir()}
    assert names == {
        "libtriton_python.so",
        "triton_python_backend_utils.py",
        stub_fence.LAUNCHER_NAME,
        stub_fence.REAL_STUB,
    }
    assert (tmp_path / "models").is_dir()
    # The backend starts the fencing launcher by the stub's name; the real stub sits beside it.
    launcher = (backend / stub_fence.LAUNCHER_NAME).read_text()
    assert launcher.startswith(f"#!{sys.executable}\n") and "stub_fence import main" in launcher
    assert (backend / stub_fence.LAUNCHER_NAME).stat().st_mode & 0o111


def test_triton_gets_no_secret_of_the_service(monkeypatch, tmp_path: Path):
    for name, value in (("MAAS_INTERNAL_TOKEN", "internal"), ("MAAS_TRITON_TOKEN", "triton"),
                        ("MAAS_REDIS_URL", "redis://:pw@x"), ("AWS_SECRET_ACCESS_KEY", "aws")):
        monkeypatch.setenv(name, value)
    env = launch(tmp_path).environment()
    assert not {"MAAS_INTERNAL_TOKEN", "MAAS_TRITON_TOKEN", "MAAS_REDIS_URL", "AWS_SECRET_ACCESS_KEY"} & set(env)
    assert not any(value in ("internal", "triton", "aws") for value in env.values())
    assert env[stub_fence.FENCE_SETTING] == "required"


def test_every_protocol_but_health_needs_the_token(tmp_path: Path):
    command = launch(tmp_path, token="s3cret").command()
    grpc_flag = next(flag for flag in command if flag.startswith("--grpc-restricted-protocol="))
    http_flag = next(flag for flag in command if flag.startswith("--http-restricted-api="))
    for flag in (grpc_flag, http_flag):
        protocols, header = flag.split("=", 1)[1].split(":")
        assert "health" not in protocols.split(",")
        assert {"inference", "model-repository", "model-config", "metadata"} <= set(protocols.split(","))
        assert header == "maas-triton-token=s3cret"
    assert not any("restricted" in flag for flag in launch(tmp_path).command())


def test_tls_flags_serve_the_services_certificate(tmp_path: Path):
    tls = TritonTls(tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "clients.pem")
    command = launch(tmp_path, tls=tls).command()
    for flag in ("--grpc-use-ssl=true", f"--grpc-server-cert={tmp_path / 'cert.pem'}",
                 f"--grpc-server-key={tmp_path / 'key.pem'}", "--grpc-use-ssl-mutual=true",
                 f"--grpc-root-cert={tmp_path / 'clients.pem'}"):
        assert flag in command


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@pytest.mark.parametrize(
    "code, details, expected",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "unexpected shape for input 'x'", errors.InvalidArgument),
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", errors.Unavailable),
        (grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'm_1' is not found", errors.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", errors.DeadlineExceeded),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "too big", errors.ResourceExhausted),
        (grpc.StatusCode.INTERNAL, "stub crashed", RuntimeError),
    ],
)
def test_triton_statuses_become_domain_errors(code, details, expected):
    assert type(_infer_error(rpc_error(code, details))) is expected


def test_load_errors_lose_the_status_prefix_and_the_traceback():
    message = (
        "[StatusCode.INTERNAL] load failed for model 'm_1': version 1 is at UNAVAILABLE state: "
        "Internal: RuntimeError: not a zip archive\n\nAt:\n  /x/model.py(58): initialize\n"
    )
    assert _clean(message) == (
        "load failed for model 'm_1': version 1 is at UNAVAILABLE state: Internal: RuntimeError: not a zip archive"
    )


async def test_an_external_triton_is_watched_not_started(tmp_path: Path):
    client = FakeClient()
    events: list[str] = []
    watched = supervisor(tmp_path, client, external=True, events=events)
    watched.liveness_interval = 0.01
    await watched.start()
    assert events == ["start"] and not (tmp_path / "triton.pid").exists()
    client.live = False
    await asyncio.sleep(0.1)
    client.live = True
    await asyncio.sleep(0.1)
    await watched.stop()
    assert events == ["start", "exit", "start"]


async def test_an_external_triton_that_never_answers_fails_the_start(tmp_path: Path):
    client = FakeClient()
    client.live = False
    with pytest.raises(TritonStartError, match="was not live within 0 s"):
        await supervisor(tmp_path, client, external=True, start_timeout=0.2).start()
