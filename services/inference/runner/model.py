"""The one generic Triton python-backend model: every deployment's model directory holds a copy.

It serves a TorchScript or ONNX artifact described by the parameters in config.pbtxt:
`artifact` (file name beside this one), `format` (TORCHSCRIPT or ONNX), `signature` (JSON: the
inputs and outputs with their datatypes, in the order the model takes them) and `device`
(AUTO, CPU or GPU). Nothing is ever unpickled: torch.jit.load and onnxruntime only.

Triton's dynamic batcher hands `execute` several requests at once; they are concatenated along
dim 0, run through the model once and split back, which is where batching pays. Each model
call runs under the deployment's execution limit (execution_limit.py, beside this file).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

# Signature datatypes (Open Inference Protocol names) this runner feeds to a model.
NUMPY_OF_DATATYPE = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        sys.path.insert(0, version_dir)  # execution_limit.py ships beside this file
        import execution_limit

        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.limit = execution_limit.ExecutionLimit.from_parameters(parameters)
        self.limit_exceeded = execution_limit.ExecutionLimitExceeded
        signature = json.loads(parameters["signature"])
        self.inputs = [(spec["name"], NUMPY_OF_DATATYPE[spec["datatype"]]) for spec in signature["inputs"]]
        self.outputs = [(spec["name"], NUMPY_OF_DATATYPE[spec["datatype"]]) for spec in signature["outputs"]]
        path = os.path.join(version_dir, parameters["artifact"])
        instances = sum(group.get("count", 1) for group in config.get("instance_group", [])) or 1
        # Instances, and replicas on other nodes of this host, are separate processes sharing its
        # cores: split the cores between them. More threads than cores make every parallel step
        # wait for a descheduled thread (measured: 16x slower with two replicas on 2 cores).
        sharing = instances * int(parameters.get("nodes_sharing_host", "1"))
        threads = max(1, (os.cpu_count() or 1) // sharing)
        wants_gpu = args.get("model_instance_kind") == "GPU" and parameters.get("device", "AUTO") != "CPU"
        if parameters["format"] == "TORCHSCRIPT":
            self.run = self._torchscript_runner(
                path, wants_gpu, args.get("model_instance_device_id", "0"), threads
            )
        elif parameters["format"] == "ONNX":
            self.run = self._onnx_runner(path, wants_gpu, args.get("model_instance_device_id", "0"), threads)
        else:
            raise pb_utils.TritonModelException(f"unsupported artifact format {parameters['format']!r}")

    def _torchscript_runner(self, path: str, wants_gpu: bool, device_id: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        device = torch.device(f"cuda:{device_id}" if wants_gpu and torch.cuda.is_available() else "cpu")
        module = torch.jit.load(path, map_location=device)
        module.eval()

        def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
            with torch.inference_mode():
                result = module(*(torch.from_numpy(array).to(device) for array in arrays))
            if isinstance(result, torch.Tensor):
                result = (result,)
            elif isinstance(result, dict):
                missing = [name for name, _ in self.outputs if name not in result]
                if missing:
                    raise ValueError(f"the model returned {sorted(result)}, the signature expects {missing}")
                result = tuple(result[name] for name, _ in self.outputs)
            return [tensor.detach().cpu().numpy() for tensor in result]

        return run

    def _onnx_runner(self, path: str, wants_gpu: bool, device_id: str, threads: int):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        providers: list = ["CPUExecutionProvider"]
        if wants_gpu and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device_id)}))
        session = onnxruntime.InferenceSession(path, sess_options=options, providers=providers)
        graph_inputs = [node.name for node in session.get_inputs()]
        graph_outputs = [node.name for node in session.get_outputs()]
        wanted_inputs = [name for name, _ in self.inputs]
        wanted_outputs = [name for name, _ in self.outputs]
        # The graph's own names when the signature uses them, else the graph's order.
        feed_names = wanted_inputs if set(wanted_inputs) <= set(graph_inputs) else graph_inputs
        fetch_names = wanted_outputs if set(wanted_outputs) <= set(graph_outputs) else graph_outputs
        if len(feed_names) != len(wanted_inputs):
            raise pb_utils.TritonModelException(
                f"the ONNX graph takes inputs {graph_inputs}, the signature declares {wanted_inputs}"
            )

        def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
            return session.run(fetch_names, dict(zip(feed_names, arrays, strict=True)))

        return run

    def execute(self, requests: list) -> list:
        try:
            per_request = [
                [pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name, _ in self.inputs]
                for request in requests
            ]
        except Exception as exc:  # every failure becomes an error response, never a dead stub
            return [_error_response(f"cannot read the inputs: {exc}") for _ in requests]
        # Inputs with dims of any size (-1) may differ between requests: those cannot be stacked.
        stackable = all(
            arrays[i].shape[1:] == per_request[0][i].shape[1:]
            for arrays in per_request
            for i in range(len(arrays))
        )
        if len(requests) > 1 and stackable:
            try:
                return self._execute_stacked(per_request)
            except self.limit_exceeded as exc:
                return [_error_response(str(exc), pb_utils.TritonError.INTERNAL) for _ in requests]
            except Exception:
                pass  # one request may be at fault: run them one by one below, so only it fails
        responses = []
        for arrays in per_request:
            try:
                responses.append(self._response(self._run_checked(arrays)))
            except self.limit_exceeded as exc:
                # The process is about to go: fail the rest too rather than run them.
                failed = _error_response(str(exc), pb_utils.TritonError.INTERNAL)
                return responses + [failed] * (len(requests) - len(responses))
            except Exception as exc:
                responses.append(_error_response(f"the model failed on this input: {exc}"))
        return responses

    def _execute_stacked(self, per_request: list[list[np.ndarray]]) -> list:
        sizes = [arrays[0].shape[0] for arrays in per_request]
        stacked = [np.concatenate([arrays[i] for arrays in per_request]) for i in range(len(self.inputs))]
        outputs = self._run_checked(stacked)
        for output in outputs:
            if output.ndim == 0 or output.shape[0] != sum(sizes):
                raise ValueError(f"an output has shape {list(output.shape)}; its first dim must be the batch")
        offsets = np.cumsum(sizes)[:-1]
        split = [np.split(output, offsets) for output in outputs]
        return [self._response([parts[index] for parts in split]) for index in range(len(sizes))]

    def _run_checked(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        outputs = self.limit.call(
            self.run,
            [np.ascontiguousarray(array, dtype=dtype) for array, (_, dtype) in zip(arrays, self.inputs, strict=True)],
        )
        if len(outputs) != len(self.outputs):
            raise ValueError(
                f"the model returned {len(outputs)} outputs, the signature declares {len(self.outputs)}"
            )
        return outputs

    def _response(self, outputs: list[np.ndarray]):
        tensors = [
            pb_utils.Tensor(name, np.ascontiguousarray(array, dtype=dtype))
            for (name, dtype), array in zip(self.outputs, outputs, strict=True)
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)


def _error_response(message: str, code=None):
    # By default the caller's to fix: errors in a request's values (an index out of range, ...).
    code = pb_utils.TritonError.INVALID_ARG if code is None else code
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message[:2000], code))
