"""Operating the platform, against one throwaway stack of real processes:
- a bounded load: 20,000 Predict calls from 64 concurrent clients, zero errors;
- kill -9 of every service and of Triton under a load of Predict calls: no wrong answer, clients
  see only UNAVAILABLE (after the SDK's retries), acknowledged writes survive, the deployment
  comes back by itself;
- `maas admin backup` while serving, `maas admin restore` into an empty MAAS_HOME: the same
  models, keys and deployments come back;
- malformed messages to every public RPC through the gateway: proper status codes, no hang
  (last: it leaves stray tenants and models behind).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from maas import Client
from maas.errors import AlreadyExists, ApiError
from maas.gateway.v1 import admin_pb2  # noqa: F401
from maas.inference.v1 import inference_pb2, inference_pb2_grpc
from maas.registry.v1 import registry_pb2  # noqa: F401
from maas.tensors import from_tensor, to_tensor
from maas.trainer.v1 import trainer_pb2  # noqa: F401
from tritonclient.grpc import service_pb2  # noqa: F401  (registers inference.GRPCInferenceService)

from services.gateway.auth import INTERNAL_METHODS
from services.stack.ephemeral import EphemeralStack
from tests.support.digits import DigitsModel, deploy_digits

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@dataclass(repr=False)
class Platform:
    stack: EphemeralStack
    admin: Client
    acme: Client
    acme_key: str
    x: np.ndarray
    expected: np.ndarray


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, digits: DigitsModel) -> Iterator[Platform]:
    stack = EphemeralStack(home=tmp_path_factory.mktemp("ops") / "home").up()
    try:
        admin = Client(stack.gateway, stack.admin_key)
        acme, key = deploy_digits(stack.gateway, stack.admin_key, digits, max_batch_size=64)
        x = digits.test_x[:4]
        yield Platform(stack, admin, acme, key, x, digits.reference(x))
    finally:
        stack.down()


# --- load ------------------------------------------------------------------------------------
async def _load(address: str, key: str, x: np.ndarray, expected: np.ndarray, calls: int, clients: int) -> dict:
    request = inference_pb2.PredictRequest(deployment="digits", inputs=[to_tensor("x", x)])
    metadata = (("authorization", f"Bearer {key}"),)
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    wrong = 0
    remaining = iter(range(calls))

    async def client(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
        nonlocal wrong
        for _ in remaining:
            started = time.perf_counter()
            try:
                reply = await stub.Predict(request, metadata=metadata, timeout=30)
            except grpc.aio.AioRpcError as error:
                codes[error.code().name] += 1
                continue
            latencies.append(time.perf_counter() - started)
            logits = from_tensor(reply.outputs[0])
            codes["OK"] += 1
            wrong += not np.allclose(logits, expected, **TOLERANCE)

    # A few channels, as a pool of real clients would have: one HTTP/2 connection caps throughput.
    channels = [grpc.aio.insecure_channel(address) for _ in range(4)]
    try:
        stubs = [inference_pb2_grpc.InferenceServiceStub(c) for c in channels]
        started = time.perf_counter()
        await asyncio.gather(*(client(stubs[i % len(stubs)]) for i in range(clients)))
        elapsed = time.perf_counter() - started
    finally:
        for channel in channels:
            await channel.close()
    ordered = np.sort(latencies)
    return {
        "calls": calls, "clients": clients, "seconds": round(elapsed, 2), "per_second": round(calls / elapsed),
        "p50_ms": round(float(ordered[len(ordered) // 2]) * 1000, 2) if len(ordered) else None,
        "p99_ms": round(float(ordered[int(len(ordered) * 0.99)]) * 1000, 2) if len(ordered) else None,
        "codes": dict(codes), "wrong": wrong,
    }


def test_load_20000_predicts_from_64_clients_without_an_error(platform: Platform, tmp_path: Path) -> None:
    figures = asyncio.run(_load(platform.stack.gateway, platform.acme_key, platform.x, platform.expected,
                                calls=20_000, clients=64))
    log.warning("load figures: %s", json.dumps(figures))
    (Path(os.environ.get("MAAS_LOAD_FIGURES", tmp_path / "load.json"))).write_text(json.dumps(figures))
    assert figures["codes"] == {"OK": 20_000}
    assert figures["wrong"] == 0


# --- faults ----------------------------------------------------------------------------------
@dataclass
class Load:
    """SDK clients in threads calling Predict until stopped, tallying every outcome."""

    client: Client
    x: np.ndarray
    expected: np.ndarray
    stop: threading.Event = field(default_factory=threading.Event)
    outcomes: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                logits = self.client.predict("digits", {"x": self.x}, timeout=20)["logits"]
                outcome = "ok" if np.allclose(logits, self.expected, **TOLERANCE) else "WRONG"
            except ApiError as error:
                outcome = error.code.name
            with self.lock:
                self.outcomes[outcome] += 1


def _pids(stack: EphemeralStack) -> dict[str, int]:
    state = json.loads((stack.home / "run" / "stack.json").read_text())
    pids = {name: child["pid"] for name, child in state["children"].items()}
    found = subprocess.run(["pgrep", "-f", f"tritonserver.*{stack.home}"], capture_output=True, text=True, check=False)
    pids["triton"] = int(found.stdout.split()[0])
    return pids


def _eventually(action, timeout: float = 180):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except ApiError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _create_model(client: Client, name: str) -> None:
    """Create a model, or find it created: a try that failed as a process died may have landed."""
    try:
        client.create_model(name)
    except AlreadyExists:
        pass


def test_kill_9_each_process_under_load(platform: Platform) -> None:
    stack, acme = platform.stack, platform.acme
    load = Load(Client(stack.gateway, platform.acme_key), platform.x, platform.expected)
    threads = [threading.Thread(target=load.run, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    acknowledged: list[str] = []
    recovery: dict[str, float] = {}
    try:
        for victim in ("registry", "trainer", "inference", "triton", "gateway"):
            time.sleep(1.0)
            os.kill(_pids(stack)[victim], signal.SIGKILL)
            killed = time.monotonic()
            # A write acknowledged right after the kill must survive everything that follows.
            name = f"after-{victim}"
            _eventually(lambda: _create_model(acme, name))  # noqa: B023
            acknowledged.append(name)
            _eventually(lambda: acme.predict("digits", {"x": platform.x}, timeout=10))
            recovery[victim] = round(time.monotonic() - killed, 1)
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(timeout=60)
    log.warning("fault figures: recovery seconds %s, outcomes %s", recovery, dict(load.outcomes))
    assert load.outcomes["WRONG"] == 0
    assert set(load.outcomes) <= {"ok", "UNAVAILABLE"}, load.outcomes
    assert load.outcomes["ok"] > 0
    models = {m.name for m in _eventually(acme.list_models)}
    assert set(acknowledged) <= models
    assert _eventually(lambda: acme.get_deployment("digits")).state == inference_pb2.DEPLOYMENT_STATE_READY
    np.testing.assert_allclose(acme.predict("digits", {"x": platform.x})["logits"], platform.expected, **TOLERANCE)


# --- backup and restore ------------------------------------------------------------------------
def test_backup_while_serving_restores_into_an_empty_home(platform: Platform, digits: DigitsModel,
                                                          tmp_path: Path) -> None:
    stack, acme = platform.stack, platform.acme
    load = Load(Client(stack.gateway, platform.acme_key), platform.x, platform.expected)
    thread = threading.Thread(target=load.run, daemon=True)
    thread.start()
    try:
        backup = stack.maas("admin", "backup", str(tmp_path / "backup"))
    finally:
        load.stop.set()
        thread.join(timeout=60)
    assert "blob(s)" in backup.stdout
    assert load.outcomes["WRONG"] == 0 and load.outcomes["ok"] > 0
    models = sorted(m.name for m in acme.list_models())
    keys = sorted(k.id for k in platform.admin.list_api_keys("acme"))

    restored = EphemeralStack(home=tmp_path / "restored")
    # The backup holds no key-encryption key: restore waits until the operator puts it back.
    refused = restored.maas("admin", "restore", str(tmp_path / "backup"), check=False)
    assert refused.returncode != 0 and "put back the KEK file" in refused.stderr
    restored.home.joinpath("kek").write_bytes(stack.home.joinpath("kek").read_bytes())
    restored.home.joinpath("kek").chmod(0o600)
    result = restored.maas("admin", "restore", str(tmp_path / "backup"))
    assert "restored" in result.stdout
    again = restored.maas("admin", "restore", str(tmp_path / "backup"), check=False)
    assert again.returncode != 0 and "empty MAAS_HOME" in again.stderr
    with restored:
        # The same admin key file, the same developer key, the same models and deployment.
        assert restored.admin_key == stack.admin_key
        admin = Client(restored.gateway, restored.admin_key)
        assert sorted(k.id for k in admin.list_api_keys("acme")) == keys
        client = Client(restored.gateway, platform.acme_key)
        assert sorted(m.name for m in client.list_models()) == models
        client.wait_ready("digits", timeout=180)
        np.testing.assert_allclose(client.predict("digits", {"x": platform.x})["logits"], platform.expected,
                                   **TOLERANCE)
        target = tmp_path / "artifact.pt"
        client.download_version("digits", 1, target)
        assert target.read_bytes() == digits.path.read_bytes()


# --- malformed messages ---------------------------------------------------------------------
PUBLIC_SERVICES = (
    "maas.gateway.v1.AdminService", "maas.registry.v1.RegistryService", "maas.inference.v1.InferenceService",
    "maas.trainer.v1.TrainerService", "inference.GRPCInferenceService",
)
# What a well-formed but meaningless request may get back. INTERNAL, UNKNOWN or a timeout is a bug.
PROPER_CODES = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED,
}
# Answers decided by the key and the method alone, before the request body is read.
BEFORE_THE_BODY = {
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# Methods of those services that only MaaS services call: the gateway serves them to nobody.
METHODS = [
    method
    for name in PUBLIC_SERVICES
    for method in descriptor_pool.Default().FindServiceByName(name).methods
    if f"/{name}/{method.name}" not in INTERNAL_METHODS
]


@pytest.mark.parametrize("path", sorted(INTERNAL_METHODS))
def test_internal_methods_are_not_served_through_the_gateway(platform: Platform, raw_channel: grpc.Channel, path):
    metadata = (("authorization", f"Bearer {platform.stack.admin_key}"),)
    with pytest.raises(grpc.RpcError) as caught:
        raw_channel.unary_unary(path, request_serializer=None, response_deserializer=None)(
            b"", metadata=metadata, timeout=15
        )
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED


def _path(method) -> str:  # type: ignore[no-untyped-def]
    return f"/{method.containing_service.full_name}/{method.name}"


def _call(channel: grpc.Channel, method, payloads: list[bytes], metadata) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    identity = {"request_serializer": None, "response_deserializer": None}
    path = _path(method)
    try:
        if method.client_streaming and method.server_streaming:
            for _ in channel.stream_stream(path, **identity)(iter(payloads), metadata=metadata, timeout=15):
                pass
        elif method.client_streaming:
            channel.stream_unary(path, **identity)(iter(payloads), metadata=metadata, timeout=15)
        elif method.server_streaming:
            for _ in channel.unary_stream(path, **identity)(payloads[0], metadata=metadata, timeout=15):
                pass
        else:
            channel.unary_unary(path, **identity)(payloads[0], metadata=metadata, timeout=15)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def _parses(method, payload: bytes) -> bool:  # type: ignore[no-untyped-def]
    try:
        GetMessageClass(method.input_type).FromString(payload)
    except Exception:  # noqa: BLE001  (protobuf raises several kinds on bad bytes)
        return False
    return True


@st.composite
def messages(draw, descriptor, depth: int = 0) -> bytes:  # type: ignore[no-untyped-def]
    """A well-formed message of `descriptor` with arbitrary contents in arbitrary fields."""
    message = GetMessageClass(descriptor)()
    for fd in draw(st.lists(st.sampled_from(list(descriptor.fields)), max_size=6, unique_by=lambda f: f.name)) \
            if descriptor.fields else []:
        _fill(draw, message, fd, depth)
    return message.SerializeToString()


SCALARS = {
    "string": st.text(max_size=40) | st.sampled_from(["", "fuzz", "../x", "a" * 300]),
    "bytes": st.binary(max_size=64),
    "bool": st.booleans(),
    "int": st.integers(min_value=-(2**31), max_value=2**31 - 1),
    "float": st.floats(allow_nan=True, width=32),
}


def _scalar(draw, fd):  # type: ignore[no-untyped-def]
    type_name = {fd.TYPE_STRING: "string", fd.TYPE_BYTES: "bytes", fd.TYPE_BOOL: "bool", fd.TYPE_FLOAT: "float",
                 fd.TYPE_DOUBLE: "float"}.get(fd.type, "int")
    value = draw(SCALARS[type_name])
    if fd.type == fd.TYPE_ENUM:
        value = draw(st.sampled_from([v.number for v in list(fd.enum_type.values)]))
    elif fd.type in (fd.TYPE_UINT32, fd.TYPE_UINT64, fd.TYPE_FIXED32, fd.TYPE_FIXED64):
        value = abs(value)
    return value


def _fill(draw, message, fd, depth: int) -> None:  # type: ignore[no-untyped-def]
    repeated = fd.is_repeated
    if fd.type == fd.TYPE_MESSAGE:
        if depth >= 2 or fd.message_type.GetOptions().map_entry:
            return
        count = draw(st.integers(0, 2)) if repeated else 1
        for _ in range(count):
            payload = draw(messages(fd.message_type, depth + 1))
            target = getattr(message, fd.name).add() if repeated else getattr(message, fd.name)
            target.MergeFromString(payload)
        return
    if repeated:
        getattr(message, fd.name).extend(_scalar(draw, fd) for _ in range(draw(st.integers(0, 3))))
    else:
        setattr(message, fd.name, _scalar(draw, fd))


@pytest.fixture(scope="module")
def raw_channel(platform: Platform) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(platform.stack.gateway) as channel:
        yield channel


@pytest.mark.parametrize("method", METHODS, ids=_path)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          database=None)
@given(data=st.data())
def test_malformed_messages_get_proper_status_codes(platform: Platform, raw_channel: grpc.Channel, method,
                                                    data) -> None:  # type: ignore[no-untyped-def]
    well_formed = data.draw(st.booleans())
    count = data.draw(st.integers(1, 3)) if method.client_streaming else 1
    if well_formed:
        payloads = [data.draw(messages(method.input_type)) for _ in range(count)]
    else:
        payloads = [data.draw(st.binary(max_size=128)) for _ in range(count)]
    metadata = (("authorization", f"Bearer {data.draw(st.sampled_from([platform.stack.admin_key, platform.acme_key, 'maas_bogus']))}"),)
    code, details = _call(raw_channel, method, payloads, metadata)
    if not all(_parses(method, p) for p in payloads) and code not in BEFORE_THE_BODY:
        # Bytes that are not a message of this type: the caller's mistake, said as such (a
        # client-streaming call may end earlier, on what its first, well-formed, message said).
        allowed = PROPER_CODES if method.client_streaming and _parses(method, payloads[0]) else set()
        assert code is grpc.StatusCode.INVALID_ARGUMENT or code in allowed, (
            f"{_path(method)} answered {code.name}: {details!r} to undecodable {payloads!r}")
        return
    assert code in PROPER_CODES | {grpc.StatusCode.UNAUTHENTICATED}, (
        f"{_path(method)} answered {code.name}: {details!r} to {payloads!r}")
