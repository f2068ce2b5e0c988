"""End to end through the gateway: a user trains a digits MLP, `maas optimize --quantize int8
--follow` makes its int8 tier, `maas models compare` shows both, and the fp32 and int8
deployments serve side by side, each picked by its name."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from maas import Client
from maas.errors import ApiError
from sklearn.datasets import load_digits

pytestmark = pytest.mark.slow


def test_fp32_and_int8_tiers_of_a_digits_model(stack) -> None:
    admin = Client(stack.gateway, stack.admin_key)
    admin.create_tenant("tiers")
    _, key = admin.create_api_key("tiers", "developer")
    admin.close()
    env = dict(stack.env, MAAS_API_KEY=key, COLUMNS="200")
    with Client(stack.gateway, key) as maas:
        trained = maas.wait_job(maas.train("digits", "mlp", "digits", epochs=10, device="cpu").id, timeout=600)
        assert trained.result.version == 1, trained.message

        result = stack.maas("optimize", "digits", "--version", "1", "--quantize", "int8", "--follow", env=env,
                            check=False, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCEEDED" in result.stdout and "digits version 2" in result.stdout
        assert "artifact_bytes" in result.stdout and "latency_ms_per_sample" in result.stdout  # parent vs result

        compare = stack.maas("models", "compare", "digits", env=env)
        rows = {line.split()[0]: line for line in compare.stdout.splitlines() if line[:1].isdigit()}
        assert "fp32" in rows["1"] and "int8" in rows["2"] and "digits:1" in rows["2"]
        version = maas.get_version("digits", 2)
        assert version.precision == "int8" and version.size_bytes * 2 <= maas.get_version("digits", 1).size_bytes

        for name, number in (("digits-fp32", 1), ("digits-int8", 2)):
            maas.create_deployment(name, "digits", version=number, max_batch_size=32)
        digits = load_digits()
        images = digits.images[:32].astype(np.float32)
        answers = {}
        for name in ("digits-fp32", "digits-int8"):
            maas.wait_ready(name, timeout=180)
            answers[name] = maas.predict(name, {"x": images})["logits"]
            assert (answers[name].argmax(1) == digits.target[:32]).mean() >= 0.9, name
        assert (answers["digits-int8"].argmax(1) == answers["digits-fp32"].argmax(1)).mean() >= 0.9

        with pytest.raises(ApiError) as caught:
            maas.optimize("digits", 2, "quantize", precision="int8")
        assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT and "already int8" in str(caught.value)
        for name in ("digits-fp32", "digits-int8"):
            maas.delete_deployment(name)
