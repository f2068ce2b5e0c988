"""Encryption at rest end to end, through `maas up`'s stack and the `maas` CLI: the KEK file is
made for the stack (0600, in no process's environment), the registry's blob store holds no byte of
a model in plaintext while Triton serves it, and `maas admin rotate-kek` keeps every version
deployable."""

from __future__ import annotations

import contextlib
import json
import stat
from pathlib import Path

import numpy as np
import pytest
from maas import Client

from tests.support.digits import SIGNATURE, deploy_digits, train_digits_mlp

pytestmark = pytest.mark.slow


def environments() -> list[bytes]:
    """The environment of every process this user may read: the stack's, Triton's, its stubs'."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit():
                found.append((entry / "environ").read_bytes())
    return found


def test_models_rest_sealed_and_a_kek_rotation_keeps_them_deployable(stack, digits, tmp_path) -> None:
    client, _ = deploy_digits(stack.gateway, stack.admin_key, digits, tenant="sealed")
    kek = stack.home / "kek"
    before = kek.read_bytes()
    assert stat.S_IMODE(kek.stat().st_mode) == 0o600
    assert not [env for env in environments() if before.strip() in env]  # a file, never an environment variable

    artifact = digits.path.read_bytes()
    # A 64-byte run of the weights: the plaintext's own marker.
    marker = artifact[len(artifact) // 2 : len(artifact) // 2 + 64]
    blobs = [path for path in (stack.home / "registry" / "blobs").rglob("*") if path.is_file()]
    assert blobs and not [path for path in blobs if marker in path.read_bytes()]
    served = list((stack.home / "inference").rglob("model.pt"))
    assert any(path.read_bytes() == artifact for path in served)  # plaintext only where it is served

    # A second version uploaded before the rotation, deployed after it.
    retrained = train_digits_mlp(tmp_path, epochs=5, seed=1)
    client.upload_version("digits", retrained.path, format="torchscript", signature=SIGNATURE)
    rotated = stack.maas("admin", "rotate-kek", "--json", env={**stack.env, "MAAS_API_KEY": stack.admin_key})
    answer = json.loads(rotated.stdout)
    assert int(answer["rewrappedKeys"]) >= 2 and answer["kekId"] != answer["previousKekId"]
    assert kek.read_bytes() != before and not kek.with_name("kek.next").exists()

    client.create_deployment("after", "digits", version=2, max_batch_size=8)
    client.wait_ready("after", timeout=180)
    x = retrained.test_x[:4]
    logits = client.predict("after", {"x": x})["logits"]
    np.testing.assert_allclose(logits, retrained.reference(x), rtol=1e-4, atol=1e-4)
    with Client(stack.gateway, stack.admin_key) as admin:
        events = admin.list_audit_events("", "", "RotateKek", 5)
    assert events and events[0].code == "OK" and events[0].resource == answer["kekId"]
    client.close()
