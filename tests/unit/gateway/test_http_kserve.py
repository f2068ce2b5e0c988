"""The gateway's HTTP port, KServe v2 REST (/v2), with stock tritonclient.http in front of the
fake Triton of gateway_fakes (ModelInfer echoes input "x" as output "y")."""

from __future__ import annotations

import asyncio
import json
import struct

import httpx2
import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from tests.unit.gateway.test_http_openai import auth, http, stack  # noqa: F401  (fixtures)


def infer(stack, who: str, binary: bool, binary_output: bool):  # noqa: F811
    url = stack.http.removeprefix("http://")
    with triton_http.InferenceServerClient(url) as client:
        headers = auth(stack, who)
        assert client.is_server_live(headers=headers)
        assert client.is_model_ready("mlp", headers=headers)
        metadata = client.get_model_metadata("mlp", headers=headers)
        assert metadata["inputs"][0]["name"] == "x"
        x = triton_http.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4), binary_data=binary)
        outputs = [triton_http.InferRequestedOutput("y", binary_data=binary_output)]
        result = client.infer("mlp", [x], outputs=outputs, headers=headers)
        return result.as_numpy("y")


@pytest.mark.parametrize(("binary", "binary_output"), [(True, True), (False, False), (True, False)])
async def test_tritonclient_http_infers_through_the_gateway(stack, binary, binary_output):  # noqa: F811
    y = await asyncio.to_thread(infer, stack, "reader", binary, binary_output)
    assert y.tolist() == [[0.0, 1.0, 2.0, 3.0]]


async def test_x_api_key_is_accepted_and_a_bad_key_refused(stack, http):  # noqa: F811
    key = {"x-api-key": stack.keys["reader"]}
    assert (await http.get("/v2/models/mlp", headers=key)).json()["name"] == "mlp"
    refused = await http.get("/v2/models/mlp", headers={"x-api-key": "maas_a_b"})
    assert refused.status_code == 401 and "error" in refused.json()


def infer_as_other(stack) -> None:  # noqa: F811
    with triton_http.InferenceServerClient(stack.http.removeprefix("http://")) as client:
        assert not client.is_model_ready("mlp", headers=auth(stack, "other"))
        x = triton_http.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
        client.infer("mlp", [x], headers=auth(stack, "other"))


async def test_another_tenants_model_is_not_found(stack):  # noqa: F811
    with pytest.raises(InferenceServerException) as error:
        await asyncio.to_thread(infer_as_other, stack)
    assert "not found" in str(error.value) and error.value.status() == "404"


@pytest.mark.parametrize(
    ("body", "header_length", "complaint"),
    [
        (b"{not json", None, "not valid JSON"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2]}]}', None, "needs 4"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ["a","b","c","d"]}]}',
         None, "numbers"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],'
         b' "parameters": {"binary_data_size": 99}}]}', None, "binary_data_size"),
        (b'{"inputs": "x"}', None, "inputs"),
        (b"{}", "999", "Inference-Header-Content-Length"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, -4], "data": [1]}]}', None, "negative"),
        (b'\xff\xfe{"inputs": []}', None, "JSON"),
    ],
)
async def test_hostile_inference_bodies_get_400(stack, http, body, header_length, complaint):  # noqa: F811
    headers = auth(stack, "reader")
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = header_length
    response = await http.post("/v2/models/mlp/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert complaint in response.json()["error"]


async def test_binary_output_is_framed_by_the_header_length(stack, http):  # noqa: F811
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                                     "parameters": {"binary_data_size": 16}}],
                         "parameters": {"binary_data_output": True}}).encode()
    body = header + struct.pack("<4f", 1, 2, 3, 4)
    headers = {**auth(stack, "reader"), "Inference-Header-Content-Length": str(len(header))}
    response = await http.post("/v2/models/mlp/infer", content=body, headers=headers)
    length = int(response.headers["inference-header-content-length"])
    document = json.loads(response.content[:length])
    assert document["outputs"][0]["parameters"]["binary_data_size"] == 16
    assert struct.unpack("<4f", response.content[length:]) == (1, 2, 3, 4)


async def test_shared_memory_is_refused_by_the_one_code_path(stack, http):  # noqa: F811
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4],
                        "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 16}}]}
    response = await http.post("/v2/models/mlp/infer", json=body, headers=auth(stack, "reader"))
    assert response.status_code == 400 and "shared memory" in response.json()["error"]


async def test_health_needs_a_key_as_on_grpc(stack):  # noqa: F811
    async with httpx2.AsyncClient(base_url=stack.http) as client:
        assert (await client.get("/v2/health/live")).status_code == 401
        assert (await client.get("/v2/health/ready", headers=auth(stack, "reader"))).status_code == 200
