"""Sentence embeddings on Triton, written once for the gateway (its direct Embed) and the inference
service (its own Embed): validation of the texts, the requests to Triton and the merge of its answers.

An embedding model (runner/embed.py, imported with `maas models import-pretrained`) has one BYTES
input ([n, 1] strings) and two outputs in signature order: the vectors (FP32 [n, dimensions]) and
the tokens each string was read as (INT64 [n, 1]). A call with more texts than the deployment's
max_batch_size is sent as several requests at once, which Triton's dynamic batcher may join again.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from maas.common.v1 import common_pb2
from maas.inference.v1 import inference_pb2
from tritonclient.grpc import service_pb2

from services.common.errors import FailedPrecondition, InvalidArgument

MAX_TEXTS = 256
# All texts of one call together, UTF-8: the model reads at most a few hundred tokens of each anyway.
MAX_TOTAL_BYTES = 1 << 20


def check_texts(texts: Sequence[str]) -> list[bytes]:
    """The texts as UTF-8, or INVALID_ARGUMENT saying which one is wrong."""
    if not texts:
        raise InvalidArgument(f"texts is empty: send 1 to {MAX_TEXTS} strings")
    if len(texts) > MAX_TEXTS:
        raise InvalidArgument(f"{len(texts)} texts is too many: send at most {MAX_TEXTS} per call")
    encoded = []
    total = 0
    for index, text in enumerate(texts):
        if not text:
            raise InvalidArgument(f"texts[{index}] is empty: every text needs at least one character")
        data = text.encode("utf-8")
        total += len(data)
        if total > MAX_TOTAL_BYTES:
            raise InvalidArgument(
                f"the texts add up to more than {MAX_TOTAL_BYTES} bytes of UTF-8: split them across calls"
            )
        encoded.append(data)
    return encoded


@dataclass(frozen=True)
class EmbeddingModel:
    """Tensor names of an embedding deployment, read from its signature."""

    text: str
    vectors: str
    tokens: str

    @classmethod
    def of(cls, deployment: str, signature: common_pb2.Signature) -> EmbeddingModel:
        inputs, outputs = signature.inputs, signature.outputs
        if (
            len(inputs) != 1
            or inputs[0].datatype != common_pb2.DATA_TYPE_BYTES
            or len(outputs) != 2
            or outputs[0].datatype != common_pb2.DATA_TYPE_FP32
            or outputs[1].datatype != common_pb2.DATA_TYPE_INT64
        ):
            raise FailedPrecondition(
                f"deployment {deployment!r} is marked as an embedding model but its signature is not "
                "(BYTES text -> FP32 vectors, INT64 tokens): import it with `maas models import-pretrained`"
            )
        return cls(inputs[0].name, outputs[0].name, outputs[1].name)

    def requests(
        self, texts: list[bytes], triton_model: str, max_batch_size: int, request_id: str = ""
    ) -> list[service_pb2.ModelInferRequest]:
        """ModelInfer requests for `texts`, at most max_batch_size texts each, in order."""
        step = max(1, max_batch_size)
        requests = []
        for start in range(0, len(texts), step):
            chunk = texts[start : start + step]
            request = service_pb2.ModelInferRequest(model_name=triton_model, id=request_id)
            request.inputs.add(name=self.text, datatype="BYTES", shape=[len(chunk), 1])
            request.outputs.add(name=self.vectors)
            request.outputs.add(name=self.tokens)
            # Triton's raw BYTES layout: each element as a 4-byte little-endian length, then its bytes.
            request.raw_input_contents.append(b"".join(struct.pack("<I", len(t)) + t for t in chunk))
            requests.append(request)
        return requests

    def response(
        self, answers: Sequence[service_pb2.ModelInferResponse], model: str, version: int
    ) -> inference_pb2.EmbedResponse:
        """One EmbedResponse from the answers to `requests`, in the same order."""
        vectors: list[bytes] = []
        rows = dimensions = tokens = 0
        for answer in answers:
            outputs = {tensor.name: index for index, tensor in enumerate(answer.outputs)}
            if self.vectors not in outputs or self.tokens not in outputs:
                raise RuntimeError(
                    f"the embedding model answered {sorted(outputs)}, "
                    f"not {self.vectors!r} and {self.tokens!r}"
                )
            shape = answer.outputs[outputs[self.vectors]].shape
            if len(shape) != 2 or (dimensions and shape[1] != dimensions):
                raise RuntimeError(f"the embedding model answered vectors of shape {list(shape)}")
            rows, dimensions = rows + shape[0], shape[1]
            vectors.append(answer.raw_output_contents[outputs[self.vectors]])
            tokens += int(np.frombuffer(answer.raw_output_contents[outputs[self.tokens]], dtype="<i8").sum())
        return inference_pb2.EmbedResponse(
            embeddings=common_pb2.Tensor(
                name=self.vectors,
                datatype=common_pb2.DATA_TYPE_FP32,
                shape=[rows, dimensions],
                raw=b"".join(vectors),
            ),
            prompt_tokens=tokens,
            model=model,
            version=version,
        )
