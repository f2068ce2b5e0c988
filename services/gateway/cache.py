"""The request cache in Redis, for deployments marked cacheable.

An entry's key is a digest of everything that decides the answer: the protocol, the tenant,
the deployment, its model, resolved version and Triton model, the input tensors in a canonical
order (name, datatype, shape, bytes) and the requested outputs and parameters. The tenant is
also spelled out in the Redis key, so no digest collision could ever cross tenants, and a new
version gives new keys, so old entries are never served for it."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

from maas.inference.v1 import inference_pb2
from prometheus_client import Counter
from tritonclient.grpc import service_pb2

from services.gateway.redis_link import REDIS_DOWN_ERRORS, RedisLink

log = logging.getLogger(__name__)

LOOKUPS = Counter("maas_gateway_cache_lookups_total", "Request cache lookups", ["result"])
HITS, MISSES, BYPASSED = (LOOKUPS.labels(r) for r in ("hit", "miss", "bypassed"))
# The longest an answer stays in a gateway process's memory.
MEMORY_SECONDS = 10.0

CACHE_CONTROL_KEY = "cache-control"


def bypass_requested(metadata: Iterable[tuple[str, str | bytes]]) -> bool:
    """`cache-control: no-cache` (or no-store) in the call's metadata skips the lookup."""
    for key, value in metadata:
        if (
            key == CACHE_CONTROL_KEY
            and isinstance(value, str)
            and ("no-cache" in value or "no-store" in value)
        ):
            return True
    return False


def may_use_cache(
    route_triton_model: str,
    cacheable: bool,
    target_triton_model: str,
    metadata: Iterable[tuple[str, str | bytes]],
) -> bool:
    """Whether this call may be answered from, and stored in, the cache: the deployment opted in,
    the caller did not ask to bypass it, and the call goes to the deployment's own version
    (the canary's share is never cached)."""
    return target_triton_model == route_triton_model and cacheable and not bypass_requested(metadata)


class _Digest:
    def __init__(self, *parts: str) -> None:
        self._hash = hashlib.blake2b(digest_size=20)
        for part in parts:
            self.text(part)

    def text(self, value: str) -> None:
        self.bytes(value.encode())

    def bytes(self, value: bytes) -> None:
        # Length-prefixed, so that no two different sequences of parts hash alike.
        self._hash.update(len(value).to_bytes(8, "little"))
        self._hash.update(value)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _route_parts(route: inference_pb2.Route) -> tuple[str, ...]:
    return (route.deployment, route.model, str(route.version), route.triton_model)


def _parameters(parameters: Mapping[str, service_pb2.InferParameter]) -> bytes:
    return b"".join(
        name.encode() + b"=" + parameters[name].SerializeToString(deterministic=True) + b";"
        for name in sorted(parameters)
    )


def predict_key(tenant: str, route: inference_pb2.Route, request: inference_pb2.PredictRequest) -> str:
    digest = _Digest("predict", *_route_parts(route))
    for tensor in sorted(request.inputs, key=lambda t: t.name):
        digest.text(f"{tensor.name}:{tensor.datatype}:{list(tensor.shape)}")
        digest.bytes(tensor.raw)
    digest.text(",".join(sorted(request.output_names)))
    return f"maas:{{{tenant}}}:cache:{digest.hexdigest()}"


def embed_key(tenant: str, route: inference_pb2.Route, texts: list[bytes]) -> str:
    digest = _Digest("embed", *_route_parts(route))
    for text in texts:
        digest.bytes(text)
    return f"maas:{{{tenant}}}:cache:{digest.hexdigest()}"


def infer_key(tenant: str, route: inference_pb2.Route, request: service_pb2.ModelInferRequest) -> str:
    digest = _Digest("oip", *_route_parts(route))
    raw = list(request.raw_input_contents)
    inputs = sorted(zip(request.inputs, raw or [b""] * len(request.inputs), strict=True), key=lambda pair: pair[0].name)
    for tensor, content in inputs:
        digest.text(f"{tensor.name}:{tensor.datatype}:{list(tensor.shape)}")
        digest.bytes(_parameters(tensor.parameters))
        digest.bytes(content or tensor.contents.SerializeToString(deterministic=True))
    for output in sorted(request.outputs, key=lambda o: o.name):
        digest.text(output.name)
        digest.bytes(_parameters(output.parameters))
    digest.bytes(_parameters(request.parameters))
    return f"maas:{{{tenant}}}:cache:{digest.hexdigest()}"


class ResponseCache:
    """Answers of cacheable deployments in Redis, shared by every gateway process, with the
    hottest also kept in this process's memory (`memory_bytes`, least recently used out first)
    for up to MEMORY_SECONDS: a hit from memory costs no Redis round trip. An entry never
    changes once written (its key covers the model, version and inputs), so a copy is never
    wrong; the short lifetime only bounds how long one outlives its Redis entry."""

    def __init__(
        self,
        link: RedisLink,
        ttl_seconds: float,
        max_entry_bytes: int,
        memory_bytes: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.link = link
        self.clock = clock
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self.max_entry_bytes = max_entry_bytes
        self.memory_bytes = memory_bytes
        self.memory_seconds = min(ttl_seconds, MEMORY_SECONDS)
        self._memory: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._memory_used = 0
        self._writes: set[asyncio.Task[None]] = set()

    async def get(self, key: str) -> bytes | None:
        if (value := self._recall(key)) is not None:
            HITS.inc()
            return value
        if not self.link.up:
            BYPASSED.inc()
            return None
        try:
            value = await self.link.client.get(key)
        except REDIS_DOWN_ERRORS as error:
            self.link.lost(error)
            BYPASSED.inc()
            return None
        (HITS if value is not None else MISSES).inc()
        if value is not None:
            self._remember(key, value)
        return value

    def _recall(self, key: str) -> bytes | None:
        entry = self._memory.get(key)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            self._forget(key)
            return None
        self._memory.move_to_end(key)
        return entry[1]

    def _remember(self, key: str, value: bytes) -> None:
        if len(value) > self.memory_bytes // 8:  # a few big answers would push out every other
            return
        self._forget(key)
        self._memory[key] = (self.clock() + self.memory_seconds, value)
        self._memory_used += len(value)
        while self._memory_used > self.memory_bytes:
            self._forget(next(iter(self._memory)))

    def _forget(self, key: str) -> None:
        entry = self._memory.pop(key, None)
        if entry is not None:
            self._memory_used -= len(entry[1])

    def put(self, key: str, value: bytes) -> None:
        """Store in the background: the caller's answer does not wait for Redis."""
        if len(value) > self.max_entry_bytes:
            return
        self._remember(key, value)
        if not self.link.up:
            return
        task = asyncio.get_running_loop().create_task(self._put(key, value))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, key: str, value: bytes) -> None:
        try:
            await self.link.client.set(key, value, px=self.ttl_ms)
        except REDIS_DOWN_ERRORS as error:
            self.link.lost(error)

    async def drain(self) -> None:
        """Wait for the background writes (tests, shutdown)."""
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
