"""Open Inference Protocol requests with typed `contents`, as the gateway checks them before they
reach Triton (services/common/oip.py headers_of_infer, then CompiledSignature.validate)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from maas.tensors import signature
from tritonclient.grpc import service_pb2

from services.common.errors import InvalidArgument
from services.common.oip import TYPED_FIELD, headers_of_infer
from services.common.tensors import CompiledSignature

SIG = CompiledSignature(signature({"x": ("FP32", [-1]), "mask": ("INT8", [2])}, {"y": ("FP32", [1])}), 8)
FIELDS = sorted(set(TYPED_FIELD.values()))


def request(x_shape: list[int], x_values: list[float], mask_values: tuple[int, int] = (1, 0)):
    infer = service_pb2.ModelInferRequest(model_name="m")
    x = infer.inputs.add(name="x", datatype="FP32", shape=x_shape)
    x.contents.fp32_contents.extend(x_values)
    mask = infer.inputs.add(name="mask", datatype="INT8", shape=[1, 2])
    mask.contents.int_contents.extend(mask_values)
    return infer


def check(infer: service_pb2.ModelInferRequest) -> None:
    SIG.validate(headers_of_infer(infer))


def test_typed_contents_that_match_the_shape_pass() -> None:
    check(request([1, 3], [1.0, 2.0, 3.0]))


def test_a_shape_of_2_to_the_62_over_three_floats_is_refused() -> None:
    """Issue 11: this request reached Triton, overflowed its byte count and crashed the stub."""
    with pytest.raises(InvalidArgument, match=r"'x' carries 3 elements .* needs 4611686018427387904"):
        check(request([1, 2**62], [1.0, 2.0, 3.0]))


def test_a_count_that_differs_from_the_shape_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="carries 2 elements"):
        check(request([1, 3], [1.0, 2.0]))
    with pytest.raises(InvalidArgument, match="carries 4 elements"):
        check(request([1, 3], [1.0, 2.0, 3.0, 4.0]))


def test_elements_in_the_wrong_typed_field_are_refused() -> None:
    infer = request([1, 2], [])
    infer.inputs[0].contents.int_contents.extend([1, 2])
    with pytest.raises(InvalidArgument, match="'x' is FP32: its elements travel in fp32_contents, not in int_contents"):
        check(infer)
    # INT8 travels in int_contents (the v2 protocol has no 8-bit field), not in int64_contents.
    infer = request([1, 2], [1.0, 2.0])
    infer.inputs[1].contents.ClearField("int_contents")
    infer.inputs[1].contents.int64_contents.extend([1, 0])
    with pytest.raises(InvalidArgument, match="travel in int_contents, not in int64_contents"):
        check(infer)


def test_fp16_cannot_travel_typed() -> None:
    sig = CompiledSignature(signature({"h": ("FP16", [2])}, {"y": ("FP32", [1])}), 8)
    infer = service_pb2.ModelInferRequest(model_name="m")
    infer.inputs.add(name="h", datatype="FP16", shape=[1, 2]).contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(InvalidArgument, match="FP16: its elements travel as raw_input_contents only"):
        sig.validate(headers_of_infer(infer))


def test_typed_contents_beside_raw_contents_are_refused() -> None:
    infer = request([1, 2], [1.0, 2.0])
    infer.raw_input_contents.extend([b"\0" * 8, b"\1\0"])
    with pytest.raises(InvalidArgument, match="send every input one way"):
        check(infer)


def test_a_huge_raw_shape_over_a_short_payload_is_refused_without_allocating() -> None:
    infer = service_pb2.ModelInferRequest(model_name="m")
    infer.inputs.add(name="x", datatype="FP32", shape=[1, 2**62])
    infer.inputs.add(name="mask", datatype="INT8", shape=[1, 2])
    infer.raw_input_contents.extend([b"\0" * 12, b"\0\0"])
    with pytest.raises(InvalidArgument, match="carries 12 bytes"):
        check(infer)


contents = st.fixed_dictionaries({}, optional={
    field: st.lists(
        st.binary(max_size=4) if field == "bytes_contents"
        else st.booleans() if field == "bool_contents"
        else st.floats(width=32) if field.startswith("fp")
        else st.integers(0, 2**32 - 1) if field == "uint_contents"
        else st.integers(0, 2**64 - 1) if field == "uint64_contents"
        else st.integers(-(2**31), 2**31 - 1) if field == "int_contents"
        else st.integers(-(2**63), 2**63 - 1),
        max_size=6,
    )
    for field in FIELDS
})
tensor = st.fixed_dictionaries({
    "name": st.sampled_from(["x", "mask", "other"]),
    "datatype": st.sampled_from([*TYPED_FIELD, "FP16", "BF16", "", "fp32"]),
    "shape": st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(-2, 8), max_size=4),
    "contents": contents,
})


@given(tensors=st.lists(tensor, max_size=3), raw=st.one_of(st.none(), st.lists(st.binary(max_size=16), max_size=3)))
def test_any_request_is_refused_only_with_invalid_argument(tensors, raw) -> None:
    infer = service_pb2.ModelInferRequest(model_name="m")
    for spec in tensors:
        added = infer.inputs.add(name=spec["name"], datatype=spec["datatype"], shape=spec["shape"])
        for field, values in spec["contents"].items():
            getattr(added.contents, field).extend(values)
    if raw is not None:
        infer.raw_input_contents.extend(raw)
    try:
        check(infer)
    except InvalidArgument:
        pass
