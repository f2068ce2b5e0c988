"""Rate limits and quotas.

A call is admitted against token buckets (requests per second with a burst, tokens per minute)
and period counters (requests, tokens, training seconds per UTC day and month). One Lua script
checks every bucket and counter and, only if all allow it, takes from all of them: one atomic
Redis round trip per call, one global budget however many gateway replicas share the Redis.
While Redis is down the same rules run in process (LocalLimiter), per replica; counters carry
on from the last values Redis reported."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client import Gauge
from redis.exceptions import NoScriptError

from services.common.errors import ResourceExhausted
from services.common.periodic import Periodic
from services.gateway.redis_link import REDIS_DOWN_ERRORS, RedisLink
from services.gateway.store import QuotaRecord, RateLimit
from services.gateway.usage import DIRTY_SET, HASH_TTL, usage_key

log = logging.getLogger(__name__)

# KEYS: buckets, then counters, then (when counted) the call's usage hash and the usage dirty set.
# ARGV: number of buckets, number of counters, 1 when usage is counted, the lease wanted (units
# beyond the call's own cost, 0 for none); then per bucket rate (per second), burst, cost; then
# per counter limit, cost, ttl seconds; then (when counted) the usage hash's ttl. A counter with
# cost 0 only checks that some budget is left. The usage hash counts the call as one of
# `requests` or `rejected`, in the same atomic step as the admission.
# A lease (see Leases) is granted only where every limit keeps plenty: at most 1/LEASE_HEADROOM
# of what each has left after the call, and none below LEASE_MIN units. Its units are taken from
# every bucket and counter like the call's own cost.
# Returns {1, lease granted, 0, 0, counter values...} when admitted, {0, index, remaining, retry
# milliseconds (-1: until the period ends)} when not.
ADMIT_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local buckets, counters, usage = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local grant = tonumber(ARGV[4])
local function count(field)
  if usage == 1 then
    local hash = KEYS[buckets + counters + 1]
    redis.call('HINCRBY', hash, field, 1)
    redis.call('EXPIRE', hash, ARGV[#ARGV])
    redis.call('SADD', KEYS[buckets + counters + 2], hash)
  end
end
local levels = {}
for i = 1, buckets do
  local rate, burst, cost = tonumber(ARGV[3*i + 2]), tonumber(ARGV[3*i + 3]), tonumber(ARGV[3*i + 4])
  local state = redis.call('HMGET', KEYS[i], 'tokens', 'ms')
  local tokens = tonumber(state[1]) or burst
  local since = math.max(0, now - (tonumber(state[2]) or now))
  tokens = math.min(burst, tokens + since * rate / 1000)
  if tokens < cost then
    count('rejected')
    return {0, i, math.floor(tokens), math.ceil((cost - tokens) * 1000 / rate)}
  end
  levels[i] = tokens - cost
  grant = math.min(grant, math.floor(levels[i] / HEADROOM))
end
local base = 3 * buckets + 4
local used = {}
for j = 1, counters do
  local limit, cost = tonumber(ARGV[base + 3*j - 2]), tonumber(ARGV[base + 3*j - 1])
  used[j] = tonumber(redis.call('GET', KEYS[buckets + j]) or '0')
  if used[j] + math.max(cost, 1) > limit then
    count('rejected')
    return {0, buckets + j, math.max(0, limit - used[j]), -1}
  end
  grant = math.min(grant, math.floor((limit - used[j] - math.max(cost, 1)) / HEADROOM))
end
if grant < MIN_LEASE then grant = 0 end
for i = 1, buckets do
  local rate, burst = tonumber(ARGV[3*i + 2]), tonumber(ARGV[3*i + 3])
  redis.call('HSET', KEYS[i], 'tokens', tostring(levels[i] - grant), 'ms', now)
  redis.call('PEXPIRE', KEYS[i], math.ceil(burst * 1000 / rate) + 1000)
end
local result = {1, grant, 0, 0}
for j = 1, counters do
  local key, cost, ttl = KEYS[buckets + j], tonumber(ARGV[base + 3*j - 1]), tonumber(ARGV[base + 3*j])
  if cost > 0 then
    result[4 + j] = redis.call('INCRBY', key, cost + grant)
    redis.call('EXPIRE', key, ttl)
  else
    result[4 + j] = used[j]
  end
end
count('requests')
return result
"""
# Leases: a process takes up to LEASE_UNITS calls' worth of every limit a call meets in one go,
# and admits the next calls from it in memory, without a Redis round trip. Granted only while
# a limit keeps LEASE_HEADROOM times the lease (so it never binds where a limit is near), and
# what a lease did not use goes back after LEASE_SECONDS.
LEASE_UNITS = 32
LEASE_MIN = 4
LEASE_HEADROOM = 64
LEASE_SECONDS = 0.5
ADMIT_SCRIPT = f"local HEADROOM, MIN_LEASE = {LEASE_HEADROOM}, {LEASE_MIN}\n" + ADMIT_SCRIPT

