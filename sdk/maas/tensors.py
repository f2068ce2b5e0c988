"""numpy arrays <-> maas.common.v1 tensors and signatures."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from maas.common.v1 import common_pb2

NUMPY_OF = {
    common_pb2.DATA_TYPE_BOOL: np.dtype("bool"),
    common_pb2.DATA_TYPE_UINT8: np.dtype("uint8"),
    common_pb2.DATA_TYPE_INT8: np.dtype("int8"),
    common_pb2.DATA_TYPE_INT16: np.dtype("int16"),
    common_pb2.DATA_TYPE_INT32: np.dtype("int32"),
    common_pb2.DATA_TYPE_INT64: np.dtype("int64"),
    common_pb2.DATA_TYPE_FP16: np.dtype("float16"),
    common_pb2.DATA_TYPE_FP32: np.dtype("float32"),
    common_pb2.DATA_TYPE_FP64: np.dtype("float64"),
}
PROTO_OF = {dtype: proto for proto, dtype in NUMPY_OF.items()}


def datatype(name: str) -> int:
    """"FP32" (or "fp32", "float32") -> common_pb2.DATA_TYPE_FP32."""
    key = name.upper()
    aliases = {"FLOAT32": "FP32", "FLOAT64": "FP64", "FLOAT16": "FP16", "FLOAT": "FP32"}
    try:
        return common_pb2.DataType.Value(f"DATA_TYPE_{aliases.get(key, key)}")
    except ValueError:
        raise ValueError(f"unknown datatype {name!r}; use FP32, FP64, INT64, ...") from None


def signature(
    inputs: Mapping[str, tuple[str, Sequence[int]]], outputs: Mapping[str, tuple[str, Sequence[int]]]
) -> common_pb2.Signature:
    """signature({"x": ("FP32", [64])}, {"logits": ("FP32", [10])}); shapes exclude the batch dim."""

    def specs(items: Mapping[str, tuple[str, Sequence[int]]]) -> list[common_pb2.TensorSpec]:
        return [common_pb2.TensorSpec(name=n, datatype=datatype(t), shape=list(s)) for n, (t, s) in items.items()]

    return common_pb2.Signature(inputs=specs(inputs), outputs=specs(outputs))


def to_tensor(name: str, array: np.ndarray) -> common_pb2.Tensor:
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":  # the wire is little-endian
        array = array.astype(array.dtype.newbyteorder("<"))
    try:
        proto = PROTO_OF[array.dtype]
    except KeyError:
        raise TypeError(f"{name}: numpy dtype {array.dtype} has no maas datatype") from None
    return common_pb2.Tensor(name=name, datatype=proto, shape=list(array.shape), raw=array.tobytes())


def from_tensor(tensor: common_pb2.Tensor) -> np.ndarray:
    dtype = NUMPY_OF.get(tensor.datatype)
    if dtype is None:
        raise TypeError(f"{tensor.name}: datatype {tensor.datatype} has no numpy equivalent here")
    return np.frombuffer(tensor.raw, dtype=dtype).reshape(tuple(tensor.shape))
