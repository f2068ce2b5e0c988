"""Issue 11 in the inference service: per-tenant caps on deployments and their memory, each
deployment's execution limit, and internal Triton names kept out of what callers read."""

from __future__ import annotations

import asyncio
import re

import pytest

from services.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.inference.caps import MODEL_PROCESS_MB, TenantCaps
from services.inference.deployments import Deployments, DeploymentSpec
from services.inference.store import FAILED, READY
from tests.unit.inference.inference_fakes import TENANT
from tests.unit.inference.test_inference_service import deploy, predict_request, wait_state

# The fake registry's artifacts are a few bytes: each instance counts MODEL_PROCESS_MB + 1 MB.
PER_INSTANCE_MB = MODEL_PROCESS_MB + 1
INTERNAL_NAME = re.compile(r"m_[0-9a-f]{32}")


def config_parameter(repository, triton_model: str, key: str) -> str:
    text = (repository.path(triton_model) / "config.pbtxt").read_text()
    match = re.search(rf'key: "{key}"\s*value: {{ string_value: "([^"]*)" }}', text)
    assert match, text
    return match.group(1)


async def test_a_tenant_keeps_at_most_its_deployment_cap_even_when_creating_at_once(deployments: Deployments):
    deployments.caps = TenantCaps(max_deployments=3)
    results = await asyncio.gather(
        *(deployments.create(TENANT, DeploymentSpec(name=f"d{i}", model="digits", version=1)) for i in range(8)),
        return_exceptions=True,
    )
    refused = [result for result in results if isinstance(result, Exception)]
    assert len(refused) == 5 and all(isinstance(error, ResourceExhausted) for error in refused)
    assert "MAAS_INFERENCE_MAX_DEPLOYMENTS_PER_TENANT=3" in str(refused[0])
    # Another tenant has its own cap; a deleted deployment frees a place.
    deployments.registry.add("digits", 1, tenant="other")
    await deployments.create("other", DeploymentSpec(name="d0", model="digits", version=1))
    created = [result for result in results if not isinstance(result, Exception)]
    await deployments.delete(TENANT, created[0].name)
    await deployments.create(TENANT, DeploymentSpec(name="again", model="digits", version=1))


async def test_the_memory_cap_counts_instances_and_artifacts_on_create_and_update(deployments: Deployments):
    deployments.caps = TenantCaps(max_memory_mb=4 * PER_INSTANCE_MB)
    await deploy(deployments, "big", instances=3)
    with pytest.raises(ResourceExhausted, match=r"MAAS_INFERENCE_MAX_MEMORY_PER_TENANT_MB=1204.*needs 602 MB"):
        await deployments.create(TENANT, DeploymentSpec(name="more", model="digits", version=1, instances=2))
    await deploy(deployments, "small", instances=1)  # exactly at the cap
    with pytest.raises(ResourceExhausted, match="lower instances or delete a deployment"):
        await deployments.update(TENANT, DeploymentSpec(name="big", instances=4), ["instances"])
    assert (await deployments.get(TENANT, "big")).instances == 3  # nothing changed
    await deployments.update(TENANT, DeploymentSpec(name="big", instances=2), ["instances"])


async def test_a_canary_counts_as_a_second_copy(deployments: Deployments):
    deployments.caps = TenantCaps(max_memory_mb=3 * PER_INSTANCE_MB)
    await deploy(deployments, "web", instances=2)
    with pytest.raises(ResourceExhausted, match="twice with a canary"):
        await deployments.rollouts.start_canary(TENANT, "web", 2, 10, 0.0)
    assert (await deployments.get(TENANT, "web")).canary is None


async def test_caps_of_zero_mean_none(deployments: Deployments):
    deployments.caps = TenantCaps()
    for index in range(4):
        await deployments.create(TENANT, DeploymentSpec(name=f"d{index}", model="digits", version=1, instances=16))


async def test_the_execution_limit_reaches_the_runner_and_a_change_reloads(deployments: Deployments, repository):
    deployments.converger.execution_limit = 30
    await deploy(deployments, "web")
    first = await deployments.get(TENANT, "web")
    assert first.execution_limit_seconds == 0
    assert config_parameter(repository, first.triton_model, "execution_limit_seconds") == "30"
    assert (repository.path(first.triton_model) / "1" / "execution_limit.py").is_file()
    await deployments.update(TENANT, DeploymentSpec(name="web", execution_limit_seconds=5), ["execution_limit_seconds"])
    second = await wait_state(deployments, "web", READY)
    assert second.triton_model != first.triton_model and second.execution_limit_seconds == 5
    assert config_parameter(repository, second.triton_model, "execution_limit_seconds") == "5"


@pytest.mark.parametrize("seconds", [-1, 3601, 2**31 - 1])
async def test_an_execution_limit_out_of_range_is_refused(deployments: Deployments, seconds: int):
    with pytest.raises(InvalidArgument, match="execution_limit_seconds must be between 1 and 3600"):
        await deployments.create(
            TENANT, DeploymentSpec(name="web", model="digits", version=1, execution_limit_seconds=seconds)
        )


async def test_a_failed_load_names_the_deployment_not_tritons_model_or_paths(deployments: Deployments, triton, repository):
    internal = "m_" + "ab" * 16 + "_0123abcd"
    triton.fail_loads = (
        f"failed to load '{internal}' version 1: Stub process '{internal}_0_0' is not healthy; "
        f"File \"{repository.root}/{internal}/1/model.py\", line 3"
    )
    await deployments.create(TENANT, DeploymentSpec(name="web", model="digits", version=1))
    failed = await wait_state(deployments, "web", FAILED)
    assert not INTERNAL_NAME.search(failed.message) and str(repository.root) not in failed.message
    assert "failed to load 'web'" in failed.message and "Stub process 'web' is not healthy" in failed.message
    assert '"<models>/web/1/model.py"' in failed.message


async def test_a_predict_error_names_the_deployment(deployments: Deployments, triton, monkeypatch):
    await deploy(deployments, "web")
    internal = (await deployments.get(TENANT, "web")).triton_model

    async def down(request, timeout):
        raise Unavailable(f"the model server is not ready for this deployment (Request for unknown model: '{internal}' is not found)")

    monkeypatch.setattr(triton, "infer", down)
    with pytest.raises(Unavailable) as error:
        await deployments.serving.predict(TENANT, predict_request("web"))
    assert internal not in str(error.value) and "unknown model: 'web'" in str(error.value)
