from __future__ import annotations

import pytest

from services.stack.ephemeral import EphemeralStack
from tests.support.digits import DigitsModel, train_digits_mlp


@pytest.fixture(scope="session")
def stack():
    with EphemeralStack() as running:
        yield running


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> DigitsModel:
    return train_digits_mlp(tmp_path_factory.mktemp("digits"))
