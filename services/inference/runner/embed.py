"""The Triton python-backend model for embedding deployments (copied in as model.py).

It serves an ONNX sentence encoder exported by `maas models import-pretrained` (sdk/maas/pretrained.py):
the graph takes input_ids and attention_mask (INT64 [batch, tokens]) and returns L2-normalised FP32
[batch, dimensions]; the tokenizer (tokenizer.json, truncation and padding configured) is stored in the
ONNX file's metadata_props, so the artifact is one file and nothing is unpickled.

Requests carry a BYTES tensor of UTF-8 strings ([n, 1]); each gets back its vectors and the number of
tokens each string was read as. Triton's dynamic batcher hands `execute` several requests at once: their
strings are tokenized and encoded together, then split back.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

TOKENIZER_PROP = "maas.tokenizer"
# Strings are encoded in chunks of similar length, so that one long text does not make every
# other row of a large batch pay for its padding.
CHUNK = 32


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        version_dir = os.path.join(args["model_repository"], args["model_version"])
        sys.path.insert(0, version_dir)  # execution_limit.py ships beside this file
        import execution_limit

        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.limit = execution_limit.ExecutionLimit.from_parameters(parameters)
        if parameters["format"] != "ONNX":
            raise pb_utils.TritonModelException(
                f"an embedding deployment needs an ONNX sentence encoder, not {parameters['format']}"
            )
        signature = json.loads(parameters["signature"])
        if len(signature["inputs"]) != 1 or len(signature["outputs"]) != 2:
            raise pb_utils.TritonModelException(
                "an embedding signature has one BYTES input and two outputs (vectors, token counts)"
            )
        self.input_name = signature["inputs"][0]["name"]
        self.vector_name, self.tokens_name = (spec["name"] for spec in signature["outputs"])
        path = os.path.join(version_dir, parameters["artifact"])
        instances = sum(group.get("count", 1) for group in config.get("instance_group", [])) or 1
        options = onnxruntime.SessionOptions()
        # Instances, and replicas on other nodes of this host, are separate processes sharing its
        # cores: split the cores between them.
        sharing = instances * int(parameters.get("nodes_sharing_host", "1"))
        options.intra_op_num_threads = max(1, (os.cpu_count() or 1) // sharing)
        # Idle threads sleep instead of spinning: Triton, the gateway and other models share these
        # cores, and spinning workers took CPU from them (2x slower single-text calls on a busy host).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = ["CPUExecutionProvider"]
        wants_gpu = args.get("model_instance_kind") == "GPU" and parameters.get("device", "AUTO") != "CPU"
        if wants_gpu and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            device_id = int(args.get("model_instance_device_id", "0"))
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        self.session = onnxruntime.InferenceSession(path, sess_options=options, providers=providers)
        metadata = self.session.get_modelmeta().custom_metadata_map
        if TOKENIZER_PROP not in metadata:
            raise pb_utils.TritonModelException(
                f"the ONNX file has no {TOKENIZER_PROP!r} metadata: "
                "import it with `maas models import-pretrained`"
            )
        self.tokenizer = Tokenizer.from_str(metadata[TOKENIZER_PROP])
        self.output = self.session.get_outputs()[0].name

    def embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors [n, dimensions] and token counts [n] for `texts`, in their order."""
        encodings = self.tokenizer.encode_batch(texts)
        counts = np.array([sum(e.attention_mask) for e in encodings], dtype=np.int64)
        order = np.argsort(counts, kind="stable")
        vectors: list[np.ndarray] = [np.empty(0)] * len(texts)
        for start in range(0, len(texts), CHUNK):
            rows = order[start : start + CHUNK]
            width = int(counts[rows].max())
            ids = np.array([encodings[i].ids[:width] for i in rows], dtype=np.int64)
            mask = np.array([encodings[i].attention_mask[:width] for i in rows], dtype=np.int64)
            (chunk,) = self.session.run([self.output], {"input_ids": ids, "attention_mask": mask})
            for row, vector in zip(rows, chunk, strict=True):
                vectors[row] = vector
        return np.stack(vectors).astype(np.float32, copy=False), counts

    def execute(self, requests: list) -> list:
        per_request: list[list[str] | Exception] = []
        for request in requests:
            try:
                array = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
                if array.size == 0:
                    raise ValueError("the request holds no texts")
                per_request.append([_text(item) for item in array.reshape(-1)])
            except Exception as exc:  # one bad request fails alone, never the batch or the stub
                per_request.append(exc)
        texts = [text for item in per_request if isinstance(item, list) for text in item]
        try:
            vectors, counts = self.limit.call(self.embed, texts) if texts else (np.empty((0, 0)), np.empty(0))
        except Exception as exc:  # ExecutionLimitExceeded among them: its message says so
            return [_error_response(f"the encoder failed: {exc}") for _ in requests]
        responses = []
        offset = 0
        for item in per_request:
            if isinstance(item, Exception):
                responses.append(_error_response(f"cannot read the texts: {item}"))
                continue
            end = offset + len(item)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor(self.vector_name, vectors[offset:end]),
                        pb_utils.Tensor(self.tokens_name, counts[offset:end].reshape(-1, 1)),
                    ]
                )
            )
            offset = end
        return responses


def _text(item: object) -> str:
    text = item.decode("utf-8") if isinstance(item, bytes) else str(item)
    if not text:
        raise ValueError("a text is empty")
    return text


def _error_response(message: str):
    return pb_utils.InferenceResponse(
        output_tensors=[], error=pb_utils.TritonError(message[:2000], pb_utils.TritonError.INVALID_ARG)
    )
