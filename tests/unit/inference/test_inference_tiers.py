"""Price tiers: a deployment's tier follows the version it serves (its precision, or distilled
for a distillation's result), on the deployment and its canary as callers see them and on the
routes the gateway meters by, through every change of version: update, alias roll, canary
start, promote and rollback."""

from __future__ import annotations

import asyncio
import time

import pytest
from maas.registry.v1 import registry_pb2
from maas.tiers import PLATFORM_SOURCE, SOURCE_METADATA_KEY, UPLOAD_SOURCE, tier_of_version

from services.inference.deployments import Deployments, DeploymentSpec
from services.inference.servicer import deployment_message, route_message
from services.inference.store import READY
from tests.unit.inference.inference_fakes import TENANT, FakeRegistry
from tests.unit.inference.test_inference_service import deploy, wait_state

# What the trainer writes on the version a distillation job registers.
DISTILLED = registry_pb2.Lineage(
    job_id="job-0190aa", parent_version=1, hyperparameters={"method": "distill", "student": "mlp"}
)


@pytest.fixture
def registry() -> FakeRegistry:
    registry = FakeRegistry()
    registry.add("digits", 1)  # no precision tag: full precision
    registry.add("digits", 2, artifact=b"quantized", precision="int8")
    registry.add("digits", 3, artifact=b"student", precision="fp32", lineage=DISTILLED)
    registry.add("digits", 4, artifact=b"half", precision="fp16")
    registry.aliases[(TENANT, "digits", "production")] = 1
    return registry


@pytest.mark.parametrize(
    ("precision", "lineage", "tier"),
    [
        ("", None, "fp32"),
        ("fp32", None, "fp32"),
        ("fp16", None, "fp16"),
        ("int8", None, "int8"),
        # A tag that is no tier is priced as full precision, never cheaper.
        ("bf16", None, "fp32"),
        ("int8 ", None, "fp32"),
        ("fp32", DISTILLED, "distilled"),
        ("int8", registry_pb2.Lineage(hyperparameters={"method": "quantize", "precision": "int8"}), "int8"),
        # Trained, not distilled: its lineage holds the training spec, with no method.
        ("fp32", registry_pb2.Lineage(job_id="job-1", hyperparameters={"architecture": "mlp"}), "fp32"),
    ],
)
def test_a_versions_tier_is_distilled_or_its_precision(precision, lineage, tier):
    made = registry_pb2.Version(precision=precision, lineage=lineage, metadata={SOURCE_METADATA_KEY: PLATFORM_SOURCE})
    assert tier_of_version(made) == tier


@pytest.mark.parametrize("source", [UPLOAD_SOURCE, "", "trainer"])
def test_an_uploaders_claims_never_buy_a_cheaper_tier(source):
    """Only the registry writes maas.source; a version a tenant uploaded is fp32 whatever it says."""
    metadata = {SOURCE_METADATA_KEY: source} if source else {}
    for claim in (registry_pb2.Version(precision="int8"), registry_pb2.Version(lineage=DISTILLED)):
        claim.metadata.update(metadata)
        assert tier_of_version(claim) == "fp32"


def route_of(deployments: Deployments, name: str = "web"):
    return route_message(deployments.routes.get(TENANT, name), deployments.nodes)


async def test_each_deployment_serves_and_routes_under_its_versions_tier(deployments):
    for name, version in (("full", 1), ("quantized", 2), ("student", 3), ("half", 4)):
        await deploy(deployments, name, version=version)
    for name, tier in (("full", "fp32"), ("quantized", "int8"), ("student", "distilled"), ("half", "fp16")):
        deployment = await deployments.get(TENANT, name)
        assert deployment.tier == tier
        assert deployment_message(deployment).tier == tier
        assert route_of(deployments, name).tier == tier


async def ready_canary(deployments: Deployments, version: int) -> None:
    await deployments.rollouts.start_canary(TENANT, "web", version, 30, 0.0)
    deadline = time.monotonic() + 15
    while (await deployments.get(TENANT, "web")).canary.state != READY:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_a_canary_has_its_own_tier_until_it_is_promoted_or_rolled_back(deployments):
    deployments.converger.drain_seconds = 0
    await deploy(deployments)
    await ready_canary(deployments, 2)
    with_canary = await deployments.get(TENANT, "web")
    assert (with_canary.tier, with_canary.canary.tier) == ("fp32", "int8")
    assert deployment_message(with_canary).canary.tier == "int8"
    route = route_of(deployments)
    assert (route.tier, route.canary.version, route.canary.tier) == ("fp32", 2, "int8")

    rolled_back = await deployments.rollouts.rollback_canary(TENANT, "web")
    assert rolled_back.tier == "fp32" and not route_of(deployments).HasField("canary")

    await ready_canary(deployments, 3)
    promoted = await deployments.rollouts.promote_canary(TENANT, "web")
    assert (promoted.resolved_version, promoted.tier) == (3, "distilled")
    assert (await deployments.get(TENANT, "web")).tier == "distilled"
    assert route_of(deployments).tier == "distilled"


async def test_an_alias_roll_and_an_update_change_the_tier(deployments, registry):
    deployments.converger.drain_seconds = 0
    await deploy(deployments, version=None, alias="production")
    assert (await deployments.get(TENANT, "web")).tier == "fp32"
    registry.aliases[(TENANT, "digits", "production")] = 2
    await deployments.rollouts.follow_aliases()
    rolled = await wait_state(deployments, "web", READY)
    assert (rolled.resolved_version, rolled.tier) == (2, "int8")
    assert route_of(deployments).tier == "int8"
    await deployments.update(TENANT, DeploymentSpec(name="web", version=4), ["version"])
    updated = await wait_state(deployments, "web", READY)
    assert (updated.resolved_version, updated.tier) == (4, "fp16")
    assert route_of(deployments).tier == "fp16"


async def test_the_route_keeps_the_serving_versions_tier_until_the_new_one_serves(deployments, triton):
    """Requests answered by the old version during a roll are billed at the old version's tier."""
    deployments.converger.drain_seconds = 0
    await deploy(deployments)
    triton.load_delay = 0.5
    updated = await deployments.update(TENANT, DeploymentSpec(name="web", version=2), ["version"])
    assert updated.tier == "int8"  # what the deployment now targets ...
    route = route_of(deployments)
    assert (route.version, route.tier) == (1, "fp32")  # ... while version 1 still answers
    await wait_state(deployments, "web", READY)
    route = route_of(deployments)
    assert (route.version, route.tier) == (2, "int8")
