"""`maas datasets` and the Client's dataset methods through the real gateway in front of the real
registry: iris as CSV uploaded (the dataset created on the way), listed, downloaded whole and
checked; refused files leave no version; readers list but neither upload nor download; tables
keep ids whole at 80 columns, every list and get has --json. A stand-in registry that lies about
a version's sha256 shows that a corrupted download writes nothing."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from maas import client as client_module
from maas.cli import _shared, app
from maas.client import Client
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from rich import filesize
from sklearn.datasets import load_iris
from typer.testing import CliRunner, Result

from services.common.server import running
from services.registry.config import RegistrySettings
from services.registry.server import create_app as create_registry
from tests.unit.gateway.gateway_fakes import TOKEN, Stack, gateway_stack

CHUNK = 1024  # small chunks both ways: the iris CSV (4.5 kB) travels in several


def iris_csv(rows: slice = slice(None)) -> bytes:
    """scikit-learn's iris as CSV: four measurements and the species' name."""
    iris = load_iris()
    lines = ["sepal_length,sepal_width,petal_length,petal_width,species"]
    for features, target in zip(iris.data[rows], iris.target[rows], strict=True):
        lines.append(",".join(f"{value:g}" for value in features) + f",{iris.target_names[target]}")
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture
async def stack(tmp_path, monkeypatch) -> AsyncIterator[Stack]:
    """The gateway (tenants acme and other, a key per role) in front of a real registry."""
    monkeypatch.setattr(client_module, "CHUNK_BYTES", CHUNK)
    monkeypatch.setattr(_shared.errors, "_width", 400)
    settings = RegistrySettings(
        home=tmp_path / "registry", registry_addr="127.0.0.1:0", internal_token=TOKEN, registry_chunk_bytes=CHUNK
    )
    async with running(await create_registry(settings)) as registry:
        async with gateway_stack(tmp_path / "gateway", registry_addr=f"127.0.0.1:{registry.port}") as started:
            yield started


async def maas(stack: Stack, who: str, *args: str) -> Result:
    """The CLI as `who` (off the event loop, which serves the gateway and the registry)."""
    address = f"127.0.0.1:{stack.port}"
    return await asyncio.to_thread(
        CliRunner().invoke, app, [*args, "--api-key", stack.keys[who], "--address", address]
    )


def said(result: Result) -> str:
    """The output as one line of words: a usage error's box wraps its message at 80 columns."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())


def sdk(stack: Stack, who: str) -> Client:
    return Client(f"127.0.0.1:{stack.port}", stack.keys[who])


async def test_upload_creates_the_dataset_then_versions_list_and_download_whole(stack: Stack, tmp_path) -> None:
    first, second = tmp_path / "iris.csv", tmp_path / "iris-v2.csv"
    first.write_bytes(iris_csv(slice(0, 150, 2)))
    second.write_bytes(iris_csv())

    uploaded = await maas(stack, "developer", "datasets", "upload", "iris", str(first), "--target-column", "species",
                          "--description", "Fisher's iris, half")
    assert uploaded.exit_code == 0, uploaded.output
    assert "created dataset iris (csv, target column 'species')" in uploaded.output
    assert "uploading iris.csv" in uploaded.output and "iris version 1 ready" in uploaded.output
    again = await maas(stack, "developer", "datasets", "upload", "iris", str(second))
    assert again.exit_code == 0 and "created" not in again.output and "iris version 2 ready" in again.output

    listed = await maas(stack, "reader", "datasets", "versions", "iris", "--json")
    versions = json.loads(listed.output)
    assert [(v["version"], v["sizeBytes"]) for v in versions] == [
        ("1", str(first.stat().st_size)), ("2", str(second.stat().st_size))
    ]
    got = json.loads((await maas(stack, "reader", "datasets", "get", "iris", "--json")).output)
    assert (got["format"], got["targetColumn"], got["latestVersion"]) == ("DATASET_FORMAT_CSV", "species", "2")

    target = tmp_path / "out" / "iris.csv"
    target.parent.mkdir()
    downloaded = await maas(stack, "developer", "datasets", "download", "iris", "2", "-o", str(target))
    assert downloaded.exit_code == 0, downloaded.output
    assert "downloading iris version 2" in downloaded.output and "checked" in downloaded.output
    assert target.read_bytes() == second.read_bytes()
    assert [p.name for p in target.parent.iterdir()] == ["iris.csv"]  # no partial file left
    nowhere = await maas(stack, "developer", "datasets", "download", "iris", "2", "-o", str(tmp_path / "no" / "x.csv"))
    assert nowhere.exit_code == 1 and f"cannot write {tmp_path / 'no' / 'x.csv'}: No such file" in said(nowhere)

    # The SDK alike, with the progress it reports; the other tenant sees none of it.
    seen: list[tuple[int, int]] = []
    with sdk(stack, "developer") as developer:
        record = await asyncio.to_thread(
            developer.download_dataset_version, "iris", 1, tmp_path / "v1.csv",
            progress=lambda n, total: seen.append((n, total)),
        )
    assert (tmp_path / "v1.csv").read_bytes() == first.read_bytes() and record.sha256 == versions[0]["sha256"]
    assert sum(n for n, _ in seen) == first.stat().st_size and len(seen) > 1
    assert {total for _, total in seen} == {first.stat().st_size}
    with sdk(stack, "other") as other:
        assert await asyncio.to_thread(other.list_datasets) == []


