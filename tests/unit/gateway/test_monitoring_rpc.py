"""MonitoringService through the real gateway, in front of fakes of Triton (which echoes its input)
and of the registry (a baseline with the version): request ids returned to the caller, roles,
bad requests, sampled Predict and ModelInfer calls logged (coalesced ones each as its own),
feedback, drift on demand, and tenants kept apart."""

from __future__ import annotations

import asyncio
import json
import re

import grpc
import numpy as np
import pytest
from maas.common.v1 import common_pb2
from maas.gateway.v1 import admin_pb2, monitoring_pb2, monitoring_pb2_grpc
from maas.inference.v1 import inference_pb2
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common import summaries
from tests.unit.gateway.gateway_fakes import gateway_stack, serve

FP32 = common_pb2.DATA_TYPE_FP32
# The baseline's inputs: uniform on [0, 1); the fake Triton answers each input with itself, so the
# predicted class is the argmax of the input.
BASELINE_X = np.random.default_rng(0).random((2000, 4)).astype(np.float32)


class Registry(registry_pb2_grpc.RegistryServiceServicer):
    async def GetVersion(self, request, context):
        metadata = {
            summaries.BASELINE_KEY: summaries.baseline({"x": BASELINE_X}, BASELINE_X.argmax(1), classes=4).to_json(),
            "task": "classification",
        }
        version = registry_pb2.Version(
            model=request.model, version=request.version, metadata=metadata, metrics={"test_accuracy": 0.97}
        )
        return registry_pb2.GetVersionResponse(version=version)


@pytest.fixture
async def stack(tmp_path):
    registry, address = await serve((registry_pb2_grpc.add_RegistryServiceServicer_to_server, Registry()))
    try:
        async with gateway_stack(
            tmp_path, registry_addr=address, monitor_interval_seconds=0, monitor_flush_seconds=0.05
        ) as started:
            await started.wait_for_routes()
            yield started
    finally:
        await registry.stop(0)


def monitoring(stack) -> monitoring_pb2_grpc.MonitoringServiceStub:
    return monitoring_pb2_grpc.MonitoringServiceStub(stack.channel)


def predict_request(deployment: str, values: np.ndarray) -> inference_pb2.PredictRequest:
    values = values.astype(np.float32)
    tensor = common_pb2.Tensor(name="x", datatype=FP32, shape=values.shape, raw=values.tobytes())
    return inference_pb2.PredictRequest(deployment=deployment, inputs=[tensor])


def infer_request(deployment: str, values: np.ndarray) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=deployment)
    request.inputs.add(name="x", datatype="FP32", shape=values.shape)
    request.raw_input_contents.append(values.astype(np.float32).tobytes())
    return request


async def predict(stack, deployment: str, values: np.ndarray, request_id: str = "", who: str = "reader") -> str:
    """Predict, returning the request id the answer came with."""
    metadata = stack.auth(who) + ((("x-request-id", request_id),) if request_id else ())
    call = stack.inference_stub.Predict(predict_request(deployment, values), metadata=metadata)
    await call
    return dict(await call.trailing_metadata())["x-request-id"]


async def set_logging(stack, deployment: str, rate: float = 1.0, keep: bool = True, who: str = "developer"):
    wanted = monitoring_pb2.PredictionLogging(deployment=deployment, sample_rate=rate, keep_payloads=keep)
    request = monitoring_pb2.SetPredictionLoggingRequest(logging=wanted)
    return (await monitoring(stack).SetPredictionLogging(request, metadata=stack.auth(who))).logging


