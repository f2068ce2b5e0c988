"""Issue 11's attack, end to end with the upload check switched off: a tenant's model that reads
any file it is told to (torch.from_file on a path sent as a UINT8 tensor) runs on the real stack,
and the Landlock fence around its Triton stub alone keeps every secret out of its reach."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import List  # noqa: UP035 (TorchScript needs typing.List)

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
from maas import Client
from maas.common.v1 import common_pb2
from maas.errors import ApiError
from tritonclient.utils import InferenceServerException

from services.common.channels import TRITON_TOKEN_HEADER
from services.stack.ephemeral import EphemeralStack
from tests.support.digits import SIGNATURE
from tests.support.tenants import developer_clients

pytestmark = pytest.mark.slow

PATH_BYTES = 256
READ_BYTES = 8


class FileReader(torch.nn.Module):
    def forward(self, path: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        codes: List[int] = path[0].to(torch.int64).tolist()  # noqa: UP006 (TorchScript needs List)
        name = ""
        for code in codes:
            if code != 0:
                name += chr(code)
        data = torch.from_file(name, shared=False, size=int(size[0][0]), dtype=torch.uint8)
        return data.unsqueeze(0)


READER_SIGNATURE = common_pb2.Signature(
    inputs=[
        common_pb2.TensorSpec(name="path", datatype=common_pb2.DATA_TYPE_UINT8, shape=[PATH_BYTES]),
        common_pb2.TensorSpec(name="size", datatype=common_pb2.DATA_TYPE_INT64, shape=[1]),
    ],
    outputs=[common_pb2.TensorSpec(name="data", datatype=common_pb2.DATA_TYPE_UINT8, shape=[-1])],
)


@pytest.fixture(scope="module")
def attack(tmp_path_factory, digits):
    """A stack whose registry skips the operator allowlist; tenant `mallory` deploys the reader,
    tenant `victim` an ordinary model whose file mallory goes after."""
    stack = EphemeralStack()
    stack.env["MAAS_REGISTRY_UNSAFE_SKIP_OPERATOR_CHECK"] = "true"
    with stack, developer_clients(stack, "mallory", "victim") as clients:
        reader_path = tmp_path_factory.mktemp("reader") / "reader.pt"
        torch.jit.script(FileReader()).save(str(reader_path))
        mallory, victim = clients["mallory"], clients["victim"]
        mallory.create_model("reader")
        mallory.upload_version("reader", reader_path, format="torchscript", signature=READER_SIGNATURE)
        mallory.create_deployment("reader", "reader", version=1, max_batch_size=1)
        victim.create_model("digits")
        victim.upload_version("digits", digits.path, format="torchscript", signature=SIGNATURE)
        victim.create_deployment("digits", "digits", version=1, max_batch_size=8)
        mallory.wait_ready("reader", timeout=240)
        victim.wait_ready("digits", timeout=240)
        yield stack, mallory, reader_path.read_bytes()


def read(client: Client, path: str) -> bytes:
    encoded = np.zeros((1, PATH_BYTES), np.uint8)
    encoded[0, : len(path.encode())] = list(path.encode())
    outputs = client.predict("reader", {"path": encoded, "size": np.array([[READ_BYTES]], np.int64)})
    return outputs["data"].tobytes()


def model_files(home: Path) -> list[Path]:
    return sorted((home / "inference" / "nodes" / "triton-0" / "models").glob("*/1/model.pt"))


def test_the_reader_reads_its_own_files(attack):
    """The control: the model really reads files, so the refusals below are the fence's doing."""
    stack, mallory, artifact = attack
    own = [path for path in model_files(stack.home) if path.read_bytes() == artifact]
    assert own, "the reader's own model file was not found under the model repository"
    assert read(mallory, str(own[0])) == artifact[:READ_BYTES]


def test_no_secret_database_or_other_tenants_file_is_in_reach(attack):
    stack, mallory, artifact = attack
    home = stack.home
    state = json.loads((home / "run" / "stack.json").read_text())
    pids = [child["pid"] for child in state["children"].values() if child["pid"]]
    pids.append(int((home / "inference" / "nodes" / "triton-0" / "triton.pid").read_text()))
    others = [path for path in model_files(home) if path.read_bytes() != artifact]
    assert others, "the victim's model file was not found"
    targets = [
        "admin.key",  # relative, as the attacker sent it: Triton's working directory held MAAS_HOME
        "internal.token",
        *(str(home / name) for name in ("admin.key", "internal.token", "triton.token", "redis.password", "kek")),
        *(str(path) for path in home.rglob("*.db")),
        *(str(path) for path in (home / "redis").rglob("*") if path.is_file()),
        *(str(path) for path in others),
        *(f"/proc/{pid}/environ" for pid in pids),
        "/proc/1/environ",
    ]
    leaked = {}
    for target in targets:
        secret = Path(target) if target.startswith("/") else home / target
        try:
            data = read(mallory, target)
        except ApiError as error:
            size = secret.stat().st_size if secret.is_file() and not target.startswith("/proc") else None
            # Neither the bytes nor the size of the file may come back in the error.
            if size is not None and (f"<{size}>" in error.details or f" {size} " in error.details):
                leaked[target] = f"size in error: {error.details[:200]}"
            continue
        leaked[target] = hashlib.sha256(data).hexdigest()[:12]
    assert not leaked, f"the fenced model read {leaked}"


def test_tritons_port_answers_nothing_but_health_without_the_token(attack):
    """Triton's loopback port ran a `file:1/model.py` override through RepositoryModelLoad and
    answered ModelInfer with no key; now each needs the token header, health does not."""
    stack, _, _ = attack
    triton = triton_grpc.InferenceServerClient(f"127.0.0.1:{stack.env['MAAS_TRITON_GRPC_PORT']}")
    assert triton.is_server_live()
    calls = {
        "ModelInfer": lambda: triton.infer("anything", [triton_grpc.InferInput("x", [1], "FP32")]),
        "RepositoryModelLoad": lambda: triton.load_model(
            "evil", config='{"backend": "python"}', files={"file:1/model.py": b"import os\nos.system('id')\n"}
        ),
        "RepositoryIndex": lambda: triton.get_model_repository_index(),
        "ModelMetadata": lambda: triton.get_model_metadata("anything"),
    }
    for name, call in calls.items():
        with pytest.raises(InferenceServerException, match="restricted"):
            print("calling", name)  # shown with the failure
            call()
    token = (stack.home / "triton.token").read_text().strip()
    index = triton.get_model_repository_index(headers={TRITON_TOKEN_HEADER: token})
    assert index.models, "with the token the repository index answers"