async def test_a_refused_file_leaves_no_version_and_says_why(stack: Stack, tmp_path) -> None:
    good, junk = tmp_path / "iris.csv", tmp_path / "junk.csv"
    good.write_bytes(iris_csv())
    junk.write_bytes(b"\xff\xfe\x00\x01" + np.random.default_rng(0).bytes(4000))
    assert (await maas(stack, "developer", "datasets", "upload", "iris", str(good),
                       "--target-column", "species")).exit_code == 0

    refused = await maas(stack, "developer", "datasets", "upload", "iris", str(junk))
    assert refused.exit_code == 1
    assert "INVALID_ARGUMENT: the CSV file must be UTF-8 text with a header row" in refused.output
    no_target = tmp_path / "no-target.csv"
    no_target.write_text("a,b\n1,2\n")
    refused = await maas(stack, "developer", "datasets", "upload", "iris", str(no_target))
    assert refused.exit_code == 1 and "target column 'species' is missing" in refused.output
    # Named the other format, or another target column: refused before a byte is sent.
    arrays = tmp_path / "iris.npz"
    np.savez(arrays, X=np.zeros((3, 4)), y=np.zeros(3))
    for args in ((str(arrays),), (str(good), "--target-column", "petal_width")):
        mismatch = await maas(stack, "developer", "datasets", "upload", "iris", *args)
        assert mismatch.exit_code == 1 and "dataset 'iris' exists as csv with target column 'species'" in (
            mismatch.output), mismatch.output
    with sdk(stack, "developer") as developer:
        assert [v.version for v in await asyncio.to_thread(developer.list_dataset_versions, "iris")] == [1]

    # A first upload refused: the dataset it created stays, empty, and the command says so.
    created = await maas(stack, "developer", "datasets", "upload", "junk", str(junk), "--target-column", "y")
    assert created.exit_code == 1 and "created dataset junk" in created.output
    assert "stays, without versions: the registry has no delete for datasets" in created.output
    with sdk(stack, "developer") as developer:
        assert (await asyncio.to_thread(developer.get_dataset, "junk")).latest_version == 0


async def test_what_upload_needs_to_create_a_dataset(stack: Stack, tmp_path) -> None:
    csv_file, text = tmp_path / "iris.csv", tmp_path / "iris.txt"
    csv_file.write_bytes(iris_csv())
    text.write_bytes(iris_csv())
    no_target = await maas(stack, "developer", "datasets", "upload", "iris", str(csv_file))
    assert no_target.exit_code == 2 and "to create it, give --target-column, the CSV header" in said(no_target)
    no_format = await maas(stack, "developer", "datasets", "upload", "iris", str(text), "--target-column", "species")
    assert no_format.exit_code == 2 and "suffix of iris.txt names no format: give --format" in said(no_format)
    not_created = await maas(stack, "developer", "datasets", "upload", "iris", str(csv_file), "--no-create")
    assert not_created.exit_code == 1 and "NOT_FOUND" in not_created.output
    unknown = await maas(stack, "developer", "datasets", "create", "iris", "--format", "parquet")
    assert unknown.exit_code == 2 and "--format must be one of csv, npz, not 'parquet'" in said(unknown)
    assert (await maas(stack, "developer", "datasets", "list", "--json")).output.strip() == "[]"

    # NPZ by its suffix, then a text file into a CSV dataset made with `create`.
    arrays = tmp_path / "digits.npz"
    np.savez(arrays, X=np.ones((5, 64), np.float32), y=np.arange(5))
    npz = await maas(stack, "developer", "datasets", "upload", "digits", str(arrays))
    assert npz.exit_code == 0 and "created dataset digits (npz)" in npz.output, npz.output
    made = await maas(stack, "developer", "datasets", "create", "iris", "--target-column", "species")
    assert made.exit_code == 0 and "created dataset iris (csv, target column 'species')" in made.output
    into = await maas(stack, "developer", "datasets", "upload", "iris", str(text))
    assert into.exit_code == 0 and "iris version 1 ready" in into.output


async def test_readers_list_but_neither_upload_nor_download(stack: Stack, tmp_path) -> None:
    data = tmp_path / "iris.csv"
    data.write_bytes(iris_csv())
    with sdk(stack, "developer") as developer:
        await asyncio.to_thread(developer.upload_dataset_version, "iris", data, format="csv", target_column="species")
    listed = await maas(stack, "reader", "datasets", "list")
    assert listed.exit_code == 0 and "iris" in listed.output
    upload = await maas(stack, "reader", "datasets", "upload", "iris", str(data))
    assert upload.exit_code == 1 and "PERMISSION_DENIED" in upload.output
    create = await maas(stack, "reader", "datasets", "upload", "rows", str(data), "--target-column", "species")
    assert create.exit_code == 1 and "PERMISSION_DENIED" in create.output
    target = tmp_path / "copy.csv"
    download = await maas(stack, "reader", "datasets", "download", "iris", "1", "-o", str(target))
    assert download.exit_code == 1 and "PERMISSION_DENIED" in download.output
    assert not list(tmp_path.glob("copy.csv*"))
    with sdk(stack, "developer") as developer:
        assert [v.version for v in await asyncio.to_thread(developer.list_dataset_versions, "iris")] == [1]
        assert [d.name for d in await asyncio.to_thread(developer.list_datasets)] == ["iris"]