async def refused(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() == code, error.value.details()
    return error.value.details()


async def test_predict_and_model_infer_answer_with_their_request_id(stack):
    values = np.zeros((1, 4), np.float32)
    assert await predict(stack, "mlp", values, "caller-id-1") == "caller-id-1"
    assert re.fullmatch(r"[0-9a-f]{32}", await predict(stack, "mlp", values))  # the one the gateway assigned
    oip = service_pb2_grpc.GRPCInferenceServiceStub(stack.channel)
    metadata = (*stack.auth("reader"), ("x-request-id", "caller-id-2"))
    call = oip.ModelInfer(infer_request("mlp", values), metadata=metadata)
    await call
    assert dict(await call.trailing_metadata())["x-request-id"] == "caller-id-2"


async def test_logging_is_set_by_developers_and_read_by_any_role(stack):
    await refused(set_logging(stack, "mlp", who="reader"), grpc.StatusCode.PERMISSION_DENIED)
    assert (await set_logging(stack, "mlp", rate=0.25)).sample_rate == 0.25
    got = await monitoring(stack).GetPredictionLogging(
        monitoring_pb2.GetPredictionLoggingRequest(deployment="mlp"), metadata=stack.auth("reader")
    )
    assert got.logging.sample_rate == 0.25 and got.logging.keep_payloads
    assert got.logging.retention_days == 7 and got.logging.byte_budget_per_day == 64 * 1024 * 1024
    events = await stack.admin.ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(method="SetPredictionLogging"), metadata=stack.auth("admin")
    )
    assert [(e.resource, e.code) for e in events.audit_events] == [("mlp", "OK"), ("", "PERMISSION_DENIED")]


