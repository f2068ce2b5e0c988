"""How a canary's share of the traffic is chosen, the same way in the gateway and the inference
service: a request id always lands on the same side of the split."""

from __future__ import annotations

import zlib


def goes_to_canary(request_id: str, weight_percent: int) -> bool:
    """Whether this request is one of the canary's `weight_percent` in 100. The interceptor gives
    requests without an x-request-id a random one, so those spread evenly."""
    return zlib.crc32(request_id.encode()) % 100 < weight_percent
