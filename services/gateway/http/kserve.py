"""The Open Inference Protocol's REST form (KServe v2, /v2) for tensor models, so that stock
`tritonclient.http` works through the gateway: health, server and model metadata, model
readiness and config, and inference with JSON tensors or the binary tensor data extension
(Inference-Header-Content-Length). Each route is the matching inference.GRPCInferenceService call
of the gateway; model names are deployment names."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, ConfigDict, ValidationError
from tritonclient.grpc import service_pb2

from services.common.interceptors import REQUEST_ID_KEY, new_request_id
from services.gateway.http.dispatch import InProcessCalls, Metadata, RpcFailed, caller_metadata
from services.gateway.http.errors import HttpError, http_error_of, validation_error

SERVICE = "/inference.GRPCInferenceService"
HEADER_LENGTH = "inference-header-content-length"
# JSON-representable datatypes and their little-endian numpy types (BF16 travels binary only).
NUMPY_TYPES = {
    "BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1",
    "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
# Parameters of the binary extension: read here, not forwarded.
BINARY_PARAMETERS = ("binary_data_size", "binary_data", "binary_data_output")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class InputTensor(_Body):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] = {}
    data: Any = None


class RequestedOutput(_Body):
    name: str
    parameters: dict[str, Any] = {}


class InferBody(_Body):
    id: str = ""
    parameters: dict[str, Any] = {}
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None = None


class KServeRoutes:
    def __init__(self, calls: InProcessCalls) -> None:
        self.calls = calls
        self.router = APIRouter(prefix="/v2")
        get = ["GET"]
        self.router.add_api_route("", self.server_metadata, methods=get)
        self.router.add_api_route("/health/live", self.live, methods=get)
        self.router.add_api_route("/health/ready", self.ready, methods=get)
        for prefix in ("/models/{model}", "/models/{model}/versions/{version}"):
            self.router.add_api_route(prefix, self.model_metadata, methods=get)
            self.router.add_api_route(f"{prefix}/ready", self.model_ready, methods=get)
            self.router.add_api_route(f"{prefix}/config", self.model_config, methods=get)
            self.router.add_api_route(f"{prefix}/infer", self.infer, methods=["POST"])

    async def _call(self, request: Request, method: str, message: Any, answer: type) -> Any:
        metadata: Metadata = caller_metadata(request.headers, request.headers.get(REQUEST_ID_KEY) or new_request_id())
        try:
            return await self.calls.unary(f"{SERVICE}/{method}", message, answer, metadata)
        except RpcFailed as error:
            raise http_error_of(error) from None

    async def server_metadata(self, request: Request) -> dict:
        answer = await self._call(
            request, "ServerMetadata", service_pb2.ServerMetadataRequest(), service_pb2.ServerMetadataResponse
        )
        return {"name": answer.name, "version": answer.version, "extensions": ["binary_tensor_data"]}

    async def live(self, request: Request) -> Response:
        answer = await self._call(request, "ServerLive", service_pb2.ServerLiveRequest(), service_pb2.ServerLiveResponse)
        return Response(status_code=200 if answer.live else 503)

    async def ready(self, request: Request) -> Response:
        answer = await self._call(
            request, "ServerReady", service_pb2.ServerReadyRequest(), service_pb2.ServerReadyResponse
        )
        return Response(status_code=200 if answer.ready else 503)

    async def model_metadata(self, model: str, request: Request, version: str = "") -> dict:
        answer = await self._call(
            request,
            "ModelMetadata",
            service_pb2.ModelMetadataRequest(name=model, version=version),
            service_pb2.ModelMetadataResponse,
        )
        return {
            "name": answer.name,
            "versions": list(answer.versions),
            "platform": answer.platform,
            "inputs": _tensors(answer.inputs),
            "outputs": _tensors(answer.outputs),
        }

    async def model_ready(self, model: str, request: Request, version: str = "") -> Response:
        answer = await self._call(
            request,
            "ModelReady",
            service_pb2.ModelReadyRequest(name=model, version=version),
            service_pb2.ModelReadyResponse,
        )
        return Response(status_code=200 if answer.ready else 400)

    async def model_config(self, model: str, request: Request, version: str = "") -> dict:
        answer = await self._call(
            request,
            "ModelConfig",
            service_pb2.ModelConfigRequest(name=model, version=version),
            service_pb2.ModelConfigResponse,
        )
        return MessageToDict(answer.config, preserving_proto_field_name=True)

    async def infer(self, model: str, request: Request, version: str = "") -> Response:
        body = await request.body()
        header, binary = _split(body, request.headers.get(HEADER_LENGTH))
        try:
            parsed = InferBody.model_validate_json(header)
        except ValidationError as error:
            raise validation_error(error.errors()) from None
        infer_request, binary_outputs = _infer_request(model, version, parsed, binary)
        answer = await self._call(request, "ModelInfer", infer_request, service_pb2.ModelInferResponse)
        return _infer_response(answer, binary_outputs)


def _tensors(specs: Any) -> list[dict[str, Any]]:
    return [{"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)} for spec in specs]


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary tensor data after it."""
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 <= length <= len(body):
        raise HttpError(400, f"Inference-Header-Content-Length must be 0 to {len(body)} (the body's size), got {header_length[:40]!r}")
    return body[:length], body[length:]