# Settling: ARGV per key is delta, ttl. Returns the counters' new values.
ADJUST_SCRIPT = """
local values = {}
for i = 1, #KEYS do
  values[i] = redis.call('INCRBY', KEYS[i], ARGV[2*i - 1])
  redis.call('EXPIRE', KEYS[i], ARGV[2*i])
end
return values
"""

# Writing back what a gateway admitted while Redis was down, in one atomic step. KEYS: counters,
# then usage hashes, then the usage dirty set. ARGV: number of counters; per counter delta, seen
# (what this gateway last saw of it from Redis), ttl; the usage hashes' ttl; per usage hash its
# number of fields, then field, count pairs. A Redis killed with writes not yet on disk comes
# back with counters too low. Each counter's `:repair` hash gathers, for 5 minutes after an
# outage, the highest value any gateway saw before it (`base`) and the deltas written back since
# (`added`): the counter ends at least at base + added, what it held before the outage plus all
# that was admitted in process. Returns the counters' new values.
WRITE_BACK_SCRIPT = """
local counters = tonumber(ARGV[1])
local values = {}
for i = 1, counters do
  local delta, seen, ttl = tonumber(ARGV[3*i - 1]), tonumber(ARGV[3*i]), tonumber(ARGV[3*i + 1])
  local repair = KEYS[i] .. ':repair'
  local value = redis.call('INCRBY', KEYS[i], delta)
  local base = math.max(tonumber(redis.call('HGET', repair, 'base') or '0'), seen)
  local added = redis.call('HINCRBY', repair, 'added', delta)
  redis.call('HSET', repair, 'base', base)
  redis.call('EXPIRE', repair, 300)
  if value < base + added then
    value = base + added
    redis.call('SET', KEYS[i], value)
  end
  redis.call('EXPIRE', KEYS[i], ttl)
  values[i] = value
end
local at = 3 * counters + 2
local ttl = ARGV[at]
at = at + 1
for k = counters + 1, #KEYS - 1 do
  local fields = tonumber(ARGV[at])
  at = at + 1
  for _ = 1, fields do
    redis.call('HINCRBY', KEYS[k], ARGV[at], ARGV[at + 1])
    at = at + 2
  end
  redis.call('EXPIRE', KEYS[k], ttl)
  redis.call('SADD', KEYS[#KEYS], KEYS[k])
end
return values
"""

# Giving back part of what a reservation took from token buckets. ARGV per key: amount, burst.
# A bucket that expired meanwhile is full again and is left alone.
REFUND_SCRIPT = """
for i = 1, #KEYS do
  local tokens = tonumber(redis.call('HGET', KEYS[i], 'tokens'))
  if tokens then
    local refilled = math.min(tonumber(ARGV[2*i]), tokens + tonumber(ARGV[2*i - 1]))
    redis.call('HSET', KEYS[i], 'tokens', tostring(refilled))
  end
end
return #KEYS
"""

DAY_TTL = 2 * 86400
MONTH_TTL = 32 * 86400
# Keys whose request plans a Gate keeps (one per key that called); past it they are built again.
MAX_PLANS = 100_000

# What an alert on a quota near exhaustion reads; above 1 when settled usage overshot the budget.
QUOTA_USED = Gauge(
    "maas_gateway_quota_used_ratio",
    "Part of a tenant's quota used in the current period, as last seen by this gateway",
    ["tenant", "resource", "period"],
)


@dataclass(frozen=True)
class Bucket:
    """A token bucket: `rate` tokens per second refill it up to `burst`; a call takes `cost`."""

    key: str
    rate: float
    burst: float
    cost: float
    what: str  # for people: "requests per second of API key abc"
    subject: str  # QuotaFailure subject, e.g. "tenant:acme"


@dataclass(frozen=True)
class Counter:
    """A budget for a period: the call adds `cost`; refused once `limit` would be passed."""

    key: str
    limit: int
    cost: int
    ttl_seconds: int
    reset_at: float  # unix time the period ends
    what: str
    subject: str
    # (tenant, resource, period) of the maas_gateway_quota_used_ratio gauge; empty: not reported.
    labels: tuple[str, ...] = ()

    def report(self, used: int) -> None:
        if self.labels and self.limit > 0:
            QUOTA_USED.labels(*self.labels).set(used / self.limit)


