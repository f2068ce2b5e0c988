"""Signature checks and request validation shared by the inference service and the gateway."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from maas.common.v1 import common_pb2
from maas.tensors import from_tensor, signature, to_tensor

from services.common.errors import InvalidArgument
from services.common.tensors import CompiledSignature, TensorHeader, check_signature

SIG = signature({"x": ("FP32", [4]), "mask": ("INT64", [-1])}, {"y": ("FP32", [2])})


def header(name="x", dtype="FP32", shape=(2, 4), payload: bytes | None = b"\0" * 32) -> TensorHeader:
    return TensorHeader(name, dtype, shape, payload)


def mask(batch=2, length=3) -> TensorHeader:
    return TensorHeader("mask", "INT64", (batch, length), b"\0" * (8 * batch * length))


def test_valid_request_passes() -> None:
    CompiledSignature(SIG, max_batch_size=8).validate([header(), mask()], ["y"])


@pytest.mark.parametrize(
    "headers, message",
    [
        ([header(name="z"), mask()], "unknown input 'z'"),
        ([header()], "missing input(s) ['mask']"),
        ([header(), header(), mask()], "given twice"),
        ([header(dtype="FP64"), mask()], "datatype FP64; the model expects FP32"),
        ([header(shape=(2, 5), payload=b"\0" * 40), mask()], "expects [batch, 4]"),
        ([header(shape=(4,), payload=b"\0" * 16), mask()], "expects [batch, 4]"),
        ([header(payload=b"\0" * 31), mask()], "carries 31 bytes"),
        ([header(shape=(0, 4), payload=b""), mask(batch=0)], "at least 1"),
        ([header(shape=(9, 4), payload=b"\0" * 144), mask(batch=9)], "max_batch_size 8"),
        ([header(), mask(batch=3)], "batch size 3"),
        ([header(shape=(2, -4), payload=b""), mask()], "expects [batch, 4]"),
    ],
)
def test_bad_requests_are_explained(headers, message) -> None:
    with pytest.raises(InvalidArgument) as caught:
        CompiledSignature(SIG, max_batch_size=8).validate(headers)
    assert message in str(caught.value)


def test_unknown_output_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="unknown output 'nope'"):
        CompiledSignature(SIG, 8).validate([header(), mask()], ["nope"])


def typed(name: str, datatype: str, shape: tuple[int, ...], count: int | None) -> TensorHeader:
    return TensorHeader(name, datatype, shape, None, count)


def test_typed_contents_are_counted_like_raw_bytes() -> None:
    CompiledSignature(SIG, 8).validate([typed("x", "FP32", (2, 4), 8), mask()])
    with pytest.raises(InvalidArgument, match="carries 3 elements .* needs 8"):
        CompiledSignature(SIG, 8).validate([typed("x", "FP32", (2, 4), 3), mask()])


def test_a_huge_shape_over_a_few_typed_elements_is_refused() -> None:
    """Issue 11: typed contents with shape [1, 2**62] on a [-1] input skipped the byte check,
    overflowed Triton's and crashed the model's stub."""
    mask_typed = typed("mask", "INT64", (1, 2**62), 3)
    with pytest.raises(InvalidArgument, match="carries 3 elements"):
        CompiledSignature(SIG, 8).validate([typed("x", "FP32", (1, 4), 4), mask_typed])


def test_a_datatype_without_a_typed_field_must_travel_raw() -> None:
    sig = signature({"h": ("FP16", [2])}, {"y": ("FP32", [1])})
    with pytest.raises(InvalidArgument, match="FP16 cannot travel as typed contents"):
        CompiledSignature(sig, 8).validate([typed("h", "FP16", (1, 2), None)])


def test_bytes_payloads_are_walked() -> None:
    sig = signature({"text": ("BYTES", [1])}, {"y": ("FP32", [1])})
    good = b"".join(struct.pack("<I", len(s)) + s for s in (b"hi", b"there"))
    CompiledSignature(sig, 8).validate([TensorHeader("text", "BYTES", (2, 1), good)])
    with pytest.raises(InvalidArgument, match="ends before element 2"):
        CompiledSignature(sig, 8).validate([TensorHeader("text", "BYTES", (2, 1), good[:6])])
    with pytest.raises(InvalidArgument, match="elements use"):
        CompiledSignature(sig, 8).validate([TensorHeader("text", "BYTES", (2, 1), good + b"!")])


@pytest.mark.parametrize(
    "sig, message",
    [
        (common_pb2.Signature(), "at least one input and one output"),
        (signature({"1x": ("FP32", [1])}, {"y": ("FP32", [1])}), "invalid input name"),
        (signature({"x": ("FP32", [1])}, {"x": ("FP32", [1])}), "appears twice"),
        (signature({"x": ("FP32", [0])}, {"y": ("FP32", [1])}), "dims are positive"),
        (common_pb2.Signature(inputs=[common_pb2.TensorSpec(name="x", shape=[1])],
                              outputs=[common_pb2.TensorSpec(name="y", datatype=8, shape=[1])]), "needs a datatype"),
    ],
)
def test_bad_signatures(sig, message) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_signature(sig)


@given(
    name=st.text(max_size=20),
    dtype=st.sampled_from(["FP32", "FP64", "INT64", "BYTES", "", "fp32"]),
    shape=st.lists(st.integers(min_value=-(2**40), max_value=2**40), max_size=5),
    payload=st.one_of(st.none(), st.binary(max_size=64)),
)
def test_validation_never_fails_with_anything_but_invalid_argument(name, dtype, shape, payload) -> None:
    try:
        CompiledSignature(SIG, 8).validate([TensorHeader(name, dtype, tuple(shape), payload), mask()])
    except InvalidArgument:
        pass


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "int32", "uint8", "bool", "float16"])
def test_sdk_tensor_round_trip(dtype) -> None:
    array = (np.arange(12).reshape(3, 4) % 2).astype(dtype)
    back = from_tensor(to_tensor("t", array))
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_sdk_tensor_converts_big_endian() -> None:
    array = np.arange(3, dtype=">f4")
    tensor = to_tensor("t", array)
    assert tensor.raw == np.arange(3, dtype="<f4").tobytes()


@pytest.mark.parametrize(
    "shape, message",
    [
        ([2**62], rf"input 'x' has shape \[{2**62}\]: each dim must be at most {2**31 - 1}"),
        ([-1, 2**31], "each dim must be at most"),
        # Each dim is fine, their product is not: 2**20 * 2**10 FP32 elements are 4 GiB.
        ([2**20, 2**10], "one sample would take 4294967296 bytes, more than the 268435456 bytes"),
    ],
)
def test_signature_dims_are_bounded(shape, message) -> None:
    sig = signature({"x": ("FP32", shape)}, {"y": ("FP32", [1])})
    with pytest.raises(InvalidArgument, match=message):
        check_signature(sig)


def test_signature_size_bound_counts_the_dtype_and_can_be_lowered() -> None:
    check_signature(signature({"x": ("UINT8", [2**28])}, {"y": ("FP32", [-1, 2**26])}))
    with pytest.raises(InvalidArgument, match="output 'y'.*more than the 268435456 bytes"):
        check_signature(signature({"x": ("UINT8", [1])}, {"y": ("FP64", [2**26])}))
    with pytest.raises(InvalidArgument, match="more than the 1024 bytes"):
        check_signature(signature({"x": ("BYTES", [2048])}, {"y": ("FP32", [1])}), max_tensor_bytes=1024)
