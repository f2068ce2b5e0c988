"""Client side of service-to-service calls: long-lived channels and the internal metadata."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from services.common.errors import Unauthenticated
from services.common.interceptors import INTERNAL_TOKEN_KEY, REQUEST_ID_KEY, TENANT_KEY
from services.common.logs import request_id_var
from services.common.settings import CommonSettings


@dataclass(frozen=True)
class Keepalive:
    """One keepalive policy for both ends of every internal channel. Clients ping an idle
    connection every `ping_seconds`; servers accept pings that often, so they never answer with
    GOAWAY too_many_pings (which failed an in-flight call when the server kept gRPC's default of
    one ping per 5 minutes and two strikes)."""

    ping_seconds: float = 30.0
    timeout_seconds: float = 10.0

    def client_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.keepalive_time_ms", int(self.ping_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.timeout_seconds * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]

    def server_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.keepalive_permit_without_calls", 1),
            # Half the client's interval: timer jitter never makes an on-time ping a strike.
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.ping_seconds * 500)),
            ("grpc.http2.max_ping_strikes", 0),
        ]

    def triton_flags(self) -> list[str]:
        """The same server policy for tritonserver, whose gRPC port our channels ping too."""
        options = dict(self.server_options())
        return [
            "--grpc-keepalive-permit-without-calls=true",
            f"--grpc-http2-min-recv-ping-interval-without-data={options['grpc.http2.min_ping_interval_without_data_ms']}",
            "--grpc-http2-max-ping-strikes=0",
        ]


KEEPALIVE = Keepalive()
CHANNEL_OPTIONS = [
    *KEEPALIVE.client_options(),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
]


def open_channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """One channel per peer for the life of the process; stubs on it are cheap."""
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def open_blocking_channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """The blocking API's channel, for the few calls that need it (client-streaming proxying)."""
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def internal_credentials(settings: CommonSettings) -> grpc.ChannelCredentials | None:
    """TLS for calls to the other MaaS services when MAAS_TLS_CA_FILE is set (None: plaintext).
    This service's own certificate goes along as the client's, for peers that require mTLS."""
    if not settings.tls_ca_file:
        return None
    has_identity = settings.tls_cert_file and settings.tls_key_file
    return grpc.ssl_channel_credentials(
        root_certificates=settings.tls_ca_file.read_bytes(),
        private_key=settings.tls_key_file.read_bytes() if has_identity else None,  # type: ignore[union-attr]
        certificate_chain=settings.tls_cert_file.read_bytes() if has_identity else None,  # type: ignore[union-attr]
    )


# The key Triton's restricted protocols check (all but health); its value is MAAS_TRITON_TOKEN.
TRITON_TOKEN_KEY = "maas-triton-token"
# Triton's gRPC front expects the key behind this prefix in the call's metadata.
TRITON_TOKEN_HEADER = f"triton-grpc-protocol-{TRITON_TOKEN_KEY}"


def triton_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """What a call to Triton carries so that its restricted protocols let it through."""
    return ((TRITON_TOKEN_HEADER, token),) if token else ()


def triton_credentials(settings: CommonSettings) -> grpc.ChannelCredentials | None:
    """TLS for the channels to Triton when settings.uses_triton_tls, else None (plaintext)."""
    return internal_credentials(settings) if settings.uses_triton_tls else None


# What the gateway asserts on calls to the inference service's InferenceService for a tenant
# with a replica cap (Quota.max_replicas): the cap, which the inference service enforces. The
# gateway drops every x-maas- key a client sends, so no client can set it.
MAX_REPLICAS_KEY = "x-maas-max-replicas"


# What the gateway asserts on every call it forwards: the role of the caller's API key
# ("reader", "developer" or "admin"), dropped like every x-maas- key a client sends. A call
# without it comes from another MaaS service (the inference service loading a model onto
# Triton, the trainer fetching a version to optimize), which acts with the service's own rights.
CALLER_ROLE_KEY = "x-maas-caller-role"


def internal_metadata(token: str, tenant: str) -> tuple[tuple[str, str], ...]:
    """Metadata a trusted caller sends: who the tenant is, the shared token, the request id."""
    pairs = [(INTERNAL_TOKEN_KEY, token), (TENANT_KEY, tenant)]
    if request_id := request_id_var.get():
        pairs.append((REQUEST_ID_KEY, request_id))
    return tuple(pairs)


def tenant_of(context: grpc.aio.ServicerContext) -> str:
    """The tenant the gateway asserted for this call."""
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_KEY and value:
            return value
    raise Unauthenticated(f"missing {TENANT_KEY} metadata: internal services are called through the gateway")


def caller_role_of(context: grpc.aio.ServicerContext) -> str | None:
    """The role of the API key the gateway asserted for this call; None for a call from
    another MaaS service, which the gateway did not forward."""
    for key, value in context.invocation_metadata() or ():
        if key == CALLER_ROLE_KEY:
            return value
    return None
