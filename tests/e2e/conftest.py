from __future__ import annotations

import pytest

from services.stack.ephemeral import EphemeralStack
from tests.support.digits import DigitsModel, train_digits_mlp


@pytest.fixture(scope="session")
def stack():
    stack = EphemeralStack()
    # Two gateway workers whatever the machine's cores: every end-to-end test runs through them.
    stack.env["MAAS_GATEWAY_WORKERS"] = "2"
    with stack as running:
        yield running


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> DigitsModel:
    return train_digits_mlp(tmp_path_factory.mktemp("digits"))
