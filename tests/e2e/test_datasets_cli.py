"""End to end through the real stack's gateway: a tenant's developer uploads scikit-learn's iris as
CSV with `maas datasets upload` (the dataset created on the way), adds a second version with more
rows, downloads it back byte for byte, and trains on it; a binary file sent as CSV is refused with
the reason and leaves no version; a reader key may list but not upload."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from maas import Client
from sklearn.datasets import load_iris

pytestmark = pytest.mark.slow
# Not "iris": a training job reads that name as the built-in dataset.
DATASET = "flowers"


def iris_csv(rows: slice) -> bytes:
    iris = load_iris()
    lines = ["sepal_length,sepal_width,petal_length,petal_width,species"]
    for features, target in zip(iris.data[rows], iris.target[rows], strict=True):
        lines.append(",".join(f"{value:g}" for value in features) + f",{iris.target_names[target]}")
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def keys(stack) -> dict[str, str]:
    with Client(stack.gateway, stack.admin_key) as admin:
        admin.create_tenant("botanists")
        return {role: admin.create_api_key("botanists", role)[1] for role in ("developer", "reader")}


def test_datasets_upload_list_download_train_and_refuse(stack, keys, tmp_path) -> None:
    def maas(role: str, *args: str):  # type: ignore[no-untyped-def]
        env = dict(stack.env, MAAS_API_KEY=keys[role], COLUMNS="200")
        return stack.maas(*args, env=env, check=False, timeout=120)

    def versions() -> list[dict]:
        listed = maas("reader", "datasets", "versions", DATASET, "--json")
        assert listed.returncode == 0, listed.stderr
        return json.loads(listed.stdout)

    first, second = tmp_path / "iris-half.csv", tmp_path / "iris.csv"
    first.write_bytes(iris_csv(slice(0, 150, 2)))
    second.write_bytes(iris_csv(slice(None)))

    uploaded = maas("developer", "datasets", "upload", DATASET, str(first), "--target-column", "species",
                    "--description", "Fisher's iris")
    assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
    assert f"created dataset {DATASET} (csv, target column 'species')" in uploaded.stdout
    assert f"{DATASET} version 1 ready" in uploaded.stdout
    (one,) = versions()
    assert (one["version"], one["sha256"]) == ("1", hashlib.sha256(first.read_bytes()).hexdigest())

    again = maas("developer", "datasets", "upload", DATASET, str(second))
    assert again.returncode == 0 and f"{DATASET} version 2 ready" in again.stdout, again.stdout + again.stderr
    assert [(v["version"], int(v["sizeBytes"])) for v in versions()] == [
        ("1", first.stat().st_size), ("2", second.stat().st_size)
    ]
    table = maas("reader", "datasets", "list")
    row = next(line.split() for line in table.stdout.splitlines() if line.startswith(DATASET))
    assert row[:4] == [DATASET, "csv", "species", "2"], table.stdout

    copy = tmp_path / "copy.csv"
    downloaded = maas("developer", "datasets", "download", DATASET, "2", "-o", str(copy))
    assert downloaded.returncode == 0, downloaded.stdout + downloaded.stderr
    assert copy.read_bytes() == second.read_bytes() and "checked" in downloaded.stdout

    # A binary file sent as CSV: refused with the reason, no version left.
    junk = tmp_path / "junk.csv"
    junk.write_bytes(b"\xff\xfe" + np.random.default_rng(1).bytes(64 * 1024))
    refused = maas("developer", "datasets", "upload", DATASET, str(junk))
    assert refused.returncode == 1
    assert "INVALID_ARGUMENT: the CSV file must be UTF-8 text with a header row" in refused.stderr, refused.stderr
    assert [v["version"] for v in versions()] == ["1", "2"]

    # A reader lists, but neither uploads nor downloads.
    for args in (("upload", DATASET, str(second)), ("download", DATASET, "1", "-o", str(tmp_path / "r.csv"))):
        denied = maas("reader", "datasets", *args)
        assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr, denied.stderr
    assert not list(tmp_path.glob("r.csv*"))
    assert [v["version"] for v in versions()] == ["1", "2"]

    # The trainer reads the uploaded version: a model trained on it, with its lineage.
    with Client(stack.gateway, keys["developer"]) as developer:
        job = developer.train("flowers-mlp", "mlp", f"{DATASET}@2", epochs=30, device="cpu", seed=0)
        finished = developer.wait_job(job.id, timeout=600)
        assert finished.result.version == 1, finished.message
        version = developer.get_version("flowers-mlp", 1)
    assert (version.lineage.dataset, version.lineage.dataset_version) == (DATASET, 2)
    assert version.metrics["test_accuracy"] >= 0.8
