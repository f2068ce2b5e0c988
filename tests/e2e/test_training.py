"""End to end through the real stack: `maas train ... --follow` trains a digits CNN through the
gateway, the SDK watches its events, the registered version is deployed on Triton and answers
Predict through the gateway with the accuracy the job reported."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from maas import Client
from maas.errors import ApiError
from maas.trainer.v1 import trainer_pb2
from sklearn.datasets import load_digits

from services.gateway.training import job_seconds

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keys(stack):
    admin = Client(stack.gateway, stack.admin_key)
    admin.create_tenant("trainee")
    admin.create_tenant("outsider")
    keys = {
        "developer": admin.create_api_key("trainee", "developer")[1],
        "reader": admin.create_api_key("trainee", "reader")[1],
        "outsider": admin.create_api_key("outsider", "developer")[1],
    }
    admin.close()
    return keys


def test_train_watch_deploy_predict(stack, keys) -> None:
    env = dict(stack.env, MAAS_API_KEY=keys["developer"], COLUMNS="200")
    result = stack.maas("train", "digits-cnn", "--arch", "cnn", "--dataset", "digits", "--epochs", "8",
                        "--device", "cpu", "--follow", env=env, check=False, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCEEDED" in result.stdout and "digits-cnn version 1" in result.stdout

    with Client(stack.gateway, keys["developer"]) as maas:
        (job,) = maas.list_jobs()
        assert job.state == trainer_pb2.JOB_STATE_SUCCEEDED and job.result.version == 1
        kinds = [event.WhichOneof("kind") for event in maas.watch_job(job.id)]
        assert kinds[0] == "queued" and kinds[-1] == "finished"
        assert {"started", "progress", "checkpoint"} <= set(kinds)
        version = maas.get_version("digits-cnn", 1)
        assert version.lineage.job_id == job.id and version.metrics["test_accuracy"] >= 0.97

        maas.create_deployment("digits-cnn", "digits-cnn", version=1, max_batch_size=64)
        maas.wait_ready("digits-cnn", timeout=180)
        digits = load_digits()
        images = digits.images[:64].astype(np.float32)  # raw 0..16 pixels: the model standardises
        logits = maas.predict("digits-cnn", {"x": images})["logits"]
        assert logits.shape == (64, 10)
        assert (logits.argmax(1) == digits.target[:64]).mean() >= 0.95
        maas.delete_deployment("digits-cnn")

    # The gateway settles the job's run time into the tenant's usage (every 5 s by default).
    with Client(stack.gateway, stack.admin_key) as admin:
        deadline = time.monotonic() + 30
        while (used := sum(row.training_seconds for row in admin.get_usage("trainee"))) == 0:
            assert time.monotonic() < deadline, "the job's training seconds never reached usage"
            time.sleep(0.5)
        assert used == job_seconds(job) > 0

    with Client(stack.gateway, keys["reader"]) as reader:
        assert reader.get_job(job.id).id == job.id
        with pytest.raises(ApiError) as caught:
            reader.train("nope", "mlp", "iris")
        assert caught.value.code is grpc.StatusCode.PERMISSION_DENIED
    with Client(stack.gateway, keys["outsider"]) as outsider:
        with pytest.raises(ApiError) as caught:
            outsider.get_job(job.id)
        assert caught.value.code is grpc.StatusCode.NOT_FOUND
        assert outsider.list_jobs() == []


def test_bad_training_requests_through_the_gateway(stack, keys) -> None:
    with Client(stack.gateway, keys["developer"]) as maas:
        for kwargs, code in [
            ({"architecture": "cnn", "dataset": "iris"}, grpc.StatusCode.INVALID_ARGUMENT),
            ({"architecture": "mlp", "dataset": "iris", "learning_rate": -1.0}, grpc.StatusCode.INVALID_ARGUMENT),
            ({"architecture": "mlp", "dataset": "iris", "epochs": 0}, grpc.StatusCode.INVALID_ARGUMENT),
            ({"architecture": "mlp", "dataset": "no-such-data"}, grpc.StatusCode.NOT_FOUND),
        ]:
            with pytest.raises(ApiError) as caught:
                maas.train("bad", **kwargs)
            assert caught.value.code is code, (kwargs, caught.value)
        assert all(job.model != "bad" for job in maas.list_jobs())
