"""TLS on the gateway's port and mTLS between services, with a CA made in the test."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from maas.client import Client
from maas.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.channels import internal_credentials, internal_metadata, open_channel
from services.common.server import running
from services.gateway.config import GatewaySettings
from services.gateway.server import bootstrap_admin
from services.gateway.server import create_app as create_gateway
from services.registry.config import RegistrySettings
from services.registry.server import create_app as create_registry
from tests.support.certs import TestCa

HEALTH = health_pb2.HealthCheckRequest()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCa:
    return TestCa(tmp_path_factory.mktemp("ca"))


async def health_status(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(HEALTH, timeout=5)
    return reply.status


async def test_gateway_serves_tls_to_a_client_that_trusts_the_ca(ca: TestCa, tmp_path: Path) -> None:
    server_cert = ca.issue("gateway")
    settings = GatewaySettings(
        home=tmp_path, gateway_addr="127.0.0.1:0", gateway_http_addr="", tls_cert_file=server_cert.cert,
        tls_key_file=server_cert.key,
        inference_addr="127.0.0.1:1", registry_addr="127.0.0.1:1", trainer_addr="127.0.0.1:1",
    )
    key_file = tmp_path / "admin.key"
    await bootstrap_admin(settings, key_file)
    async with running(await create_gateway(settings)) as server:
        address = f"localhost:{server.port}"
        with Client(address, key_file.read_text().strip(), root_certificates=ca.cert.read_bytes()) as client:
            key = await asyncio.to_thread(client.whoami)
        assert key.tenant

        async with grpc.aio.insecure_channel(address) as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_status(plaintext)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE

        other_ca = TestCa(tmp_path / "other-ca")
        untrusted = grpc.ssl_channel_credentials(other_ca.cert.read_bytes())
        async with grpc.aio.secure_channel(address, untrusted) as wrong_ca:
            with pytest.raises(grpc.aio.AioRpcError) as rejected:
                await health_status(wrong_ca)
        assert rejected.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_internal_service_with_mtls_requires_a_client_certificate(ca: TestCa, tmp_path: Path) -> None:
    registry_cert = ca.issue("registry")
    settings = RegistrySettings(
        home=tmp_path, registry_addr="127.0.0.1:0", internal_token="secret",
        tls_cert_file=registry_cert.cert, tls_key_file=registry_cert.key, tls_client_ca_file=ca.cert,
    )
    async with running(await create_registry(settings)) as server:
        address = f"localhost:{server.port}"

        server_only = grpc.ssl_channel_credentials(ca.cert.read_bytes())
        async with grpc.aio.secure_channel(address, server_only) as without_client_cert:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_status(without_client_cert)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE

        # A peer (here: the inference service) presents its own certificate from its settings.
        inference_cert = ca.issue("inference")
        peer = RegistrySettings(
            home=tmp_path, tls_ca_file=ca.cert, tls_cert_file=inference_cert.cert, tls_key_file=inference_cert.key,
        )
        channel = open_channel(address, internal_credentials(peer))
        try:
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            reply = await stub.ListModels(registry_pb2.ListModelsRequest(), metadata=internal_metadata("secret", "t1"))
            assert list(reply.models) == []
        finally:
            await channel.close()


def test_tls_settings_come_in_pairs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both"):
        RegistrySettings(home=tmp_path, tls_cert_file=tmp_path / "x.crt")
    with pytest.raises(ValueError, match="mTLS"):
        RegistrySettings(home=tmp_path, tls_client_ca_file=tmp_path / "ca.crt")


async def test_gateway_reaches_an_mtls_registry_with_its_own_certificate(ca: TestCa, tmp_path: Path) -> None:
    registry_cert, gateway_cert = ca.issue("registry"), ca.issue("gateway")
    registry_settings = RegistrySettings(
        home=tmp_path, registry_addr="127.0.0.1:0", internal_token="secret",
        tls_cert_file=registry_cert.cert, tls_key_file=registry_cert.key, tls_client_ca_file=ca.cert,
    )
    async with running(await create_registry(registry_settings)) as registry:
        settings = GatewaySettings(
            home=tmp_path, gateway_addr="127.0.0.1:0", gateway_http_addr="", internal_token="secret",
            registry_addr=f"localhost:{registry.port}", inference_addr="127.0.0.1:1", trainer_addr="127.0.0.1:1",
            tls_cert_file=gateway_cert.cert, tls_key_file=gateway_cert.key, tls_ca_file=ca.cert,
        )
        key_file = tmp_path / "admin.key"
        await bootstrap_admin(settings, key_file)
        async with running(await create_gateway(settings)) as gateway:
            address = f"localhost:{gateway.port}"
            with Client(address, key_file.read_text().strip(), root_certificates=ca.cert.read_bytes()) as client:
                model = await asyncio.to_thread(client.create_model, "over-mtls")
                assert model.name == "over-mtls"
                assert [m.name for m in await asyncio.to_thread(client.list_models)] == ["over-mtls"]
