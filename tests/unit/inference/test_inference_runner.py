"""The generic runner (runner/model.py) outside Triton, with a stand-in for triton_python_backend_utils."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from services.inference.repository import RUNNER

# torch marks TorchScript deprecated; it is still the registry's format.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*")


class Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name = name
        self.array = array

    def as_numpy(self) -> np.ndarray:
        return self.array


class InferenceResponse:
    def __init__(self, output_tensors, error=None) -> None:
        self.outputs = {tensor.name: tensor.array for tensor in output_tensors}
        self.error = error


class TritonError:
    INVALID_ARG = 3

    def __init__(self, message: str, code: int = 0) -> None:
        self.message = message
        self.code = code


class Request:
    def __init__(self, **inputs: np.ndarray) -> None:
        self.inputs = {name: Tensor(name, array) for name, array in inputs.items()}


@pytest.fixture
def runner_class(monkeypatch):
    utils = types.ModuleType("triton_python_backend_utils")
    utils.Tensor = Tensor
    utils.InferenceResponse = InferenceResponse
    utils.TritonError = TritonError
    utils.TritonModelException = type("TritonModelException", (Exception,), {})
    utils.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    spec = importlib.util.spec_from_file_location("maas_runner_under_test", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TritonPythonModel


def make_runner(runner_class, directory: Path, artifact: str, fmt: str, inputs, outputs, instances: int = 1):
    signature = {
        "inputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in inputs],
        "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in outputs],
    }
    parameters = {"artifact": artifact, "format": fmt, "device": "AUTO", "signature": json.dumps(signature)}
    config = {
        "parameters": {key: {"string_value": value} for key, value in parameters.items()},
        "instance_group": [{"count": instances, "kind": "KIND_CPU"}],
    }
    runner = runner_class()
    runner.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(directory),
            "model_version": "1",
            "model_instance_kind": "CPU",
            "model_instance_device_id": "0",
        }
    )
    calls = []
    run = runner.run
    runner.run = lambda arrays: calls.append([a.shape for a in arrays]) or run(arrays)
    return runner, calls


@pytest.fixture
def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()


def save_scripted(module: torch.nn.Module, directory: Path) -> None:
    (directory / "1").mkdir(exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module).save(str(directory / "1" / "model.pt"))


def test_requests_are_batched_into_one_forward_and_split_back(runner_class, mlp, tmp_path):
    save_scripted(mlp, tmp_path)
    runner, calls = make_runner(
        runner_class, tmp_path, "model.pt", "TORCHSCRIPT", [("x", "FP32", [4])], [("y", "FP32", [3])]
    )
    batches = [np.random.rand(n, 4).astype(np.float32) for n in (1, 2, 3)]
    responses = runner.execute([Request(x=batch) for batch in batches])
    assert calls == [[(6, 4)]]  # one forward for all three requests
    for batch, response in zip(batches, responses, strict=True):
        assert response.error is None
        with torch.inference_mode():
            expected = mlp(torch.from_numpy(batch)).numpy()
        np.testing.assert_allclose(response.outputs["y"], expected, rtol=1e-5, atol=1e-6)


class TwoHeads(torch.nn.Module):
    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"total": (x * scale).sum(dim=1), "twice": x * 2}


def test_dict_outputs_map_to_the_signatures_names_and_dtypes(runner_class, tmp_path):
    save_scripted(TwoHeads(), tmp_path)
    runner, _ = make_runner(
        runner_class,
        tmp_path,
        "model.pt",
        "TORCHSCRIPT",
        [("x", "FP32", [2]), ("scale", "FP32", [1])],
        [("twice", "FP64", [2]), ("total", "FP32", [])],
    )
    x = np.array([[1, 2], [3, 4]], dtype=np.float32)
    (response,) = runner.execute([Request(x=x, scale=np.array([[1], [10]], dtype=np.float32))])
    np.testing.assert_array_equal(response.outputs["total"], [3, 70])
    assert response.outputs["twice"].dtype == np.float64


class Picky(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise ValueError("negative input")
        return x


def test_a_failing_request_gets_an_error_and_its_batch_mates_their_answers(runner_class, tmp_path):
    save_scripted(Picky(), tmp_path)
    runner, calls = make_runner(
        runner_class, tmp_path, "model.pt", "TORCHSCRIPT", [("x", "FP32", [1])], [("y", "FP32", [1])]
    )
    good, bad = np.ones((1, 1), np.float32), -np.ones((2, 1), np.float32)
    first, second = runner.execute([Request(x=good), Request(x=bad)])
    assert calls == [[(3, 1)], [(1, 1)], [(2, 1)]]  # the batch failed, so each ran alone
    np.testing.assert_array_equal(first.outputs["y"], good)
    assert first.error is None
    assert second.error.code == TritonError.INVALID_ARG and "negative input" in second.error.message


def test_inputs_of_different_variable_sizes_run_one_by_one(runner_class, tmp_path):
    save_scripted(torch.nn.Identity(), tmp_path)
    runner, calls = make_runner(
        runner_class, tmp_path, "model.pt", "TORCHSCRIPT", [("x", "INT64", [-1])], [("y", "INT64", [-1])]
    )
    responses = runner.execute([Request(x=np.ones((1, 3), np.int64)), Request(x=np.ones((1, 5), np.int64))])
    assert calls == [[(1, 3)], [(1, 5)]]
    assert [r.outputs["y"].shape for r in responses] == [(1, 3), (1, 5)]


def test_onnx_artifacts_run_through_onnxruntime(runner_class, mlp, tmp_path):
    (tmp_path / "1").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            mlp,
            (torch.zeros(1, 4),),
            str(tmp_path / "1" / "model.onnx"),
            dynamo=False,
            input_names=["features"],
            output_names=["scores"],
            dynamic_axes={"features": {0: "batch"}, "scores": {0: "batch"}},
        )
    # The signature may name tensors differently from the graph: then the graph's order is used.
    runner, calls = make_runner(
        runner_class, tmp_path, "model.onnx", "ONNX", [("x", "FP32", [4])], [("y", "FP32", [3])]
    )
    batches = [np.random.rand(n, 4).astype(np.float32) for n in (2, 5)]
    responses = runner.execute([Request(x=batch) for batch in batches])
    assert calls == [[(7, 4)]]
    for batch, response in zip(batches, responses, strict=True):
        with torch.inference_mode():
            expected = mlp(torch.from_numpy(batch)).numpy()
        np.testing.assert_allclose(response.outputs["y"], expected, rtol=1e-5, atol=1e-6)
