"""A stand-in for an embedding model's Triton answers in unit tests: each text's vector is a
deterministic function of the text, its token count the number of words plus two (like BERT's
[CLS] and [SEP])."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
from maas.common.v1 import common_pb2
from tritonclient.grpc import service_pb2

DIMENSIONS = 4


def embedding_signature(dimensions: int = DIMENSIONS) -> common_pb2.Signature:
    return common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="text", datatype=common_pb2.DATA_TYPE_BYTES, shape=[1])],
        outputs=[
            common_pb2.TensorSpec(name="embedding", datatype=common_pb2.DATA_TYPE_FP32, shape=[dimensions]),
            common_pb2.TensorSpec(name="tokens", datatype=common_pb2.DATA_TYPE_INT64, shape=[1]),
        ],
    )


def vector_of(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    vector = np.random.default_rng(seed).standard_normal(DIMENSIONS).astype(np.float32)
    return vector / np.linalg.norm(vector)


def tokens_of(text: str) -> int:
    return len(text.split()) + 2


def texts_of(request: service_pb2.ModelInferRequest) -> list[str]:
    raw, texts, offset = request.raw_input_contents[0], [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        texts.append(raw[offset + 4 : offset + 4 + length].decode())
        offset += 4 + length
    return texts


def embedding_answer(request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
    texts = texts_of(request)
    response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
    response.outputs.add(name="embedding", datatype="FP32", shape=[len(texts), DIMENSIONS])
    response.raw_output_contents.append(np.stack([vector_of(t) for t in texts]).tobytes())
    response.outputs.add(name="tokens", datatype="INT64", shape=[len(texts), 1])
    response.raw_output_contents.append(np.array([tokens_of(t) for t in texts], dtype="<i8").tobytes())
    return response