def _parameter(value: Any, where: str) -> service_pb2.InferParameter:
    if isinstance(value, bool):
        return service_pb2.InferParameter(bool_param=value)
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return service_pb2.InferParameter(int64_param=value)
    if isinstance(value, float):
        return service_pb2.InferParameter(double_param=value)
    if isinstance(value, str):
        return service_pb2.InferParameter(string_param=value)
    raise HttpError(400, f"{where} must be a boolean, a 64-bit integer, a number or a string", where)


def _infer_request(
    model: str, version: str, body: InferBody, binary: bytes
) -> tuple[service_pb2.ModelInferRequest, set[str]]:
    """The ModelInferRequest of a REST inference, and the outputs to answer in binary."""
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version, id=body.id)
    for name, value in body.parameters.items():
        if name not in BINARY_PARAMETERS:
            request.parameters[name].CopyFrom(_parameter(value, f"parameters.{name}"))
    offset = 0
    for index, tensor in enumerate(body.inputs):
        where = f"inputs[{index}]"
        if any(size < 0 for size in tensor.shape):
            raise HttpError(400, f"{where}.shape must not hold negative sizes", f"{where}.shape")
        proto = request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        for name, value in tensor.parameters.items():
            if name not in BINARY_PARAMETERS:
                proto.parameters[name].CopyFrom(_parameter(value, f"{where}.parameters.{name}"))
        if "shared_memory_region" in tensor.parameters:
            continue  # the gateway's ModelInfer refuses it, with its reason
        size = tensor.parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary) - offset:
                raise HttpError(
                    400,
                    f"{where}.parameters.binary_data_size must be 0 to {len(binary) - offset} (the binary data left)",
                    f"{where}.parameters.binary_data_size",
                )
            request.raw_input_contents.append(binary[offset : offset + size])
            offset += size
        else:
            request.raw_input_contents.append(_raw_of_json(tensor, where))
    if offset != len(binary):
        raise HttpError(400, f"{len(binary) - offset} bytes of binary data follow the inputs' binary_data_size")
    if body.outputs is None:
        binary_outputs = set() if not body.parameters.get("binary_data_output") else {"*"}
    else:
        for output in body.outputs:
            request.outputs.add(name=output.name)
        binary_outputs = {o.name for o in body.outputs if o.parameters.get("binary_data")}
    return request, binary_outputs


def _raw_of_json(tensor: InputTensor, where: str) -> bytes:
    if tensor.data is None:
        raise HttpError(400, f"{where} has no data: send `data` or binary data (binary_data_size)", f"{where}.data")
    values = np.asarray(tensor.data, dtype=object).ravel()
    count = math.prod(tensor.shape)
    if values.size != count:
        raise HttpError(
            400, f"{where}.data holds {values.size} elements; shape {tensor.shape} needs {count}", f"{where}.data"
        )
    if tensor.datatype == "BYTES":
        if not all(isinstance(value, str) for value in values):
            raise HttpError(400, f"{where}.data must hold strings for BYTES", f"{where}.data")
        return b"".join(struct.pack("<I", len(encoded)) + encoded for encoded in (v.encode() for v in values))
    numpy_type = NUMPY_TYPES.get(tensor.datatype)
    if numpy_type is None:
        raise HttpError(
            400, f"{where}.datatype {tensor.datatype[:20]!r} cannot travel as JSON: send it as binary data", f"{where}.datatype"
        )
    if not all(isinstance(value, bool | int | float) for value in values):
        raise HttpError(400, f"{where}.data must hold numbers for {tensor.datatype}", f"{where}.data")
    try:
        return np.asarray(values.tolist(), dtype=numpy_type).tobytes()
    except (ValueError, OverflowError):
        raise HttpError(400, f"{where}.data does not fit {tensor.datatype}", f"{where}.data") from None


def _infer_response(answer: service_pb2.ModelInferResponse, binary_outputs: set[str]) -> Response:
    outputs, chunks = [], []
    for index, tensor in enumerate(answer.outputs):
        raw = answer.raw_output_contents[index] if index < len(answer.raw_output_contents) else b""
        output: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if "*" in binary_outputs or tensor.name in binary_outputs:
            output["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            output["data"] = _json_of_raw(tensor.datatype, raw)
        outputs.append(output)
    document = {"model_name": answer.model_name, "model_version": answer.model_version, "outputs": outputs}
    if answer.id:
        document["id"] = answer.id
    if not chunks:
        return JSONResponse(document)
    header = json.dumps(document, separators=(",", ":")).encode()
    return Response(
        header + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


def _json_of_raw(datatype: str, raw: bytes) -> list:
    if datatype == "BYTES":
        values, offset = [], 0
        while offset + 4 <= len(raw):
            (length,) = struct.unpack_from("<I", raw, offset)
            values.append(raw[offset + 4 : offset + 4 + length].decode(errors="replace"))
            offset += 4 + length
        return values
    numpy_type = NUMPY_TYPES.get(datatype)
    if numpy_type is None:
        raise HttpError(400, f"output datatype {datatype} cannot travel as JSON: ask for it as binary data")
    return np.frombuffer(raw, dtype=numpy_type).tolist()
