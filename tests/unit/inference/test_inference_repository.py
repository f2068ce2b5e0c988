"""config.pbtxt generation and the atomic model directory writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from maas.common.v1 import common_pb2
from tritonclient.grpc import model_config_pb2

from services.inference.repository import ModelRepository, ModelSpec, config_text

FP32, INT64 = common_pb2.DATA_TYPE_FP32, common_pb2.DATA_TYPE_INT64


def spec(**changes) -> ModelSpec:
    signature = common_pb2.Signature(
        inputs=[
            common_pb2.TensorSpec(name="pixels", datatype=FP32, shape=[1, 28, 28]),
            common_pb2.TensorSpec(name="ids", datatype=INT64, shape=[-1]),
        ],
        outputs=[
            common_pb2.TensorSpec(name="logits", datatype=FP32, shape=[10]),
            common_pb2.TensorSpec(name="score", datatype=FP32, shape=[]),
        ],
    )
    values = dict(
        triton_model="m_0123abcd",
        format="TORCHSCRIPT",
        sha256="ab" * 32,
        signature=signature,
        max_batch_size=8,
        instances=2,
        device="AUTO",
        on_gpu=False,
    )
    values.update(changes)
    return ModelSpec(**values)


def parsed(text: str) -> model_config_pb2.ModelConfig:
    """Parse with Triton's own ModelConfig message: what Triton will read."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_config_describes_batching_instances_and_tensors():
    config = parsed(config_text(spec()))
    assert (config.name, config.backend, config.max_batch_size) == ("m_0123abcd", "python", 8)
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [
        ("pixels", "TYPE_FP32", [1, 28, 28]),
        ("ids", "TYPE_INT64", [-1]),
    ]
    logits, score = config.output
    assert (logits.name, list(logits.dims)) == ("logits", [10])
    # A scalar per sample: Triton wants a dim, so [1] reshaped to [].
    assert (score.name, list(score.dims), list(score.reshape.shape)) == ("score", [1], [])
    (group,) = config.instance_group
    assert (group.count, model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind)) == (2, "KIND_CPU")
    assert config.dynamic_batching.max_queue_delay_microseconds == 100


def test_config_carries_the_runners_parameters():
    parameters = {k: v.string_value for k, v in parsed(config_text(spec(format="ONNX"))).parameters.items()}
    assert parameters["artifact"] == "model.onnx"
    assert parameters["format"] == "ONNX"
    assert parameters["device"] == "AUTO"
    assert parameters["sha256"] == "ab" * 32
    assert json.loads(parameters["signature"]) == {
        "inputs": [
            {"name": "pixels", "datatype": "FP32", "shape": [1, 28, 28]},
            {"name": "ids", "datatype": "INT64", "shape": [-1]},
        ],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [10]},
            {"name": "score", "datatype": "FP32", "shape": []},
        ],
    }


def test_gpu_placement_is_a_gpu_instance_group():
    (group,) = parsed(config_text(spec(on_gpu=True, device="GPU"))).instance_group
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_GPU"


def test_config_text_is_exactly_this():
    one_tensor = common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="x", datatype=FP32, shape=[4])],
        outputs=[common_pb2.TensorSpec(name="y", datatype=FP32, shape=[3])],
    )
    text = config_text(spec(signature=one_tensor, instances=1, sha256="00" * 32))
    assert text.startswith(
        'name: "m_0123abcd"\n'
        'backend: "python"\n'
        "max_batch_size: 8\n"
        'input [\n  {\n    name: "x"\n    data_type: TYPE_FP32\n    dims: [ 4 ]\n  }\n]\n'
        'output [\n  {\n    name: "y"\n    data_type: TYPE_FP32\n    dims: [ 3 ]\n  }\n]\n'
        "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
        "dynamic_batching {\n  max_queue_delay_microseconds: 100\n}\n"
        'parameters: {\n  key: "artifact"\n  value: { string_value: "model.pt" }\n}\n'
    )


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    path = tmp_path / "cache" / ("ab" * 32)
    path.parent.mkdir()
    path.write_bytes(b"artifact")
    return path


def test_write_builds_the_directory_and_links_the_artifact(tmp_path: Path, artifact: Path):
    repository = ModelRepository(tmp_path / "models", tmp_path / "staging")
    assert repository.write(spec(), artifact)
    model_dir = tmp_path / "models" / "m_0123abcd"
    assert (model_dir / "config.pbtxt").read_text() == config_text(spec())
    assert (model_dir / "1" / "model.pt").read_bytes() == b"artifact"
    assert (model_dir / "1" / "model.pt").stat().st_ino == artifact.stat().st_ino  # hard link, no copy
    assert "class TritonPythonModel" in (model_dir / "1" / "model.py").read_text()
    assert list((tmp_path / "staging").iterdir()) == []
    assert repository.names() == {"m_0123abcd"}


def test_write_is_a_no_op_when_the_directory_already_holds_the_spec(tmp_path: Path, artifact: Path):
    repository = ModelRepository(tmp_path / "models", tmp_path / "staging")
    assert repository.write(spec(), artifact)
    assert not repository.write(spec(), artifact)
    assert repository.write(spec(instances=4), artifact)
    assert "count: 4" in (tmp_path / "models" / "m_0123abcd" / "config.pbtxt").read_text()
    assert list((tmp_path / "staging").iterdir()) == []


def test_a_failed_write_leaves_the_old_directory_and_no_debris(tmp_path: Path, artifact: Path):
    repository = ModelRepository(tmp_path / "models", tmp_path / "staging")
    repository.write(spec(), artifact)
    with pytest.raises(OSError):
        repository.write(spec(instances=3), tmp_path / "missing-artifact")
    assert "count: 2" in (tmp_path / "models" / "m_0123abcd" / "config.pbtxt").read_text()
    assert list((tmp_path / "staging").iterdir()) == []


def test_remove_and_clear_staging(tmp_path: Path, artifact: Path):
    repository = ModelRepository(tmp_path / "models", tmp_path / "staging")
    repository.write(spec(), artifact)
    (tmp_path / "staging" / "m_crashed-1234").mkdir()
    repository.clear_staging()
    repository.remove("m_0123abcd")
    repository.remove("m_never_written")
    assert repository.names() == set()
    assert list((tmp_path / "staging").iterdir()) == []
