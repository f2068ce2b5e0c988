"""`maas models compare` beside the price book: each version's tier (its precision, or distilled)
and the price per 1,000 requests of that tier in force today, "-" where none is, all within
80 columns; fakes of RegistryService and BillingService stand where the gateway would be."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from maas.cli import _shared, app
from maas.cli.models import request_price
from maas.gateway.v1 import billing_pb2, billing_pb2_grpc
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from maas.tiers import PLATFORM_SOURCE, SOURCE_METADATA_KEY
from typer.testing import CliRunner

TORCHSCRIPT, ONNX = registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, registry_pb2.ARTIFACT_FORMAT_ONNX
METRICS = {
    "test_accuracy": 0.9811,
    "parameters": 1_234_567,
    "nonzero_parameters": 617_283,
    "latency_ms_per_sample": 0.0123,
}
PRICES = billing_pb2.ListPricesResponse(
    currency="EUR",
    prices=[
        billing_pb2.Price(resource="requests", tier="fp32", amount="0.40"),
        billing_pb2.Price(resource="requests", tier="int8", amount="0.10"),
        billing_pb2.Price(resource="requests", tier="int8", amount="0.05", scheduled=True),  # not yet
        billing_pb2.Price(resource="output_tokens", tier="distilled", amount="9.99"),  # not requests
    ],
)


def version(number: int, precision: str, format: int = TORCHSCRIPT, method: str = "") -> registry_pb2.Version:
    return registry_pb2.Version(
        model="digits",
        version=number,
        precision=precision,
        format=format,
        size_bytes=21_000,
        metrics=METRICS,
        metadata={SOURCE_METADATA_KEY: PLATFORM_SOURCE, **({"parent": "digits:1"} if number > 1 else {})},
        lineage=registry_pb2.Lineage(hyperparameters={"method": method} if method else {}),
    )


class FakeGateway(registry_pb2_grpc.RegistryServiceServicer, billing_pb2_grpc.BillingServiceServicer):
    def __init__(self) -> None:
        self.prices = PRICES

    def ListVersions(self, request, context):
        versions = [
            version(1, "fp32"),
            version(2, "int8", method="quantize"),
            version(3, "fp32", method="distill"),
            version(4, "fp32", ONNX, method="export"),
            version(5, "fp16", method="quantize"),
        ]
        return registry_pb2.ListVersionsResponse(versions=versions)

    def ListPrices(self, request, context):
        return self.prices


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeGateway, str]]:
    fake = FakeGateway()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(fake, server)
    billing_pb2_grpc.add_BillingServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setattr(_shared, "tls_ca", None)
    monkeypatch.setattr(_shared.console, "_width", 80)
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def compare(address: str) -> list[str]:
    result = CliRunner().invoke(
        app, ["models", "compare", "digits"], env={"MAAS_API_KEY": "maas_test", "MAAS_GATEWAY_ADDR": address}
    )
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def test_each_tier_shows_its_price_per_1000_requests_within_80_columns(gateway) -> None:
    fake, address = gateway
    lines = compare(address)
    assert max(len(line) for line in lines) <= 80 and "…" not in "\n".join(lines)
    assert lines[0].split() == ["ver", "parent", "tier", "size", "params", "nonzero", "acc", "ms", "EUR"]
    rows = {line.split()[0]: line.split() for line in lines if line[:1].isdigit()}
    assert rows["1"] == ["1", "-", "fp32", "21.0", "kB", "1,234,567", "617,283", "98.11%", "0.0123", "0.40"]
    assert (rows["2"][2], rows["2"][-1]) == ("int8", "0.10")  # the price in force, not the scheduled one
    assert (rows["3"][2], rows["3"][-1]) == ("distilled", "-")  # distilled requests have no price
    assert (rows["4"][2:4], rows["4"][-1]) == (["fp32", "onnx"], "0.40")
    assert (rows["5"][2], rows["5"][-1]) == ("fp16", "-")
    assert "EUR: price per 1,000 requests of the tier" in lines[-1]
    # A price for every tier fills the gaps the tier's own prices leave.
    fake.prices = billing_pb2.ListPricesResponse(
        currency="EUR", prices=[*PRICES.prices, billing_pb2.Price(resource="requests", amount="0.25")]
    )
    rows = {line.split()[0]: line.split() for line in compare(address) if line[:1].isdigit()}
    assert [rows[v][-1] for v in "12345"] == ["0.40", "0.10", "0.25", "0.40", "0.25"]


def test_request_price_of_a_tier() -> None:
    assert request_price(PRICES, "int8") == "0.10"
    assert request_price(PRICES, "distilled") == "-"
    assert request_price(billing_pb2.ListPricesResponse(), "fp32") == "-"
