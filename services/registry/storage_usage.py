"""Storage byte-days: the bytes each tenant stores, sampled for billing per GB-month.

Every MAAS_REGISTRY_STORAGE_SAMPLE_SECONDS (and once at start) the registry records what each
tenant stores as the UTC day's sample: the sizes of its versions (archived ones included) and
dataset versions, a blob two versions share counted for each; deleted ones are gone. A day keeps
its largest sample, so several registry processes may all sample without a lock.

GetStorageUsage answers every day of a range up to today with the bytes stored that day: its
own sample, or else the latest earlier one carried forward (the registry was down, or the day's
first sample is still to come). Billing takes each day's bytes as byte-days: a month's GB-months
are their sum / 1e9 / the days of the month.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

from services.common.validation import check_day_range
from services.registry.store import RegistryStore, StorageDay

log = logging.getLogger(__name__)


def utc_today() -> date:
    return datetime.now(UTC).date()


class StorageMeter:
    def __init__(self, store: RegistryStore, today: Callable[[], date] = utc_today) -> None:
        self.store = store
        self.today = today

    async def sample(self) -> None:
        day = self.today().isoformat()
        samples = await asyncio.to_thread(self.store.sample_storage, day)
        log.info("storage sampled", extra={"day": day, "tenants": len(samples), "bytes": sum(samples.values())})

    async def usage(self, tenant: str, start_day: str, end_day: str) -> list[StorageDay]:
        """The tenant's bytes on each day from start_day to end_day, oldest first; days after today
        and before the tenant's first sample are left out."""
        first, last = check_day_range(start_day, end_day)
        last = min(last, self.today())
        if first > last:
            return []
        samples = await asyncio.to_thread(self.store.storage_days, tenant, first.isoformat(), last.isoformat())
        sampled = {sample.day: sample.bytes for sample in samples}
        carried = samples[0].bytes if samples and samples[0].day < first.isoformat() else None
        days = []
        for offset in range((last - first).days + 1):
            day = (first + timedelta(days=offset)).isoformat()
            carried = sampled.get(day, carried)
            if carried is not None:
                days.append(StorageDay(day, carried))
        return days
