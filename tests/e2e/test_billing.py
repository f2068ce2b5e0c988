"""Issue 16 end to end, on the real stack: usage through the gateway becomes an exact,
reproducible invoice whose tiers are priced apart (an int8 version the platform quantized sells
cheaper; an upload that merely claims int8 does not), and the weights rest encrypted on disk."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import grpc
import numpy as np
import pytest
from maas import Client
from maas.errors import ApiError

from tests.support.digits import SIGNATURE

pytestmark = pytest.mark.slow

TENANT = "billco"
# Calls per deployment: fp32 upload, int8 from the trainer, and an upload that claims int8.
CALLS = {"bill-fp32": 30, "bill-int8": 100, "bill-claimed": 20}


@pytest.fixture(scope="module")
def tenant(stack):
    admin = Client(stack.gateway, stack.admin_key)
    admin.create_tenant(TENANT)
    developer = Client(stack.gateway, admin.create_api_key(TENANT, "developer")[1])
    yield admin, developer
    developer.close()
    admin.close()


def test_usage_becomes_an_exact_invoice_priced_by_tier(stack, tenant, digits):
    admin, developer = tenant
    developer.create_model("billed", "digits MLP")
    developer.upload_version("billed", digits.path, format="torchscript", signature=SIGNATURE)
    job = developer.wait_job(developer.optimize("billed", 1, "quantize", precision="int8").id, timeout=600)
    assert job.result.version == 2, job.message
    claimed = developer.upload_version(
        "billed", digits.path, format="torchscript", signature=SIGNATURE, precision="int8"
    )
    for name, version in (("bill-fp32", 1), ("bill-int8", 2), ("bill-claimed", claimed.version)):
        developer.create_deployment(name, "billed", version=version, max_batch_size=32)
    tiers = {name: developer.wait_ready(name, timeout=180).tier for name in CALLS}
    assert tiers == {"bill-fp32": "fp32", "bill-int8": "int8", "bill-claimed": "fp32"}

    x = digits.test_x[:1]
    for name, count in CALLS.items():
        for _ in range(count):
            developer.predict(name, {"x": x})
    with pytest.raises(ApiError) as refused:  # refused at the edge: never billed
        developer.predict("bill-int8", {"x": np.zeros((1, 3), np.float32)})
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT

    admin.set_price("requests", "2.00", tier="fp32")
    admin.set_price("requests", "0.50", tier="int8")
    time.sleep(2.5)  # every gateway worker pushes what it counted in memory (MAAS_USAGE_PUSH_SECONDS)
    month = datetime.now(UTC).strftime("%Y-%m")
    result = stack.maas("billing", "invoice", TENANT, "--month", month, "--json",
                        env=dict(stack.env, MAAS_API_KEY=stack.admin_key))
    invoice = json.loads(result.stdout)
    requests = {line["tier"]: line for line in invoice["lines"] if line["resource"] == "requests"}
    assert requests["fp32"]["quantity"] == 50 and requests["fp32"]["amount"] == "0.10"
    assert requests["int8"]["quantity"] == 100 and requests["int8"]["amount"] == "0.05"
    assert (requests["fp32"]["unit_price"], requests["int8"]["unit_price"]) == ("2.00", "0.50")
    assert invoice["currency"] == "USD" and invoice["total"] == "0.15"
    # The same usage and prices give the same invoice.
    again = stack.maas("billing", "invoice", TENANT, "--month", month, "--json",
                       env=dict(stack.env, MAAS_API_KEY=stack.admin_key))
    assert json.loads(again.stdout) == invoice


def test_weights_rest_encrypted(stack, tenant, digits):
    _, developer = tenant
    developer.create_model("sealed")
    developer.upload_version("sealed", digits.path, format="torchscript", signature=SIGNATURE)
    plaintext = digits.path.read_bytes()
    marker = plaintext[len(plaintext) // 2 : len(plaintext) // 2 + 64]
    blobs = [path for path in (stack.home / "registry").rglob("*") if path.is_file() and path.stat().st_size > 1024]
    assert blobs
    assert not [path for path in blobs if marker in path.read_bytes()]
