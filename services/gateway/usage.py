"""Usage metering per tenant, key and UTC day.

A call's `requests` (or `rejected`) count is added to its Redis hash by the script that admits
it (limits.ADMIT_SCRIPT), so it is exactly as durable as the quota counters. A call that changes
nothing (inference, reads) admitted from a lease (limits.Leases) is counted in memory instead,
as durable as its bytes and tokens below. While Redis is down
the limiter holds it in process and writes it back with its quota leases (or, should Redis stay
away past a flush, hands it over to go straight to SQL). The other counts
(bytes, cache hits, errors, tokens) are added to a dict in memory, and a background task pushes
those sums to Redis (one pipeline per interval); what a process holds of them when it is killed
(at most one push interval) is lost. The same task moves what Redis holds into SQL, where
GetUsage reads it. Moving out of Redis is atomic per hash (read-and-delete in one script); if
the SQL write fails the counts go back into memory for the next round, but a process killed
between the take and the SQL commit (a few milliseconds per flush) loses that hash's counts:
never counted twice, at most lost once.

Billable usage (what invoices price: requests, tokens by the answering version's price tier) takes
the same way, in hashes of its own per tenant and day (`bill`), into the billable_usage table."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping

from services.gateway.redis_link import REDIS_DOWN_ERRORS, RedisLink
from services.gateway.store import USAGE_FIELDS, BillableRecord, GatewayStore, UsageRecord

log = logging.getLogger(__name__)

DIRTY_SET = "maas:usage:dirty"
BILLABLE_DIRTY_SET = "maas:billable:dirty"
# Read a hash and delete it, atomically: counts land in exactly one flush.
TAKE_SCRIPT = """
local counts = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return counts
"""
HASH_TTL = 7 * 86400  # a hash nobody flushes (no gateway left) does not live forever

# The billable resources the gateway meters itself, in their base units (README, "Billing").
REQUESTS = "requests"
INPUT_TOKENS, OUTPUT_TOKENS = "input_tokens", "output_tokens"  # a generation's prompt and completion
EMBEDDING_TOKENS = "embedding_tokens"
TRAINING_CPU_SECONDS, TRAINING_GPU_SECONDS = "training_cpu_seconds", "training_gpu_seconds"
# The tier of a call the gateway forwarded before it knew the deployment's route (at start-up).
UNKNOWN_TIER = ""

Slot = tuple[str, str, str]  # (day, tenant, key id)
BillableSlot = tuple[str, str, str, str]  # (day, tenant, resource, tier)


def usage_key(day: str, tenant: str, key_id: str) -> str:
    """The Redis hash of one key's usage on one UTC day."""
    return f"maas:{{{tenant}}}:usage:{day}:{key_id}"


def billable_key(day: str, tenant: str) -> str:
    """The Redis hash of one tenant's billable usage on one UTC day; fields "resource/tier"."""
    return f"maas:{{{tenant}}}:billable:{day}"


def _slot_of(hash_key: str) -> Slot:
    prefix, _, rest = hash_key.partition(":usage:")
    day, _, key_id = rest.partition(":")
    return day, prefix.removeprefix("maas:{").removesuffix("}"), key_id


