"""The data path: Predict and the Open Inference Protocol straight to (a fake) Triton, with
routes from the inference service's WatchRoutes stream."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from maas.common.v1 import common_pb2
from maas.inference.v1 import inference_pb2
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.unit.gateway.gateway_fakes import TOKEN, gateway_stack, route

FP32 = common_pb2.DATA_TYPE_FP32


@pytest.fixture
async def stack(tmp_path):
    async with gateway_stack(tmp_path) as started:
        await started.wait_for_routes()
        yield started


def predict_request(deployment: str, values: np.ndarray, datatype: int = FP32):
    tensor = common_pb2.Tensor(name="x", datatype=datatype, shape=values.shape, raw=values.tobytes())
    return inference_pb2.PredictRequest(deployment=deployment, inputs=[tensor])


async def expect_error(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() == code, error.value.details()
    return error.value.details()


async def test_predict_goes_straight_to_triton_with_tensors_untouched(stack):
    values = np.arange(8, dtype=np.float32).reshape(2, 4)
    request = predict_request("mlp", values)
    response = await stack.inference_stub.Predict(request, metadata=stack.auth("reader"))
    sent = stack.triton.requests[-1]
    assert sent.model_name == "acme--mlp--1"
    assert sent.raw_input_contents[0] == values.tobytes()
    assert list(sent.inputs[0].shape) == [2, 4] and sent.inputs[0].datatype == "FP32"
    assert response.model == "digits" and response.version == 1
    assert response.outputs[0].name == "y" and response.outputs[0].datatype == FP32
    assert np.frombuffer(response.outputs[0].raw, np.float32).tolist() == values.ravel().tolist()
    assert stack.inference.predicts == []  # the inference service was not on the path
    assert stack.routing.metadata[0]["x-maas-internal-token"] == TOKEN


async def test_predict_is_scoped_to_the_callers_tenant(stack):
    values = np.zeros((1, 4), np.float32)
    details = await expect_error(
        stack.inference_stub.Predict(predict_request("secret", values), metadata=stack.auth("reader")),
        grpc.StatusCode.NOT_FOUND,
    )
    assert details == "deployment 'secret' not found"
    await stack.inference_stub.Predict(predict_request("secret", values), metadata=stack.auth("other"))
    assert stack.triton.requests[-1].model_name == "other--secret--1"


async def test_not_found_suggests_only_the_callers_own_deployments(stack):
    values = np.zeros((1, 4), np.float32)

    async def missing(deployment: str) -> str:
        call = stack.inference_stub.Predict(predict_request(deployment, values), metadata=stack.auth("reader"))
        return await expect_error(call, grpc.StatusCode.NOT_FOUND)

    assert await missing("mpl") == "deployment 'mpl' not found; did you mean 'mlp'?"
    assert await missing("secre") == "deployment 'secre' not found"  # tenant other's 'secret' stays unnamed


@pytest.mark.parametrize(
    ("values", "datatype", "message"),
    [
        (np.zeros((1, 4), np.int64), common_pb2.DATA_TYPE_INT64, "expects FP32"),
        (np.zeros((1, 5), np.float32), FP32, "has shape [1, 5]"),
        (np.zeros((9, 4), np.float32), FP32, "max_batch_size 8"),
    ],
)
async def test_predict_rejects_bad_tensors_before_triton(stack, values, datatype, message):
    details = await expect_error(
        stack.inference_stub.Predict(predict_request("mlp", values, datatype), metadata=stack.auth("reader")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert message in details
    assert stack.triton.requests == []


async def test_predict_rejects_wrong_byte_length_and_unknown_outputs(stack):
    request = predict_request("mlp", np.zeros((1, 4), np.float32))
    request.inputs[0].raw = b"\0" * 15
    details = await expect_error(
        stack.inference_stub.Predict(request, metadata=stack.auth("reader")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "15 bytes" in details
    request = predict_request("mlp", np.zeros((1, 4), np.float32))
    request.output_names.append("z")
    await expect_error(
        stack.inference_stub.Predict(request, metadata=stack.auth("reader")), grpc.StatusCode.INVALID_ARGUMENT
    )
    await expect_error(
        stack.inference_stub.Predict(inference_pb2.PredictRequest(), metadata=stack.auth("reader")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_predict_maps_deployment_and_triton_failures(stack):
    values = np.zeros((1, 4), np.float32)
    auth = stack.auth("reader")
    await expect_error(
        stack.inference_stub.Predict(predict_request("loading", values), metadata=auth, timeout=0.3),
        grpc.StatusCode.UNAVAILABLE,
    )
    details = await expect_error(
        stack.inference_stub.Predict(predict_request("broken", values), metadata=auth),
        grpc.StatusCode.INTERNAL,
    )
    assert "'broken'" in details and "acme--broken--1" not in details  # Triton's name stays internal
    details = await expect_error(
        stack.inference_stub.Predict(predict_request("orphan", values), metadata=auth, timeout=5),
        grpc.StatusCode.UNAVAILABLE,
    )
    assert "retry later" in details


async def test_predict_says_which_version_answered_in_trailing_metadata(stack):
    call = stack.inference_stub.Predict(
        predict_request("mlp", np.zeros((1, 4), np.float32)), metadata=stack.auth("reader")
    )
    response = await call
    assert dict(await call.trailing_metadata())["x-maas-model-version"] == str(response.version) == "1"


async def test_predict_waits_for_a_loading_deployment_within_its_deadline(stack):
    values = np.zeros((1, 4), np.float32)
    routes = [r for r in stack.routing.routes if r.deployment != "loading"]
    call = stack.inference_stub.Predict(
        predict_request("loading", values), metadata=stack.auth("reader"), timeout=10
    )
    waiting = asyncio.ensure_future(call)
    await asyncio.sleep(0.3)
    assert not waiting.done()
    stack.routing.publish([*routes, route("acme", "loading", stack.triton_address, version=2)])
    response = await waiting
    assert response.version == 2 and stack.triton.requests[-1].model_name == "acme--loading--2"


async def test_a_canary_answers_its_share_the_same_way_for_each_request_id(stack):
    canaried = route("acme", "mlp", stack.triton_address)
    canaried.canary.CopyFrom(
        inference_pb2.CanaryRoute(version=2, triton_model="acme--mlp--2", weight_percent=30)
    )
    others = [r for r in stack.routing.routes if r.deployment != "mlp"]
    stack.routing.publish([*others, canaried])
    request = predict_request("mlp", np.zeros((1, 4), np.float32))
    for _ in range(500):  # until the gateway has the new route: a canary answer
        if (await stack.inference_stub.Predict(request, metadata=stack.auth("reader"))).version == 2:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the canary never answered")

    async def versions() -> list[int]:
        answers = []
        for number in range(100):
            metadata = (*stack.auth("reader"), ("x-request-id", f"request-{number}"))
            call = stack.inference_stub.Predict(request, metadata=metadata)
            response = await call
            trailer = dict(await call.trailing_metadata())["x-maas-model-version"]
            assert trailer == str(response.version)
            assert stack.triton.requests[-1].model_name == f"acme--mlp--{response.version}"
            answers.append(response.version)
        return answers

    first = await versions()
    assert 10 < first.count(2) < 60 and set(first) == {1, 2}
    assert await versions() == first


async def test_predict_goes_through_inference_until_routes_arrive(tmp_path):
    async with gateway_stack(tmp_path, routes_available=False) as stack:
        request = predict_request("mlp", np.zeros((1, 4), np.float32))
        response = await stack.inference_stub.Predict(request, metadata=stack.auth("reader"))
        assert response.model == "served-by-inference"
        assert stack.inference.predicts == [request]  # forwarded unchanged
        assert stack.inference.metadata[-1]["x-maas-tenant"] == "acme"
        assert stack.triton.requests == []


async def test_route_changes_and_reconnects_are_followed(stack):
    values = np.zeros((1, 4), np.float32)
    stack.routing.end_streams()
    # Not published on the old stream: only a reconnect delivers it.
    stack.routing.routes = [route("acme", "fresh", stack.triton_address)]
    for _ in range(300):
        if len(stack.routing.metadata) == 2 and await stack.oip_ready():
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the route watcher did not reconnect")
    await stack.inference_stub.Predict(predict_request("fresh", values), metadata=stack.auth("reader"))
    assert stack.triton.requests[-1].model_name == "acme--fresh--1"
    await expect_error(
        stack.inference_stub.Predict(predict_request("mlp", values), metadata=stack.auth("reader")),
        grpc.StatusCode.NOT_FOUND,
    )


@pytest.fixture
async def triton_client(stack):
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{stack.port}")
    yield client
    await client.close()


async def test_stock_tritonclient_works_against_the_gateway(stack, triton_client):
    headers = {"authorization": f"Bearer {stack.keys['reader']}"}
    assert await triton_client.is_server_live(headers=headers)
    assert await triton_client.is_server_ready(headers=headers)
    assert (await triton_client.get_server_metadata(headers=headers)).name == "maas-gateway"
    assert await triton_client.is_model_ready("mlp", headers=headers)
    assert not await triton_client.is_model_ready("loading", headers=headers)
    assert not await triton_client.is_model_ready("secret", headers=headers)  # another tenant's

    metadata = await triton_client.get_model_metadata("mlp", headers=headers)
    assert metadata.platform == "maas" and metadata.versions == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("x", "FP32", [-1, 4])]
    config = await triton_client.get_model_config("mlp", headers=headers)
    assert config.config.max_batch_size == 8 and list(config.config.input[0].dims) == [4]

    values = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    tensor = triton_aio.InferInput("x", [3, 4], "FP32")
    tensor.set_data_from_numpy(values)
    result = await triton_client.infer(
        "mlp", [tensor], outputs=[triton_aio.InferRequestedOutput("y")], headers=headers
    )
    np.testing.assert_array_equal(result.as_numpy("y"), values)
    assert result.get_response().model_name == "mlp"
    sent = stack.triton.requests[-1]
    assert sent.model_name == "acme--mlp--1" and sent.raw_input_contents[0] == values.tobytes()


async def test_tritonclient_errors(stack, triton_client):
    headers = {"authorization": f"Bearer {stack.keys['reader']}"}
    with pytest.raises(InferenceServerException) as error:
        await triton_client.is_server_live()
    assert "UNAUTHENTICATED" in error.value.status()

    tensor = triton_aio.InferInput("x", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3), np.float32))
    with pytest.raises(InferenceServerException) as error:
        await triton_client.infer("mlp", [tensor], headers=headers)
    assert "INVALID_ARGUMENT" in error.value.status()
    with pytest.raises(InferenceServerException) as error:
        await triton_client.get_model_metadata("secret", headers=headers)
    assert "NOT_FOUND" in error.value.status()
    with pytest.raises(InferenceServerException) as error:
        await triton_client.get_model_repository_index(headers=headers)
    assert "UNIMPLEMENTED" in error.value.status() and "not exposed" in error.value.message()
    assert stack.triton.requests == []


async def test_shared_memory_is_refused(stack):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(stack.channel)
    request = service_pb2.ModelInferRequest(model_name="mlp")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    tensor.parameters["shared_memory_region"].string_param = "someone-elses-region"
    tensor.parameters["shared_memory_byte_size"].int64_param = 16
    details = await expect_error(
        stub.ModelInfer(request, metadata=stack.auth("reader")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "shared memory" in details
    assert stack.triton.requests == []


async def test_streaming_infer_to_a_tensor_model_says_to_use_predict(stack):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(stack.channel)

    async def one_request():
        request = service_pb2.ModelInferRequest(model_name="mlp", id="r1")
        request.inputs.add(name="prompt", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(b"\x02\x00\x00\x00hi")
        yield request

    call = stub.ModelStreamInfer(one_request(), metadata=stack.auth("reader"))
    (response,) = [message async for message in call]
    assert "use Predict" in response.error_message and response.infer_response.id == "r1"
    assert stack.triton.requests == []


async def test_typed_contents_must_hold_one_element_per_entry_of_the_shape(stack):
    """Typed contents skipped the byte check: a short fp32_contents under a large shape reached
    Triton, which trusted the shape (issue 11). Now they are counted before anything is sent."""
    stub = service_pb2_grpc.GRPCInferenceServiceStub(stack.channel)
    request = service_pb2.ModelInferRequest(model_name="mlp")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    details = await expect_error(
        stub.ModelInfer(request, metadata=stack.auth("reader")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "carries 3 elements" in details and "needs 8" in details
    tensor.contents.ClearField("fp32_contents")
    tensor.contents.int_contents.extend(range(8))  # the wrong field for FP32
    await expect_error(stub.ModelInfer(request, metadata=stack.auth("reader")), grpc.StatusCode.INVALID_ARGUMENT)
    assert stack.triton.requests == []
