"""Who is calling, and may they call this method: API keys, roles and the caller contextvar."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from google.protobuf.descriptor import ServiceDescriptor
from maas.gateway.v1 import admin_pb2, billing_pb2, monitoring_pb2
from maas.inference.v1 import inference_pb2
from maas.registry.v1 import registry_pb2
from maas.trainer.v1 import trainer_pb2
from tritonclient.grpc import service_pb2

from services.common.errors import PermissionDenied, Unauthenticated
from services.common.single_flight import SingleFlight
from services.gateway.admission import Admission
from services.gateway.audit import AuditLog, is_audited, is_download
from services.gateway.keys import ADMIN_TENANT, Role, parse_key, secret_matches
from services.gateway.store import GatewayStore, KeyRecord, RateLimit

MISSING_KEY = "missing API key: send metadata authorization: Bearer <key>"
UNKNOWN_KEY = "API key not recognised: check it was copied whole, or ask an admin for a new one"
# Bounds memory when callers send many made-up key ids (each is cached as "unknown").
MAX_CACHED_KEYS = 100_000

# Downloads are not reads: a model's weights are a developer's (and of a no-download model, an
# admin's, as the registry checks) to take away, never a reader's.
READ_PREFIXES = ("Get", "List", "Watch")
# InferenceService calls that only use a deployment: readers may make them.
INFERENCE_CALLS = ("Predict", "Generate", "Embed")
# AdminService methods any role may call (GetUsage checks the tenant itself).
ANY_ROLE_ADMIN_METHODS = ("WhoAmI", "GetUsage")
# BillingService methods any role may call: customers pick a tier and a plan knowing its price.
# The rest need the admin role; the billing itself lets a tenant's admin read only its own
# invoices and spend, and keeps every change to a platform admin.
ANY_ROLE_BILLING_METHODS = ("ListPrices", "ListPlans")
# Methods of the forwarded services that only the gateway itself calls: its billing (with the
# tenant it bills asserted), AdminService.RotateKek (after its platform-admin check), its drift
# monitor's ReportDrift and its audit log's ListRetrainEvents. No API key may call them, so they
# have no required role.
INTERNAL_METHODS = frozenset(
    {
        "/maas.registry.v1.RegistryService/GetStorageUsage",
        "/maas.inference.v1.InferenceService/GetReplicaUsage",
        "/maas.registry.v1.RegistryService/RotateKek",
        "/maas.trainer.v1.TrainerService/ReportDrift",
        "/maas.trainer.v1.TrainerService/ListRetrainEvents",
    }
)


@dataclass(frozen=True)
class Caller:
    tenant: str
    role: Role
    key_id: str
    rate_limit: RateLimit | None = None  # the key's own limit; None: the gateway's default

    @property
    def is_platform_admin(self) -> bool:
        return self.role is Role.ADMIN and self.tenant == ADMIN_TENANT


caller_var: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def current_caller() -> Caller:
    """The caller the authenticator admitted for this RPC."""
    caller = caller_var.get()
    if caller is None:
        raise Unauthenticated(MISSING_KEY)
    return caller


def _methods(service: ServiceDescriptor) -> list[tuple[str, str]]:
    return [(f"/{service.full_name}/{method.name}", method.name) for method in service.methods]


def _required_roles() -> dict[str, Role]:
    """Full method path -> the least role that may call it. Methods not listed are denied."""
    roles: dict[str, Role] = {}
    for path, name in _methods(admin_pb2.DESCRIPTOR.services_by_name["AdminService"]):
        roles[path] = Role.READER if name in ANY_ROLE_ADMIN_METHODS else Role.ADMIN
    for path, name in _methods(billing_pb2.DESCRIPTOR.services_by_name["BillingService"]):
        roles[path] = Role.READER if name in ANY_ROLE_BILLING_METHODS else Role.ADMIN
    for service in (
        monitoring_pb2.DESCRIPTOR.services_by_name["MonitoringService"],
        registry_pb2.DESCRIPTOR.services_by_name["RegistryService"],
        inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
        trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"],
    ):
        for path, name in _methods(service):
            if path in INTERNAL_METHODS:
                continue
            reads = name.startswith(READ_PREFIXES) or name in INFERENCE_CALLS
            roles[path] = Role.READER if reads else Role.DEVELOPER
    for path, _ in _methods(service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]):
        roles[path] = Role.READER
    return roles


REQUIRED_ROLE = _required_roles()


def bearer_token(metadata: Mapping[str, str]) -> str:
    value = metadata.get("authorization")
    if not value:
        raise Unauthenticated(MISSING_KEY)
    scheme, _, token = value.partition(" ") if isinstance(value, str) else ("", "", "")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("malformed authorization metadata: expected 'Bearer <key>'")
    return token.strip()


class ApiKeyAuthenticator:
    """The gateway's Authenticator (see services.common.interceptors): who is calling, may
    they call this method, and (with an Admission) is the call within their limits."""

    def __init__(
        self,
        store: GatewayStore,
        cache_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        admission: Admission | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.store = store
        self.cache_seconds = cache_seconds
        self.clock = clock
        self.admission = admission
        self.audit = audit
        # key id -> (expiry, the key or None when unknown); both answers are reused until expiry.
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}
        self._lookups: SingleFlight[KeyRecord | None] = SingleFlight()
        # Keys whose secret matched: the bearer token -> (key id, the hash it matched). A known
        # caller's next calls skip parsing and hashing it; the key itself is still looked up (and
        # its revocation seen) as before. Only keys that matched are kept, so callers sending
        # made-up keys add nothing here.
        self._verified: dict[str, tuple[str, str]] = {}

    async def __call__(self, method: str, metadata: Mapping[str, str]) -> None:
        token = bearer_token(metadata)
        verified = self._verified.get(token)
        if verified is not None:
            key = await self._lookup(verified[0])
            if key is None or key.secret_hash != verified[1]:
                self._verified.pop(token, None)
                raise Unauthenticated(UNKNOWN_KEY)
        else:
            key_id, secret = parse_key(token)
            key = await self._lookup(key_id)
            if key is None or not secret_matches(secret, key.secret_hash):
                raise Unauthenticated(UNKNOWN_KEY)
            if len(self._verified) >= MAX_CACHED_KEYS:
                self._verified.clear()
            self._verified[token] = (key.id, key.secret_hash)
        if key.revoked:
            raise Unauthenticated(
                f"API key {key.id} was revoked; ask an admin of tenant {key.tenant!r} for a new one"
            )
        required = REQUIRED_ROLE.get(method)
        if required is None:
            raise PermissionDenied(f"method {method[:120]!r} is not available through the gateway")
        if key.role < required:
            if self.audit is not None and is_audited(method):
                bytes_sent = 0 if is_download(method) else None
                self.audit.record(key.tenant, key.id, method, "", "PERMISSION_DENIED", bytes_sent)
            raise PermissionDenied(
                f"this call needs the {required.name.lower()} role or above; "
                f"API key {key.id} has the {key.role.name.lower()} role"
            )
        if self.admission is not None:
            await self.admission.admit(key.tenant, key.id, key.rate_limit, method)
        caller_var.set(Caller(key.tenant, key.role, key.id, key.rate_limit))

    def forget(self, key_id: str) -> None:
        """Drop a cached lookup (after a revocation or a new rate limit through this gateway)."""
        self._cache.pop(key_id, None)

    async def _lookup(self, key_id: str) -> KeyRecord | None:
        now = self.clock()
        cached = self._cache.get(key_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        key = await self._lookups.run(key_id, lambda: asyncio.to_thread(self.store.get_key, key_id))
        if self.cache_seconds > 0:
            if len(self._cache) >= MAX_CACHED_KEYS:
                self._evict(now)
            self._cache[key_id] = (now + self.cache_seconds, key)
        return key

    def _evict(self, now: float) -> None:
        self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        if len(self._cache) >= MAX_CACHED_KEYS:
            self._cache.clear()