async def test_bad_requests_are_refused_with_what_to_fix(stack):
    details = await refused(set_logging(stack, "mlp", rate=2.0), grpc.StatusCode.INVALID_ARGUMENT)
    assert "outside [0, 1]" in details
    details = await refused(set_logging(stack, "mpl"), grpc.StatusCode.NOT_FOUND)
    assert details == "deployment 'mpl' not found; did you mean 'mlp'?"
    stub = monitoring(stack)
    too_many = monitoring_pb2.FeedbackRequest(
        deployment="mlp", labels=[monitoring_pb2.Label(request_id=f"r{i}", value=1) for i in range(10_001)]
    )
    assert "at most 10000" in await refused(
        stub.Feedback(too_many, metadata=stack.auth("developer")), grpc.StatusCode.INVALID_ARGUMENT
    )
    await refused(
        stub.ListPredictionSamples(
            monitoring_pb2.ListPredictionSamplesRequest(deployment="mlp", limit=5000), metadata=stack.auth("reader")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await refused(
        stub.GetDrift(monitoring_pb2.GetDriftRequest(deployment="nope"), metadata=stack.auth("reader")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_sampled_calls_are_logged_listed_and_take_feedback(stack):
    await set_logging(stack, "mlp")
    rows = {
        "a": [[0.9, 0.1, 0.1, 0.1]],
        "b": [[0.1, 0.1, 0.9, 0.1]],
        "c": [[0.1, 0.1, 0.1, 0.9]],
    }
    for request_id, values in rows.items():
        await predict(stack, "mlp", np.array(values), request_id)
    oip = service_pb2_grpc.GRPCInferenceServiceStub(stack.channel)
    await oip.ModelInfer(
        infer_request("mlp", np.array([[0.1, 0.9, 0.1, 0.1]])), metadata=(*stack.auth("reader"), ("x-request-id", "d"))
    )
    stub = monitoring(stack)
    listed = await stub.ListPredictionSamples(
        monitoring_pb2.ListPredictionSamplesRequest(deployment="mlp"), metadata=stack.auth("reader")
    )
    assert [s.request_id for s in listed.samples] == ["d", "c", "b", "a"]
    assert json.loads(listed.samples[3].inputs_json) == {"x": np.float32(rows["a"]).tolist()}
    assert json.loads(listed.samples[3].outputs_json) == {"y": np.float32(rows["a"]).tolist()}
    assert listed.samples[0].version == 1 and not listed.samples[0].HasField("label")
    labels = [("a", 0), ("b", 2), ("c", 1), ("d", 1), ("never-served", 3)]
    feedback = await stub.Feedback(
        monitoring_pb2.FeedbackRequest(
            deployment="mlp", labels=[monitoring_pb2.Label(request_id=i, value=v) for i, v in labels]
        ),
        metadata=stack.auth("developer"),
    )
    assert feedback.matched == 4 and list(feedback.unmatched_request_ids) == ["never-served"]
    drift = await stub.GetDrift(monitoring_pb2.GetDriftRequest(deployment="mlp"), metadata=stack.auth("reader"))
    assert drift.samples == 4 and drift.has_baseline and drift.version == 1
    assert (drift.live.labelled, drift.live.metric, drift.live.value) == (4, "accuracy", 0.75)
    assert drift.live.test_value == 0.97 and drift.threshold == 0.2
    listed = await stub.ListPredictionSamples(
        monitoring_pb2.ListPredictionSamplesRequest(deployment="mlp", limit=1), metadata=stack.auth("reader")
    )
    assert [(s.request_id, s.label) for s in listed.samples] == [("d", 1.0)]


async def test_drift_on_demand_is_low_in_distribution_and_crosses_the_threshold_when_shifted(stack):
    await set_logging(stack, "mlp", keep=False)
    await set_logging(stack, "broken", keep=False)  # its calls fail: nothing is logged
    rng = np.random.default_rng(1)
    for _ in range(40):
        await predict(stack, "mlp", rng.random((8, 4)))
    stub = monitoring(stack)
    drift = await stub.GetDrift(monitoring_pb2.GetDriftRequest(deployment="mlp"), metadata=stack.auth("reader"))
    assert drift.samples == 320 and not drift.drifted
    assert max(f.psi for f in drift.features) < 0.1 and drift.output_psi < 0.1
    assert [f.psi for f in drift.features] == sorted((f.psi for f in drift.features), reverse=True)
    assert len(drift.classes) == 4 and all(abs(c.window_share - 0.25) < 0.1 for c in drift.classes)
    for _ in range(40):
        await predict(stack, "mlp", rng.random((8, 4)) * 3)
    drift = await stub.GetDrift(monitoring_pb2.GetDriftRequest(deployment="mlp"), metadata=stack.auth("reader"))
    assert drift.drifted and drift.features[0].psi >= 0.2 and drift.samples == 640
    await refused(stack.inference_stub.Predict(predict_request("broken", np.zeros((1, 4))), metadata=stack.auth("reader")),
                  grpc.StatusCode.INTERNAL)
    broken = await stub.GetDrift(monitoring_pb2.GetDriftRequest(deployment="broken"), metadata=stack.auth("reader"))
    assert broken.samples == 0


async def test_a_tenant_never_sees_another_tenants_samples_or_drift(stack):
    await set_logging(stack, "cached")  # both tenants have a deployment named "cached"
    request_id = await predict(stack, "cached", np.ones((1, 4)), "acme-call")
    stub = monitoring(stack)
    theirs = stack.auth("other")
    await refused(stub.GetDrift(monitoring_pb2.GetDriftRequest(deployment="mlp"), metadata=theirs),
                  grpc.StatusCode.NOT_FOUND)
    await refused(
        stub.ListPredictionSamples(monitoring_pb2.ListPredictionSamplesRequest(deployment="mlp"), metadata=theirs),
        grpc.StatusCode.NOT_FOUND,
    )
    listed = await stub.ListPredictionSamples(
        monitoring_pb2.ListPredictionSamplesRequest(deployment="cached"), metadata=theirs
    )
    assert list(listed.samples) == []
    drift = await stub.GetDrift(monitoring_pb2.GetDriftRequest(deployment="cached"), metadata=theirs)
    assert drift.samples == 0
    feedback = await stub.Feedback(
        monitoring_pb2.FeedbackRequest(deployment="cached", labels=[monitoring_pb2.Label(request_id=request_id)]),
        metadata=theirs,
    )
    assert feedback.matched == 0 and list(feedback.unmatched_request_ids) == [request_id]
    got = await stub.GetPredictionLogging(monitoring_pb2.GetPredictionLoggingRequest(deployment="cached"), metadata=theirs)
    assert got.logging.sample_rate == 0.0
    mine = await stub.ListPredictionSamples(
        monitoring_pb2.ListPredictionSamplesRequest(deployment="cached"), metadata=stack.auth("reader")
    )
    assert [s.request_id for s in mine.samples] == ["acme-call"]


async def test_coalesced_calls_are_each_logged_as_their_own_call(stack):
    await set_logging(stack, "mlp")
    stack.triton.delay = 0.05  # calls queue behind the first one and go to Triton together
    values = {f"call-{i}": np.full((1, 4), i, np.float32) for i in range(8)}
    await asyncio.gather(*(predict(stack, "mlp", x, request_id) for request_id, x in values.items()))
    assert len(stack.triton.requests) < len(values)  # some were joined
    listed = await monitoring(stack).ListPredictionSamples(
        monitoring_pb2.ListPredictionSamplesRequest(deployment="mlp"), metadata=stack.auth("reader")
    )
    logged = {s.request_id: json.loads(s.outputs_json)["y"] for s in listed.samples}
    assert logged == {request_id: x.tolist() for request_id, x in values.items()}
