from __future__ import annotations

import pytest
from maas.client import Client
from maas.errors import ApiError

from services.stack.ephemeral import EphemeralStack
from tests.support.digits import DigitsModel, train_digits_mlp


@pytest.fixture(scope="session")
def stack():
    stack = EphemeralStack()
    # Two gateway workers whatever the machine's cores: every end-to-end test runs through them.
    stack.env["MAAS_GATEWAY_WORKERS"] = "2"
    stack.env["MAAS_MONITOR_INTERVAL_SECONDS"] = "5"  # test_monitoring reads the drift monitor's gauges
    stack.env["MAAS_TRAINER_RETRAIN_POLL_SECONDS"] = "1"  # test_retrain waits for the retrain loop
    stack.env["MAAS_GATEWAY_RETRAIN_AUDIT_SECONDS"] = "1"  # test_retrain reads the steps in the audit log
    with stack as running:
        yield running


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> DigitsModel:
    return train_digits_mlp(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module", autouse=True)
def deployments_deleted_after_each_module():
    """Every module shares one stack whose Triton node has a fixed number of model slots: the
    deployments a module made through the SDK are deleted when it ends, so that the modules
    after it find room (a module that cleans up itself is unaffected: NOT_FOUND is ignored)."""
    made: list[tuple[str, str, str]] = []
    create = Client.create_deployment

    def recording(self, name, *args, **kwargs):  # type: ignore[no-untyped-def]
        deployment = create(self, name, *args, **kwargs)
        key = dict(self._metadata).get("authorization", "").removeprefix("Bearer ")
        made.append((self.address, key, name))
        return deployment

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Client, "create_deployment", recording)
        yield
    for address, key, name in made:
        with Client(address, key, timeout=10) as client:
            try:
                client.delete_deployment(name)
            except ApiError:
                pass  # gone already, or its module's own stack is down
