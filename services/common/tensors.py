"""Tensor datatypes and signature checks, shared by the registry (signatures on upload), the
inference service (Predict) and the gateway (its direct path to Triton).

Validation looks only at tensor headers and byte lengths: the payload stays raw bytes.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from maas.common.v1 import common_pb2

from services.common.errors import InvalidArgument

TENSOR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")
# Bounds of a signature's tensors: every dim fits Triton's and numpy's 32-bit-safe sizes, and one
# sample fits a message well above the default limit (MAAS_MAX_MESSAGE_BYTES, 64 MiB), so that a
# deployer who raises that limit keeps working signatures.
MAX_SIGNATURE_DIM = 2**31 - 1
MAX_SIGNATURE_TENSOR_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class DType:
    proto: int  # maas.common.v1.DataType value
    triton: str  # Open Inference Protocol datatype, e.g. "FP32"
    config: str  # Triton config.pbtxt data_type, e.g. "TYPE_FP32"
    numpy: str  # numpy dtype string; "object" for BYTES
    itemsize: int  # 0 for variable-length BYTES


DTYPES = [
    DType(common_pb2.DATA_TYPE_BOOL, "BOOL", "TYPE_BOOL", "bool", 1),
    DType(common_pb2.DATA_TYPE_UINT8, "UINT8", "TYPE_UINT8", "uint8", 1),
    DType(common_pb2.DATA_TYPE_INT8, "INT8", "TYPE_INT8", "int8", 1),
    DType(common_pb2.DATA_TYPE_INT16, "INT16", "TYPE_INT16", "int16", 2),
    DType(common_pb2.DATA_TYPE_INT32, "INT32", "TYPE_INT32", "int32", 4),
    DType(common_pb2.DATA_TYPE_INT64, "INT64", "TYPE_INT64", "int64", 8),
    DType(common_pb2.DATA_TYPE_FP16, "FP16", "TYPE_FP16", "float16", 2),
    DType(common_pb2.DATA_TYPE_FP32, "FP32", "TYPE_FP32", "float32", 4),
    DType(common_pb2.DATA_TYPE_FP64, "FP64", "TYPE_FP64", "float64", 8),
    # numpy has no bfloat16; such tensors travel as raw 2-byte words.
    DType(common_pb2.DATA_TYPE_BF16, "BF16", "TYPE_BF16", "uint16", 2),
    DType(common_pb2.DATA_TYPE_BYTES, "BYTES", "TYPE_STRING", "object", 0),
]
BY_PROTO = {d.proto: d for d in DTYPES}
BY_TRITON = {d.triton: d for d in DTYPES}
BY_NUMPY = {np.dtype(d.numpy): d for d in DTYPES if d.triton not in ("BYTES", "BF16")}


def dtype_of_proto(value: int) -> DType:
    try:
        return BY_PROTO[value]
    except KeyError:
        raise InvalidArgument(f"unknown datatype {value}") from None


def dtype_name(value: int) -> str:
    return BY_PROTO[value].triton if value in BY_PROTO else "UNSPECIFIED"


def check_signature(signature: common_pb2.Signature, max_tensor_bytes: int = MAX_SIGNATURE_TENSOR_BYTES) -> None:
    """A signature is usable when it has named, typed inputs and outputs with sane dims, and one
    sample of each tensor fits in `max_tensor_bytes`."""
    if not signature.inputs or not signature.outputs:
        raise InvalidArgument("signature needs at least one input and one output")
    seen: set[str] = set()
    for role, specs in (("input", signature.inputs), ("output", signature.outputs)):
        for spec in specs:
            if not TENSOR_NAME.match(spec.name):
                raise InvalidArgument(
                    f"invalid {role} name {spec.name[:80]!r}: use letters, digits, '_' and '.', "
                    "starting with a letter or '_', at most 64 characters"
                )
            if spec.name in seen:
                raise InvalidArgument(f"tensor name {spec.name!r} appears twice in the signature")
            seen.add(spec.name)
            if spec.datatype not in BY_PROTO:
                raise InvalidArgument(f"{role} {spec.name!r} needs a datatype")
            if any(d == 0 or d < -1 for d in spec.shape):
                raise InvalidArgument(
                    f"{role} {spec.name!r} has shape {list(spec.shape)}: dims are positive, or -1 for any size"
                )
            _check_tensor_size(role, spec, max_tensor_bytes)


def _check_tensor_size(role: str, spec: common_pb2.TensorSpec, max_tensor_bytes: int) -> None:
    """One sample of the tensor (its fixed dims; -1 counted as 1) must fit in a message: a larger
    dim cannot be sent, and overflows the runtimes' own size arithmetic (Triton's int64)."""
    if any(d > MAX_SIGNATURE_DIM for d in spec.shape):
        raise InvalidArgument(
            f"{role} {spec.name!r} has shape {list(spec.shape)[:16]}: each dim must be at most {MAX_SIGNATURE_DIM}"
        )
    # BYTES elements are at least one byte each.
    sample_bytes = math.prod(d for d in spec.shape if d > 0) * max(BY_PROTO[spec.datatype].itemsize, 1)
    if sample_bytes > max_tensor_bytes:
        raise InvalidArgument(
            f"{role} {spec.name!r} has shape {list(spec.shape)[:16]}: one sample would take {sample_bytes} bytes, "
            f"more than the {max_tensor_bytes} bytes a tensor may have"
        )


@dataclass(frozen=True)
class TensorHeader:
    """What validation needs of one input tensor: no payload decoding."""

    name: str
    datatype: str  # Open Inference Protocol name, e.g. "FP32"
    shape: tuple[int, ...]
    payload: bytes | None  # None when the caller sent typed contents instead of raw bytes
    # With typed contents: how many elements the field of this datatype holds (None: no such field).
    typed_count: int | None = None


class CompiledSignature:
    """A signature indexed for the hot path: one dict lookup per input."""

    def __init__(self, signature: common_pb2.Signature, max_batch_size: int) -> None:
        self.max_batch_size = max_batch_size
        self.inputs = {s.name: (BY_PROTO[s.datatype], tuple(s.shape)) for s in signature.inputs}
        self.outputs = {s.name: (BY_PROTO[s.datatype], tuple(s.shape)) for s in signature.outputs}
        # Whether every output has fixed-size elements, so that a batched answer cuts by rows.
        self.splittable = all(dtype.triton != "BYTES" for dtype, _ in self.outputs.values())

    def describe(self, shape: tuple[int, ...]) -> str:
        return "[batch, " + ", ".join("any" if d == -1 else str(d) for d in shape) + "]"

    def validate(self, headers: Iterable[TensorHeader], output_names: Iterable[str] = ()) -> None:
        seen: set[str] = set()
        batch: int | None = None
        for header in headers:
            expected = self.inputs.get(header.name)
            if expected is None:
                raise InvalidArgument(
                    f"unknown input {header.name[:80]!r}; the model takes {sorted(self.inputs)}"
                )
            if header.name in seen:
                raise InvalidArgument(f"input {header.name!r} given twice")
            seen.add(header.name)
            dtype, dims = expected
            if header.datatype != dtype.triton:
                raise InvalidArgument(
                    f"input {header.name!r} has datatype {header.datatype[:16]}; the model expects {dtype.triton}"
                )
            shape = header.shape
            if len(shape) != len(dims) + 1 or any(
                got < 0 or (want != -1 and got != want) for got, want in zip(shape[1:], dims, strict=True)
            ):
                raise InvalidArgument(
                    f"input {header.name!r} has shape {list(shape)[:10]}; the model expects {self.describe(dims)}"
                )
            if shape[0] < 1:
                raise InvalidArgument(f"input {header.name!r}: the batch dimension must be at least 1")
            if batch is None:
                batch = shape[0]
            elif shape[0] != batch:
                raise InvalidArgument(f"input {header.name!r} has batch size {shape[0]}, other inputs {batch}")
            if header.payload is not None:
                check_payload(header.name, dtype, shape, header.payload)
            else:
                check_typed_count(header.name, dtype, shape, header.typed_count)
        if missing := sorted(set(self.inputs) - seen):
            raise InvalidArgument(f"missing input(s) {missing}; the model takes {sorted(self.inputs)}")
        if batch is not None and self.max_batch_size and batch > self.max_batch_size:
            raise InvalidArgument(
                f"batch size {batch} exceeds this deployment's max_batch_size {self.max_batch_size}; "
                "split the request or raise max_batch_size"
            )
        for name in output_names:
            if name not in self.outputs:
                raise InvalidArgument(f"unknown output {name[:80]!r}; the model returns {sorted(self.outputs)}")


def check_typed_count(name: str, dtype: DType, shape: tuple[int, ...], typed_count: int | None) -> None:
    """Typed contents must hold exactly one element per entry of the shape, as raw bytes must:
    Triton trusts the shape, so a shape of [1, 2**62] over three floats overflowed it."""
    if typed_count is None:
        raise InvalidArgument(
            f"input {name!r}: {dtype.triton} cannot travel as typed contents; send it in raw_input_contents"
        )
    count = math.prod(shape)
    if typed_count != count:
        raise InvalidArgument(
            f"input {name!r} carries {typed_count} elements in its typed contents; shape {list(shape)[:10]} "
            f"needs {count}"
        )


def check_payload(name: str, dtype: DType, shape: tuple[int, ...], payload: bytes) -> None:
    count = math.prod(shape)
    if dtype.itemsize:
        if len(payload) != count * dtype.itemsize:
            raise InvalidArgument(
                f"input {name!r} carries {len(payload)} bytes; shape {list(shape)} of {dtype.triton} "
                f"needs {count * dtype.itemsize}"
            )
        return
    # BYTES: `count` elements, each a 4-byte little-endian length and then that many bytes.
    offset = 0
    for index in range(count):
        if offset + 4 > len(payload):
            raise InvalidArgument(f"input {name!r}: BYTES payload ends before element {index + 1} of {count}")
        (length,) = struct.unpack_from("<I", payload, offset)
        offset += 4 + length
    if offset != len(payload):
        raise InvalidArgument(
            f"input {name!r}: BYTES payload has {len(payload)} bytes, its {count} elements use {offset}"
        )