@dataclass(frozen=True)
class Denial:
    limit: Bucket | Counter
    remaining: int
    retry_after_seconds: float
    # Why, when not simply "exhausted": the budget cannot be checked right now.
    reason: str = ""


class RateLimited(ResourceExhausted):
    """RESOURCE_EXHAUSTED with google.rpc RetryInfo and QuotaFailure details and
    x-ratelimit-limit/remaining/reset trailers, so clients know when to retry."""

    def __init__(self, denial: Denial) -> None:
        limit = denial.limit
        retry = max(denial.retry_after_seconds, 0.001)
        limit_value = limit.burst if isinstance(limit, Bucket) else limit.limit
        message = denial.reason or f"{limit.what} exhausted ({limit_value:g})"
        message += f"; retry in {retry:.3g} s"
        super().__init__(message)
        status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message)
        delay = Duration()
        delay.FromNanoseconds(int(retry * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        violation = error_details_pb2.QuotaFailure.Violation(subject=limit.subject, description=limit.what)
        status.details.add().Pack(error_details_pb2.QuotaFailure(violations=[violation]))
        self.trailing_metadata = (
            *rpc_status.to_status(status).trailing_metadata,
            ("x-ratelimit-limit", f"{limit_value:g}"),
            ("x-ratelimit-remaining", str(denial.remaining)),
            ("x-ratelimit-reset", str(math.ceil(retry))),
        )


class RedisDownPolicy(StrEnum):
    """What a gateway does with quota counters while Redis is unreachable."""

    LEASE = "lease"  # admit up to a share of what was left when Redis was last seen
    REFUSE = "refuse"  # refuse every call a quota applies to


@dataclass
class _Tally:
    """A quota counter as this process knows it."""

    ttl_seconds: int
    expires: float = 0.0
    seen: int | None = None  # what Redis last reported; None: never seen by this process
    delta: int = 0  # taken in process since then, not yet written back to Redis
    lease: int | None = None  # the most this process may take while Redis is down

    def known(self, now: float) -> bool:
        return self.seen is not None and self.expires > now


class LocalLimiter:
    """The fallback while Redis is down, and what this process must write back when it returns.

    Token buckets run the same rules as ADMIT_SCRIPT, per process (best effort). Quota counters
    are held to a lease: a `share` of what was left when Redis last reported the counter (the
    share is 1 / the number of gateway processes, so that all of them together stay within the
    quota), or refused outright (policy "refuse"). A counter this process never saw from Redis
    is refused: it may be anywhere up to its limit."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        share: float = 1.0,
        policy: RedisDownPolicy = RedisDownPolicy.LEASE,
        retry_seconds: float = 1.0,
    ) -> None:
        self.clock = clock
        self.share = share
        self.policy = policy
        self.retry_seconds = retry_seconds
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._counters: dict[str, _Tally] = {}
        self._unwritten: set[str] = set()  # counters with a delta or a lease to settle with Redis
        self._usage: defaultdict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))

    @property
    def pending(self) -> bool:
        """Whether something was taken in process that Redis does not know of yet."""
        return bool(self._unwritten or self._usage)

    def seen(self, key: str, used: int, ttl_seconds: int) -> None:
        """What Redis reported for a counter: the basis of a lease should Redis go away."""
        tally = self._counters.setdefault(key, _Tally(ttl_seconds))
        tally.seen, tally.expires = used, self.clock() + ttl_seconds

    def used(self, key: str) -> int:
        """The counter as far as this process knows: the floor Redis must not be below."""
        tally = self._counters.get(key)
        if tally is None:
            return 0
        return (tally.seen if tally.known(self.clock()) else 0) + tally.delta  # type: ignore[operator]

    def reserve(self, buckets: Sequence[Bucket], counters: Sequence[Counter]) -> Denial | None:
        now = self.clock()
        levels = []
        for bucket in buckets:
            tokens, at = self._buckets.get(bucket.key, (bucket.burst, now))
            tokens = min(bucket.burst, tokens + max(0.0, now - at) * bucket.rate)
            if tokens < bucket.cost:
                return Denial(bucket, math.floor(tokens), (bucket.cost - tokens) / bucket.rate)
            levels.append(tokens - bucket.cost)
        for counter in counters:
            denial = self._check(counter, now)
            if denial is not None:
                return denial
        for bucket, level in zip(buckets, levels, strict=True):
            self._buckets[bucket.key] = (level, now)
        for counter in counters:
            self._take(counter.key, counter.cost, counter.ttl_seconds)
        return None

    def _check(self, counter: Counter, now: float) -> Denial | None:
        tally = self._counters.get(counter.key)
        unreachable = f"{counter.what} cannot be checked while the quota store (Redis) is unreachable"
        if self.policy is RedisDownPolicy.REFUSE or tally is None or not tally.known(now):
            return Denial(counter, 0, self.retry_seconds, unreachable)
        seen = tally.seen or 0
        if tally.lease is None:
            tally.lease = math.floor(max(0, counter.limit - seen) * self.share)
            self._unwritten.add(counter.key)
        if counter.cost > 0:
            over = tally.delta + counter.cost > tally.lease
        else:
            over = seen + tally.delta + 1 > counter.limit
        if over:
            left = max(0, min(tally.lease - tally.delta, counter.limit - seen - tally.delta))
            reason = f"{unreachable}, and this gateway's share of it ({tally.lease}) is used up"
            return Denial(counter, left, self.retry_seconds, reason)
        return None

    def _take(self, key: str, delta: int, ttl_seconds: int) -> None:
        tally = self._counters.setdefault(key, _Tally(ttl_seconds))
        tally.delta += delta
        self._unwritten.add(key)

    def refund(self, buckets: Sequence[Bucket]) -> None:
        for bucket in buckets:
            if bucket.key in self._buckets:
                tokens, at = self._buckets[bucket.key]
                self._buckets[bucket.key] = (min(bucket.burst, tokens + bucket.cost), at)

    def adjust(self, counters: Sequence[tuple[str, int, int]]) -> None:
        """Settled usage (a delta, maybe past the lease: it was used) for the write-back."""
        for key, delta, ttl in counters:
            self._take(key, delta, ttl)

    def count(self, usage_key: str, field: str, value: int = 1) -> None:
        """A call's usage while Redis is down, written back with the counters."""
        self._usage[usage_key][field] += value

    def unwritten(self) -> tuple[list[tuple[str, int, int, int]], dict[str, dict[str, int]]]:
        """What to write back: (key, delta, seen, ttl) per counter, and the usage counts, which
        leave this process (`restore` puts them back should the write fail)."""
        now = self.clock()
        counters = []
        for key in sorted(self._unwritten):
            tally = self._counters[key]
            seen = tally.seen if tally.known(now) and tally.seen is not None else 0
            counters.append((key, tally.delta, seen, tally.ttl_seconds))
        return counters, self.take_usage()

    def take_usage(self) -> dict[str, dict[str, int]]:
        """The usage counted in process (usage hash key -> counts), which leaves it."""
        usage = {key: dict(counts) for key, counts in self._usage.items()}
        self._usage.clear()
        return usage

    def restore(self, usage: dict[str, dict[str, int]]) -> None:
        for key, counts in usage.items():
            for field, value in counts.items():
                self._usage[key][field] += value

    def written(self, counters: Sequence[tuple[str, int, int, int]], values: Sequence[int]) -> None:
        """Redis took the write-back: its values are the new basis, the leases are over."""
        for (key, delta, _, ttl), value in zip(counters, values, strict=True):
            tally = self._counters[key]
            tally.delta -= delta  # what was taken meanwhile stays for the next write-back
            tally.seen, tally.expires, tally.lease = int(value), self.clock() + ttl, None
            if tally.delta == 0:
                self._unwritten.discard(key)


class Leases:
    """This process's leases: units of a call's limits (its buckets and counters, which the call
    takes the same cost from: 1 request, or a text call's tokens) taken from Redis ahead of the
    calls, so that the next calls meeting the same limits are admitted in memory. Exact where it
    matters: a lease only takes what its limits have to spare many times over (ADMIT_SCRIPT), so
    no limit is ever passed, and where one is near no lease is granted and every call goes to
    Redis. A lease held by one gateway process may hold back at most its unused units from the
    others, for at most LEASE_SECONDS."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        # Limits (as of cost 1) -> (units, expires).
        self._held: dict[tuple[Bucket | Counter, ...], tuple[int, float]] = {}
        self._asking: set[tuple[Bucket | Counter, ...]] = set()

    def take(self, limits: tuple[Bucket | Counter, ...], cost: int = 1) -> bool:
        """One call's worth (`cost` units) from a live lease on exactly these limits, if there is one."""
        key = _per_unit(limits)
        held = self._held.get(key)
        if held is None or held[0] < cost or held[1] <= self.clock():
            return False
        self._held[key] = (held[0] - cost, held[1])
        return True

    def ask(self, limits: tuple[Bucket | Counter, ...], cost: int = 1) -> int:
        """The lease a call going to Redis asks for (units beyond its own cost): one per limit
        set at a time, so that a burst of concurrent calls does not take a lease each."""
        key = _per_unit(limits)
        if key in self._asking:
            return 0
        self._asking.add(key)
        return LEASE_UNITS * cost

    def asked(self, limits: tuple[Bucket | Counter, ...]) -> None:
        self._asking.discard(_per_unit(limits))

    def granted(self, limits: tuple[Bucket | Counter, ...], units: int) -> None:
        key = _per_unit(limits)
        left, _ = self._held.get(key, (0, 0.0))
        self._held[key] = (left + units, self.clock() + LEASE_SECONDS)

    def expired(self, now: float) -> list[tuple[tuple[Bucket | Counter, ...], int]]:
        """Leases past their time, which leave: each with its limits (as of cost 1) and the units
        it did not use."""
        ended = [(limits, units) for limits, (units, expires) in self._held.items() if expires <= now]
        for limits, _ in ended:
            del self._held[limits]
        return [(limits, units) for limits, units in ended if units > 0]


def _per_unit(limits: tuple[Bucket | Counter, ...]) -> tuple[Bucket | Counter, ...]:
    """The limits as of cost 1: what a lease on them is known by, whatever each call costs."""
    if all(limit.cost == 1 for limit in limits):
        return limits
    return tuple(replace(limit, cost=1) for limit in limits)


class Limiter:
    """Reserves against Redis, or against the LocalLimiter while Redis is down.

    Reservations made in the same event-loop turn travel together in one pipeline: one write
    and one read for all of them instead of one each. Each is still its own atomic script.
    What was taken in process while Redis was down is written back (WRITE_BACK_SCRIPT) before
    anything is admitted against Redis again."""

    def __init__(
        self,
        link: RedisLink,
        local: LocalLimiter | None = None,
        count_leased: Callable[[str], None] | None = None,
    ) -> None:
        self.link = link
        self.local = local or LocalLimiter()
        self.leases = Leases()
        self._returns = Periodic("lease-returns", self._return_expired, LEASE_SECONDS / 2)
        # Counts a call admitted from a lease as `requests` of its usage hash, in memory (the
        # Meter, pushed to Redis every push interval) instead of in the admitting script.
        self.count_leased = count_leased
        self._admit = link.client.register_script(ADMIT_SCRIPT)
        self._adjust = link.client.register_script(ADJUST_SCRIPT)
        self._refund = link.client.register_script(REFUND_SCRIPT)
        self._write_back = link.client.register_script(WRITE_BACK_SCRIPT)
        self._writing_back = asyncio.Lock()
        self._queued: list[tuple[list[str], list[float | int], asyncio.Future[list[int]]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        link.when_back.append(self.write_back)

    async def _redis_ready(self) -> bool:
        """Redis is up and holds everything this process took: admit against it."""
        if not self.link.up:
            return False
        return not self.local.pending or await self.write_back()

    async def write_back(self) -> bool:
        """Write what was taken in process while Redis was down to Redis, in one atomic script;
        whether Redis now holds it all."""
        async with self._writing_back:
            if not self.local.pending:
                return True
            if not self.link.up:
                return False
            counters, usage = self.local.unwritten()
            keys = [key for key, *_ in counters] + list(usage) + [DIRTY_SET]
            args: list[int | str] = [len(counters)]
            for _, delta, seen, ttl in counters:
                args += [delta, seen, ttl]
            args.append(HASH_TTL)
            for counts in usage.values():
                args.append(len(counts))
                for field, value in counts.items():
                    args += [field, value]
            try:
                values = await self._write_back(keys, args)
            except REDIS_DOWN_ERRORS as error:
                # Unknown whether it landed; writing it again may count it twice, never less.
                self.local.restore(usage)
                self.link.lost(error)
                return False
            self.local.written(counters, [int(value) for value in values])
            log.info("wrote back what was admitted while redis was away", extra={"counters": len(counters)})
            return True

    def _run_admit(self, keys: list[str], args: list[float | int]) -> asyncio.Future[list[int]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[int]] = loop.create_future()
        self._queued.append((keys, args, future))
        if len(self._queued) == 1:
            loop.call_soon(self._send_queued)
        return future

    def _send_queued(self) -> None:
        queued, self._queued = self._queued, []
        task = asyncio.get_running_loop().create_task(self._send(queued))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(
        self, queued: list[tuple[list[str], list[float | int], asyncio.Future[list[int]]]]
    ) -> None:
        try:
            if len(queued) == 1:
                keys, args, _ = queued[0]
                results: list[Any] = [await self._admit(keys, args)]
            else:
                results = await self._pipelined(queued)
        except Exception as error:  # noqa: BLE001 - every waiter learns of the failure, whatever it is
            for _, _, future in queued:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, _, future), result in zip(queued, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def _pipelined(self, queued: list[tuple[list[str], list[float | int], Any]]) -> list[Any]:
        for attempt in (1, 2):
            pipe = self.link.client.pipeline(transaction=False)
            for keys, args, _ in queued:
                pipe.evalsha(self._admit.sha, len(keys), *keys, *args)
            try:
                return await pipe.execute()
            except NoScriptError:
                # A restarted Redis forgot the script: load it once, send again.
                if attempt == 2:
                    raise
                await self.link.client.script_load(ADMIT_SCRIPT)
        raise AssertionError("unreachable")

    async def reserve(
        self,
        buckets: Sequence[Bucket],
        counters: Sequence[Counter],
        usage_key: str = "",
        lease: bool = False,
    ) -> Denial | None:
        """All or nothing: takes from every bucket and counter, or from none and says why.
        With a `usage_key`, the call is counted there as admitted (`requests`) or `rejected`.
        With `lease` (every limit at the same cost), the call may be admitted from this
        process's lease on its limits, and may take a lease for the calls that follow; one
        admitted from a lease is counted with `count_leased`."""
        limits = (*buckets, *counters)
        cost = limits[0].cost if limits else 1
        want = 0
        if lease and cost > 0 and all(limit.cost == cost for limit in limits):
            if self.leases.take(limits, cost):
                if usage_key and self.count_leased is not None:
                    self.count_leased(usage_key)
                return None
            want = self.leases.ask(limits, cost)
        try:
            return await self._reserve(buckets, counters, usage_key, want)
        finally:
            if want:
                self.leases.asked(limits)

    async def _reserve(
        self, buckets: Sequence[Bucket], counters: Sequence[Counter], usage_key: str, want: int
    ) -> Denial | None:
        if await self._redis_ready():
            keys = [b.key for b in buckets] + [c.key for c in counters]
            args: list[float | int] = [len(buckets), len(counters), 1 if usage_key else 0, want]
            for b in buckets:
                args += [b.rate, b.burst, b.cost]
            for c in counters:
                args += [c.limit, c.cost, c.ttl_seconds]
            if usage_key:
                keys += [usage_key, DIRTY_SET]
                args.append(HASH_TTL)
            try:
                result = await self._run_admit(keys, args)
            except REDIS_DOWN_ERRORS as error:
                # Whether Redis ran it is unknown: counted again in process, it may count twice.
                self.link.lost(error)
            else:
                if want and int(result[0]) and int(result[1]):
                    self.leases.granted((*buckets, *counters), int(result[1]))
                return self._read(result, buckets, counters)
        denial = self.local.reserve(buckets, counters)
        if usage_key:
            self.local.count(usage_key, "rejected" if denial else "requests")
        for counter in counters:
            counter.report(self.local.used(counter.key))
        return denial

    def start(self) -> None:
        self._returns.start()

    async def close(self) -> None:
        """Give back every lease's unused units, so that a stopped gateway strands nothing."""
        await self._returns.close()
        await self.give_back(self.leases.expired(float("inf")))

    async def _return_expired(self) -> None:
        await self.give_back(self.leases.expired(time.monotonic()))

    async def give_back(self, unused: Sequence[tuple[tuple[Bucket | Counter, ...], int]]) -> None:
        """Return what expired leases did not use to their buckets and counters."""
        for limits, units in unused:
            await self.adjust([replace(c, cost=-units) for c in limits if isinstance(c, Counter)])
            await self.refund([replace(b, cost=units) for b in limits if isinstance(b, Bucket)])

    def _read(
        self, result: list[int], buckets: Sequence[Bucket], counters: Sequence[Counter]
    ) -> Denial | None:
        admitted, index, remaining, retry_ms = (int(v) for v in result[:4])
        if admitted:  # (index is the lease granted)
            for counter, used in zip(counters, result[4:], strict=True):
                self.local.seen(counter.key, int(used), counter.ttl_seconds)
                counter.report(int(used))
            return None
        limits = [*buckets, *counters]
        limit = limits[index - 1]
        if isinstance(limit, Counter):
            limit.report(limit.limit - remaining)
            self.local.seen(limit.key, limit.limit - remaining, limit.ttl_seconds)
        retry = retry_ms / 1000 if retry_ms >= 0 else limit.reset_at - time.time()  # type: ignore[union-attr]
        return Denial(limit, remaining, retry)

    async def adjust(self, counters: Sequence[Counter]) -> None:
        """Add each counter's cost (a delta) to it: settling a reservation with what was really used."""
        if not counters:
            return
        if await self._redis_ready():
            args: list[int] = []
            for counter in counters:
                args += [counter.cost, counter.ttl_seconds]
            try:
                values = await self._adjust([counter.key for counter in counters], args)
            except REDIS_DOWN_ERRORS as error:
                self.link.lost(error)
            else:
                for counter, used in zip(counters, values, strict=True):
                    self.local.seen(counter.key, int(used), counter.ttl_seconds)
                    counter.report(int(used))
                return
        self.local.adjust([(counter.key, counter.cost, counter.ttl_seconds) for counter in counters])
        for counter in counters:
            counter.report(self.local.used(counter.key))

    async def refund(self, buckets: Sequence[Bucket]) -> None:
        """Give each bucket its cost back (up to its burst): a reservation used less than it took."""
        if not buckets:
            return
        if self.link.up:
            args: list[float] = []
            for bucket in buckets:
                args += [bucket.cost, bucket.burst]
            try:
                await self._refund([bucket.key for bucket in buckets], args)
                return
            except REDIS_DOWN_ERRORS as error:
                self.link.lost(error)
        self.local.refund(buckets)


@dataclass(frozen=True)
class Periods:
    """The UTC day and month a call falls in, and when each ends."""

    day: str
    month: str
    day_ends: float
    month_ends: float

    @classmethod
    def at(cls, unix_time: float) -> Periods:
        now = datetime.fromtimestamp(unix_time, UTC)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        next_month = (day.replace(day=1) + timedelta(days=32)).replace(day=1)
        return cls(
            day.strftime("%Y-%m-%d"),
            day.strftime("%Y-%m"),
            (day + timedelta(days=1)).timestamp(),
            next_month.timestamp(),
        )


class Gate:
    """Which limits apply to a call, and the reservation against them (which also counts the
    call's usage). Limits that are zero (unlimited) are skipped."""

    def __init__(self, limiter: Limiter, default_key_limit: RateLimit) -> None:
        self.limiter = limiter
        self.default_key_limit = default_key_limit
        self._periods = Periods.at(time.time())
        # key id -> (its limit, its quota, the periods, the plan built from them): _request_plan.
        self._plans: dict[str, tuple[RateLimit, QuotaRecord, Periods, tuple[list[Bucket], list[Counter], str]]] = {}

    def periods(self) -> Periods:
        now = time.time()
        if now >= self._periods.day_ends:
            self._periods = Periods.at(now)
        return self._periods

    async def admit(
        self,
        tenant: str,
        key_id: str,
        key_limit: RateLimit | None,
        quota: QuotaRecord,
        tokens: int = 0,
        lease: bool = False,
    ) -> None:
        """Reserve one request (and `tokens` generated tokens) for a call; RateLimited if over.
        With `lease`, a call no limit binds may be admitted from a lease (Leases)."""
        limit = key_limit or self.default_key_limit
        buckets, counters, usage = self._request_plan(tenant, key_id, limit, quota)
        if tokens:
            buckets = [*buckets, *self._token_buckets(tenant, key_id, limit, quota, tokens)]
            counters = [
                *counters, *self._counters(tenant, "tokens", quota.tokens_per_day, quota.tokens_per_month, tokens)
            ]
        # Even a call without limits goes through the limiter: its usage is counted in Redis, in
        # the same pipeline as the calls admitted in the same event-loop turn, or from a lease.
        denial = await self.limiter.reserve(buckets, counters, usage, lease=lease and not tokens)
        if denial is not None:
            raise RateLimited(denial)

    async def reserve_tokens(
        self, tenant: str, key_id: str, key_limit: RateLimit | None, quota: QuotaRecord, tokens: int
    ) -> None:
        """Reserve `tokens` for a call admitted already (its request counted); RateLimited if over."""
        buckets = self._token_buckets(tenant, key_id, key_limit or self.default_key_limit, quota, tokens)
        counters = self._counters(tenant, "tokens", quota.tokens_per_day, quota.tokens_per_month, tokens)
        if buckets or counters:
            # From a lease where no token limit is near: no Redis round trip before the first token.
            denial = await self.limiter.reserve(buckets, counters, lease=True)
            if denial is not None:
                raise RateLimited(denial)

    async def settle_tokens(
        self, tenant: str, key_id: str, key_limit: RateLimit | None, quota: QuotaRecord, reserved: int, used: int
    ) -> None:
        """After a text call: count the tokens really used instead of the reservation, in the
        day and month quotas and in the tokens-per-minute buckets (what was not used goes back)."""
        await self._settle(tenant, "tokens", quota.tokens_per_day, quota.tokens_per_month, used - reserved)
        if used < reserved:
            limit = key_limit or self.default_key_limit
            await self.limiter.refund(self._token_buckets(tenant, key_id, limit, quota, reserved - used))

    async def check_training(self, tenant: str, quota: QuotaRecord) -> None:
        """Before a training job: refuse once the tenant's training minutes are used up."""
        counters = self._counters(
            tenant,
            "training_seconds",
            quota.training_minutes_per_day * 60,
            quota.training_minutes_per_month * 60,
            0,
        )
        if counters:
            denial = await self.limiter.reserve([], counters)
            if denial is not None:
                raise RateLimited(denial)

    async def settle_training(self, tenant: str, quota: QuotaRecord, seconds: int) -> None:
        """What a training job really ran, reported when it ends (or as it goes)."""
        await self._settle(
            tenant,
            "training_seconds",
            quota.training_minutes_per_day * 60,
            quota.training_minutes_per_month * 60,
            seconds,
        )

    def _request_plan(
        self, tenant: str, key_id: str, limit: RateLimit, quota: QuotaRecord
    ) -> tuple[list[Bucket], list[Counter], str]:
        """The buckets and counters one request of this key is reserved against, and its usage
        key: built once per key and reused while its limit, its tenant's quota (the same cached
        objects) and the day stay the same."""
        periods = self.periods()
        cached = self._plans.get(key_id)
        if cached is not None and cached[0] is limit and cached[1] is quota and cached[2] is periods:
            return cached[3]
        buckets = []
        if limit.requests_per_second > 0:
            key = f"maas:{{{tenant}}}:rl:key:{key_id}"
            buckets.append(_requests_bucket(key, limit, f"API key {key_id}", f"key:{key_id}"))
        if quota.rate_limit.requests_per_second > 0:
            key = f"maas:{{{tenant}}}:rl:tenant"
            buckets.append(_requests_bucket(key, quota.rate_limit, f"tenant {tenant}", f"tenant:{tenant}"))
        counters = self._counters(tenant, "requests", quota.requests_per_day, quota.requests_per_month, 1)
        plan = (buckets, counters, usage_key(periods.day, tenant, key_id))
        if len(self._plans) >= MAX_PLANS:
            self._plans.clear()
        self._plans[key_id] = (limit, quota, periods, plan)
        return plan

    def _counters(self, tenant: str, unit: str, per_day: int, per_month: int, cost: int) -> list[Counter]:
        periods = self.periods()
        counters = []
        if per_day > 0:
            counters.append(
                Counter(
                    f"maas:{{{tenant}}}:q:{unit}:{periods.day}",
                    per_day,
                    cost,
                    DAY_TTL,
                    periods.day_ends,
                    f"{unit.replace('_', ' ')} per day of tenant {tenant}",
                    f"tenant:{tenant}",
                    (tenant, unit, "day"),
                )
            )
        if per_month > 0:
            counters.append(
                Counter(
                    f"maas:{{{tenant}}}:q:{unit}:{periods.month}",
                    per_month,
                    cost,
                    MONTH_TTL,
                    periods.month_ends,
                    f"{unit.replace('_', ' ')} per month of tenant {tenant}",
                    f"tenant:{tenant}",
                    (tenant, unit, "month"),
                )
            )
        return counters

    async def _settle(self, tenant: str, unit: str, per_day: int, per_month: int, delta: int) -> None:
        if delta:
            counters = self._counters(tenant, unit, per_day, per_month, delta)
            await self.limiter.adjust(counters)

    @staticmethod
    def _token_buckets(
        tenant: str, key_id: str, key_limit: RateLimit, quota: QuotaRecord, tokens: int
    ) -> list[Bucket]:
        buckets = []
        for key, limit, who, subject in (
            (f"maas:{{{tenant}}}:tpm:key:{key_id}", key_limit, f"API key {key_id}", f"key:{key_id}"),
            (f"maas:{{{tenant}}}:tpm:tenant", quota.rate_limit, f"tenant {tenant}", f"tenant:{tenant}"),
        ):
            if limit.tokens_per_minute > 0:
                per_minute = float(limit.tokens_per_minute)
                what = f"tokens per minute of {who}"
                buckets.append(Bucket(key, per_minute / 60, per_minute, tokens, what, subject))
        return buckets


def _requests_bucket(key: str, limit: RateLimit, who: str, subject: str) -> Bucket:
    burst = float(limit.burst or max(1.0, limit.requests_per_second))
    return Bucket(key, limit.requests_per_second, burst, 1, f"requests per second of {who}", subject)
