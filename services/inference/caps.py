"""Per-tenant caps on serving: how many deployments a tenant keeps, and how much memory their
model processes are estimated to take. One tenant cannot fill the serving hosts for all.

The estimate is what a deployment costs whether or not anyone calls it: each Triton model
instance is its own python-backend process, about MODEL_PROCESS_MB with torch imported
(measured on this platform's stub), plus the artifact it holds; a canary is a second copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from services.common.errors import ResourceExhausted
from services.inference.store import Deployment

MODEL_PROCESS_MB = 300
MIB = 1024 * 1024


def memory_mb(deployment: Deployment) -> int:
    """Estimated resident memory of a deployment's model processes."""
    copies = 2 if deployment.canary is not None else 1
    per_instance = MODEL_PROCESS_MB + math.ceil(deployment.artifact_bytes / MIB)
    return copies * deployment.instances * per_instance


@dataclass(frozen=True)
class TenantCaps:
    max_deployments: int = 0  # 0: no cap
    max_memory_mb: int = 0  # 0: no cap

    def check(self, tenant: str, others: Iterable[Deployment], candidate: Deployment) -> None:
        """Refuse `candidate` (new, or a changed row of an existing deployment) when the tenant's
        deployments with it would pass a cap; `others` are the tenant's other deployments."""
        others = [other for other in others if other.id != candidate.id]
        if self.max_deployments and len(others) + 1 > self.max_deployments:
            raise ResourceExhausted(
                f"tenant {tenant!r} has {len(others)} deployments, the most it may keep "
                f"(MAAS_INFERENCE_MAX_DEPLOYMENTS_PER_TENANT={self.max_deployments}): delete one first"
            )
        total = sum(map(memory_mb, others)) + memory_mb(candidate)
        if self.max_memory_mb and total > self.max_memory_mb:
            raise ResourceExhausted(
                f"tenant {tenant!r}'s deployments would take an estimated {total} MB of model memory, "
                f"more than its cap (MAAS_INFERENCE_MAX_MEMORY_PER_TENANT_MB={self.max_memory_mb}); "
                f"this one needs {memory_mb(candidate)} MB (instances x ({MODEL_PROCESS_MB} MB per model "
                "process + the artifact), twice with a canary): lower instances or delete a deployment"
            )