async def test_delete_takes_a_developer_is_audited_and_leaves_other_tenants_alone(stack: Stack, tmp_path) -> None:
    data = tmp_path / "iris.csv"
    data.write_bytes(iris_csv())
    for who in ("developer", "other"):
        with sdk(stack, who) as owner:
            await asyncio.to_thread(owner.upload_dataset_version, "iris", data, format="csv", target_column="species")
    denied = await maas(stack, "reader", "datasets", "delete", "iris")
    assert denied.exit_code == 1 and "PERMISSION_DENIED" in denied.output
    deleted = await maas(stack, "developer", "datasets", "delete", "iris")
    assert deleted.exit_code == 0 and "deleted dataset iris" in deleted.output, deleted.output
    again = await maas(stack, "developer", "datasets", "delete", "iris")
    assert again.exit_code == 1 and "NOT_FOUND: dataset 'iris' not found" in said(again)
    with sdk(stack, "developer") as developer:
        assert await asyncio.to_thread(developer.list_datasets) == []
    with sdk(stack, "other") as other:
        assert [v.version for v in await asyncio.to_thread(other.list_dataset_versions, "iris")] == [1]
    with sdk(stack, "admin") as admin:
        events = await asyncio.to_thread(admin.list_audit_events, method="DeleteDataset")
    assert [(e.resource, e.code) for e in events] == [
        ("iris", "NOT_FOUND"), ("iris", "OK"), ("", "PERMISSION_DENIED")
    ]


async def test_tables_keep_ids_whole_and_print_server_text_as_it_is(stack: Stack, tmp_path, monkeypatch) -> None:
    name = "iris-measurements-gaspe-peninsula-1935"
    hostile = "[red]red[/] [bold]bold[/bold] [batch, 64] a description long enough to wrap at eighty columns"
    data = tmp_path / "iris.csv"
    data.write_bytes(iris_csv())
    for version in (1, 2):
        result = await maas(stack, "developer", "datasets", "upload", name, str(data),
                            "--target-column", "petal_width", "--description", hostile)
        assert result.exit_code == 0 and f"version {version} ready" in result.output, result.output
    monkeypatch.setattr(_shared.console, "_width", 80)
    for command in (("list",), ("get", name)):
        table = await maas(stack, "reader", "datasets", *command)
        assert table.exit_code == 0, table.output
        assert name in table.output and "petal_width" in table.output and "…" not in table.output
        assert max(len(line) for line in table.output.splitlines()) <= 80
    versions = await maas(stack, "reader", "datasets", "versions", name)
    rows = [line.split() for line in versions.output.splitlines()[2:]]
    with sdk(stack, "developer") as developer:
        records = await asyncio.to_thread(developer.list_dataset_versions, name)
    assert [row[:4] for row in rows] == [
        [str(r.version), *filesize.decimal(r.size_bytes).split(), r.sha256[:12]] for r in records
    ]
    assert len(rows) == 2 and max(len(line) for line in versions.output.splitlines()) <= 80
    monkeypatch.setattr(_shared.console, "_width", 400)
    assert hostile in (await maas(stack, "reader", "datasets", "list")).output
    listed = json.loads((await maas(stack, "reader", "datasets", "list", "--json")).output)
    assert [(d["name"], d["description"]) for d in listed] == [(name, hostile)]


class LyingRegistry(registry_pb2_grpc.RegistryServiceServicer):
    """Sends a dataset version whose bytes do not match the sha256 it records."""

    def DownloadDatasetVersion(self, request, context):
        record = registry_pb2.DatasetVersion(dataset=request.dataset, version=request.version, sha256="0" * 64,
                                             size_bytes=6)
        yield registry_pb2.DownloadDatasetVersionResponse(version=record)
        yield registry_pb2.DownloadDatasetVersionResponse(chunk=b"abcdef")


@pytest.fixture
def lying_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(LyingRegistry(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setattr(_shared.errors, "_width", 400)
    monkeypatch.setattr(_shared, "tls_ca", None)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_a_download_that_does_not_match_its_sha256_writes_nothing(lying_registry: str, tmp_path: Path) -> None:
    target = tmp_path / "rows.csv"
    result = CliRunner().invoke(
        app, ["datasets", "download", "rows", "3", "-o", str(target)],
        env={"MAAS_API_KEY": "maas_test", "MAAS_GATEWAY_ADDR": lying_registry},
    )
    assert result.exit_code == 1
    assert "DATA_LOSS: version 3 of dataset 'rows' arrived as 6 bytes with sha256" in result.output
    assert f"{target} was not written" in result.output
    assert list(tmp_path.iterdir()) == []
