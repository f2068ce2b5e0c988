"""Translation between maas.v1 Predict messages and the Open Inference Protocol that Triton
speaks. Payloads move as raw bytes both ways; nothing is decoded into numpy here."""

from __future__ import annotations

from maas.common.v1 import common_pb2
from maas.inference.v1 import inference_pb2
from tritonclient.grpc import service_pb2

from services.common.errors import InvalidArgument
from services.common.tensors import BY_PROTO, BY_TRITON, TensorHeader


def headers_of_predict(request: inference_pb2.PredictRequest) -> list[TensorHeader]:
    headers = []
    for tensor in request.inputs:
        dtype = BY_PROTO.get(tensor.datatype)
        if dtype is None:
            raise InvalidArgument(f"input {tensor.name[:80]!r} needs a datatype")
        headers.append(TensorHeader(tensor.name, dtype.triton, tuple(tensor.shape), tensor.raw))
    return headers


# The InferTensorContents field each datatype travels in when sent typed (the v2 protocol's rule);
# FP16 and BF16 have none: they travel as raw bytes only.
TYPED_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def headers_of_infer(request: service_pb2.ModelInferRequest) -> list[TensorHeader]:
    """Headers of an Open Inference Protocol request; raw contents pair with inputs by position."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents: send one per input, in order"
        )
    if raw:
        for tensor in request.inputs:
            if tensor.contents.ListFields():
                raise InvalidArgument(
                    f"input {tensor.name[:80]!r} has typed contents beside raw_input_contents: send every "
                    "input one way, raw or typed"
                )
        return [TensorHeader(t.name, t.datatype, tuple(t.shape), raw[i]) for i, t in enumerate(request.inputs)]
    return [TensorHeader(t.name, t.datatype, tuple(t.shape), None, _typed_count(t)) for t in request.inputs]


def _typed_count(tensor: service_pb2.ModelInferRequest.InferInputTensor) -> int | None:
    """Elements in the field of the tensor's datatype (None: it has none); elements in any other
    field are refused, since Triton would read the datatype's field and trust the shape."""
    if tensor.datatype not in BY_TRITON:
        return None  # validation names the datatype the model expects
    field = TYPED_FIELD.get(tensor.datatype)
    for other, _ in tensor.contents.ListFields():
        if other.name != field:
            where = f"in {field}" if field else "as raw_input_contents only"
            raise InvalidArgument(
                f"input {tensor.name[:80]!r} is {tensor.datatype[:16]}: its elements travel {where}, "
                f"not in {other.name}"
            )
    return None if field is None else len(getattr(tensor.contents, field))


def infer_request_of_predict(
    request: inference_pb2.PredictRequest, triton_model: str, request_id: str = ""
) -> service_pb2.ModelInferRequest:
    infer = service_pb2.ModelInferRequest(model_name=triton_model, id=request_id)
    for tensor in request.inputs:
        infer.inputs.add(name=tensor.name, datatype=BY_PROTO[tensor.datatype].triton, shape=tensor.shape)
        infer.raw_input_contents.append(tensor.raw)
    for name in request.output_names:
        infer.outputs.add(name=name)
    return infer


def predict_response_of_infer(
    response: service_pb2.ModelInferResponse, model: str, version: int
) -> inference_pb2.PredictResponse:
    out = inference_pb2.PredictResponse(model=model, version=version)
    for index, tensor in enumerate(response.outputs):
        out.outputs.append(
            common_pb2.Tensor(
                name=tensor.name,
                datatype=BY_TRITON[tensor.datatype].proto,
                shape=tensor.shape,
                raw=response.raw_output_contents[index],
            )
        )
    return out