class Meter:
    def __init__(
        self,
        link: RedisLink,
        store: GatewayStore,
        push_seconds: float,
        flush_seconds: float,
        held: Callable[[], dict[str, dict[str, int]]] | None = None,
    ) -> None:
        self.link = link
        # Usage the limiter counted in process while Redis is down (usage hash key -> counts),
        # handed over to go straight to SQL should Redis stay away past a flush.
        self.held = held
        self.store = store
        self.push_seconds = push_seconds
        self.flush_seconds = flush_seconds
        self._pending: defaultdict[Slot, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._billable: defaultdict[BillableSlot, int] = defaultdict(int)
        self._take = link.client.register_script(TAKE_SCRIPT)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._day = ("", 0.0)  # cached (day, valid until)

    def add(self, tenant: str, key_id: str, **counts: int) -> None:
        """Count something for this call; cheap, never waits."""
        pending = self._pending[(self._today(), tenant, key_id)]
        for name, value in counts.items():
            pending[name] += value

    def bill(self, tenant: str, resource: str, tier: str, quantity: int = 1) -> None:
        """Count billable usage of this call; cheap, never waits."""
        if quantity:
            self._billable[(self._today(), tenant, resource, tier)] += quantity

    def count_admitted(self, hash_key: str) -> None:
        """A call the limiter admitted from a lease, without the script that counts it in Redis."""
        self._pending[_slot_of(hash_key)]["requests"] += 1

    def _today(self) -> str:
        day, until = self._day
        now = time.time()
        if now >= until:
            day = time.strftime("%Y-%m-%d", time.gmtime(now))
            self._day = (day, now - now % 86400 + 86400)
        return day

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-meter")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.flush()

    async def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            await asyncio.sleep(self.push_seconds)
            try:
                if time.monotonic() - last_flush >= self.flush_seconds:
                    await self.flush()
                    last_flush = time.monotonic()
                else:
                    await self.push()
            except Exception:
                log.exception("usage metering round failed; counts kept for the next one")

    async def push(self) -> None:
        """Memory -> Redis. While Redis is down the counts stay in memory."""
        if not (self._pending or self._billable) or not self.link.up:
            return
        pending, self._pending = self._pending, defaultdict(lambda: defaultdict(int))
        billable, self._billable = self._billable, defaultdict(int)
        pipe = self.link.client.pipeline(transaction=False)
        for slot, counts in pending.items():
            key = usage_key(*slot)
            for name, value in counts.items():
                pipe.hincrby(key, name, value)
            pipe.expire(key, HASH_TTL)
            pipe.sadd(DIRTY_SET, key)
        billable_keys = set()
        for (day, tenant, resource, tier), quantity in billable.items():
            key = billable_key(day, tenant)
            pipe.hincrby(key, f"{resource}/{tier}", quantity)
            billable_keys.add(key)
        for key in billable_keys:
            pipe.expire(key, HASH_TTL)
            pipe.sadd(BILLABLE_DIRTY_SET, key)
        try:
            await pipe.execute()
        except REDIS_DOWN_ERRORS as error:
            # Whether some increments landed is unknown; counting them again could double
            # them, so a lost round loses at most one interval's counts.
            self.link.lost(error)
            log.warning("usage push failed; counts of this round may be lost", extra={"error": str(error)})

    async def flush(self) -> None:
        """Memory -> Redis -> SQL. GetUsage calls it first, so it reads its own writes."""
        async with self._lock:
            await self.push()
            if self.link.up:
                rows = [
                    UsageRecord(*_slot_of(key), counts)
                    for key, flat in await self._take_from_redis(DIRTY_SET)
                    if (counts := _counts(flat))
                ]
                billed = [
                    record
                    for key, flat in await self._take_from_redis(BILLABLE_DIRTY_SET)
                    for record in _billable_records(key, flat)
                ]
            else:
                # Straight from memory to SQL while Redis is away.
                pending, self._pending = self._pending, defaultdict(lambda: defaultdict(int))
                for key, counts in (self.held() if self.held else {}).items():
                    for name, value in counts.items():
                        pending[_slot_of(key)][name] += value
                rows = [UsageRecord(*slot, dict(counts)) for slot, counts in pending.items()]
                billable, self._billable = self._billable, defaultdict(int)
                billed = [BillableRecord(*slot, quantity) for slot, quantity in billable.items()]
            # Each table's rows go back into memory if its write fails; the other's still go.
            try:
                await self._write(self.store.add_usage, rows, self._restore)
            finally:
                await self._write(self.store.add_billable_usage, billed, self._restore_billable)

    async def _take_from_redis(self, dirty_set: str) -> list[tuple[str, list[bytes]]]:
        """Every hash `dirty_set` marks, each read and deleted at once: (key, flat fields)."""
        taken: list[tuple[str, list[bytes]]] = []
        try:
            keys = await self.link.client.smembers(dirty_set)
            for raw_key in keys:
                key = raw_key.decode()
                # Unmark first: a push after this re-marks the hash for the next flush.
                await self.link.client.srem(dirty_set, key)
                taken.append((key, await self._take([key])))
        except REDIS_DOWN_ERRORS as error:
            self.link.lost(error)
        return taken

    @staticmethod
    async def _write(write: Callable[[list], None], records: list, restore: Callable) -> None:
        """Records -> SQL; should that fail, each goes back into memory for the next round."""
        if not records:
            return
        try:
            await asyncio.to_thread(write, records)
        except Exception:
            for record in records:
                restore(record)
            raise

    def _restore(self, row: UsageRecord) -> None:
        pending = self._pending[(row.day, row.tenant, row.api_key_id)]
        for name, value in row.counts.items():
            pending[name] += value

    def _restore_billable(self, row: BillableRecord) -> None:
        self._billable[(row.day, row.tenant, row.resource, row.tier)] += row.quantity


def _counts(flat: list[bytes]) -> Mapping[str, int]:
    pairs = zip(flat[::2], flat[1::2], strict=True)
    return {name.decode(): int(value) for name, value in pairs if name.decode() in USAGE_FIELDS}


def _billable_records(hash_key: str, flat: list[bytes]) -> list[BillableRecord]:
    """A billable hash's fields ("resource/tier" -> quantity) as rows of its tenant and day."""
    prefix, _, day = hash_key.partition(":billable:")
    tenant = prefix.removeprefix("maas:{").removesuffix("}")
    records = []
    for field, value in zip(flat[::2], flat[1::2], strict=True):
        resource, _, tier = field.decode().partition("/")
        if int(value):
            records.append(BillableRecord(day, tenant, resource, tier, int(value)))
    return records
