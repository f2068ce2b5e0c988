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


def replica_memory_mb(deployment: Deployment) -> int:
    """Estimated resident memory of one replica: its model processes, each holding the artifact."""
    return deployment.instances * (MODEL_PROCESS_MB + math.ceil(deployment.artifact_bytes / MIB))


def memory_mb(deployment: Deployment) -> int:
    """Estimated resident memory of a deployment at its most replicas (one more with a canary)."""
    copies = max(1, deployment.max_replicas) + (1 if deployment.canary is not None else 0)
    return copies * replica_memory_mb(deployment)


def reserved_replicas(deployment: Deployment) -> int:
    """Replicas a deployment may come to hold: what its tenant's replica cap counts."""
    return max(1, deployment.min_replicas, deployment.max_replicas)


@dataclass(frozen=True)
class TenantCaps:
    max_deployments: int = 0  # 0: no cap
    max_memory_mb: int = 0  # 0: no cap
    max_replicas: int = 0  # 0: no cap; a tenant's own quota (max_replicas) overrides it

    def check(
        self, tenant: str, others: Iterable[Deployment], candidate: Deployment, max_replicas: int = 0
    ) -> None:
        """Refuse `candidate` (new, or a changed row of an existing deployment) when the tenant's
        deployments with it would pass a cap; `others` are the tenant's other deployments;
        `max_replicas` is the tenant's own replica cap (0: the service's)."""
        others = list(others)
        before = next((other for other in others if other.id == candidate.id), None)
        others = [other for other in others if other.id != candidate.id]
        replica_cap = max_replicas or self.max_replicas
        reserved = sum(map(reserved_replicas, others))
        # Only a change that reserves more replicas is held to the cap (a canary does not).
        grows = before is None or reserved_replicas(candidate) > reserved_replicas(before)
        if replica_cap and grows and reserved + reserved_replicas(candidate) > replica_cap:
            raise ResourceExhausted(
                f"tenant {tenant!r} may hold at most {replica_cap} replicas (max_replicas cap); its other "
                f"deployments reserve {reserved} and this one asks for {reserved_replicas(candidate)}: "
                "lower max_replicas, delete a deployment, or ask an admin to raise the cap "
                "(maas admin quota set TENANT --max-replicas N)"
            )
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
