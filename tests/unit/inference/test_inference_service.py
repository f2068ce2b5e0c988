"""The domain service with an in-memory registry and Triton (see conftest.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from maas.common.v1 import common_pb2
from maas.inference.v1 import inference_pb2
from maas.registry.v1 import registry_pb2

from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.common.logs import request_id_var
from services.inference import routes as routes_module
from services.inference.artifacts import ArtifactCache
from services.inference.deployments import Deployments, DeploymentSpec
from services.inference.store import FAILED, LOADING, READY
from tests.unit.inference.inference_fakes import TENANT, WEIGHTS, FakeRegistry, FakeTriton, one_node


async def wait_state(
    deployments: Deployments, name: str, state: str, tenant: str = TENANT, timeout: float = 5.0
):
    deadline = time.monotonic() + timeout
    while True:
        deployment = await deployments.get(tenant, name)
        if deployment.state == state:
            return deployment
        assert time.monotonic() < deadline, f"{name} is {deployment.state}: {deployment.message}"
        await asyncio.sleep(0.01)


def x_tensor(
    rows: int, columns: int = 4, datatype: int = common_pb2.DATA_TYPE_FP32, raw: bytes | None = None
):
    x = np.arange(rows * columns, dtype=np.float32).reshape(rows, columns)
    return x, common_pb2.Tensor(
        name="x", datatype=datatype, shape=[rows, columns], raw=x.tobytes() if raw is None else raw
    )


def predict_request(name: str = "web", rows: int = 2) -> inference_pb2.PredictRequest:
    _, tensor = x_tensor(rows)
    return inference_pb2.PredictRequest(deployment=name, inputs=[tensor])


async def deploy(deployments: Deployments, name: str = "web", **fields) -> None:
    fields.setdefault("version", 1)
    await deployments.create(TENANT, DeploymentSpec(name=name, model="digits", **fields))
    await wait_state(deployments, name, READY)


async def test_create_returns_loading_then_ready_with_a_complete_model_dir(deployments, triton, repository):
    created = await deployments.create(TENANT, DeploymentSpec(name="web", model="digits", version=1))
    assert created.state == LOADING
    assert (created.instances, created.max_batch_size, created.device) == (1, 8, "AUTO")
    assert created.triton_model.startswith("m_") and created.triton_model.replace("_", "").isalnum()
    ready = await wait_state(deployments, "web", READY)
    assert ready.message == "" and ready.resolved_version == 1
    assert created.triton_model in triton.loaded
    model_dir = repository.path(created.triton_model)
    assert (model_dir / "1" / "model.pt").read_bytes() == b"torchscript bytes"
    assert "class TritonPythonModel" in (model_dir / "1" / "model.py").read_text()
    assert f'name: "{created.triton_model}"' in (model_dir / "config.pbtxt").read_text()


async def test_an_alias_is_resolved_when_the_deployment_is_created(deployments, registry):
    registry.aliases[(TENANT, "digits", "production")] = 2
    created = await deployments.create(TENANT, DeploymentSpec(name="web", model="digits", alias="production"))
    assert (created.alias, created.version, created.resolved_version) == ("production", None, 2)


@pytest.mark.parametrize(
    "spec, complaint",
    [
        (DeploymentSpec(name="", model="digits", version=1), "deployment name is required"),
        (DeploymentSpec(name="Web_1", model="digits", version=1), "invalid deployment name"),
        (DeploymentSpec(name="web", model="", version=1), "model name is required"),
        (DeploymentSpec(name="web", model="digits"), "exactly one of version and alias"),
        (
            DeploymentSpec(name="web", model="digits", version=1, alias="prod"),
            "exactly one of version and alias",
        ),
        (DeploymentSpec(name="web", model="digits", version=0), "version must be 1 or more"),
        (DeploymentSpec(name="web", model="digits", alias="Bad Alias"), "invalid alias name"),
        (
            DeploymentSpec(name="web", model="digits", version=1, instances=17),
            "instances must be between 1 and 16",
        ),
        (
            DeploymentSpec(name="web", model="digits", version=1, instances=-1),
            "instances must be between 1 and 16",
        ),
        (
            DeploymentSpec(name="web", model="digits", version=1, max_batch_size=1025),
            "max_batch_size must be between",
        ),
        (
            DeploymentSpec(name="web", model="digits", version=1, max_batch_size=-3),
            "max_batch_size must be between",
        ),
        (DeploymentSpec(name="web", model="digits", version=1, device="TPU"), "device must be one of"),
    ],
)
async def test_create_refuses_bad_requests(deployments, spec, complaint):
    with pytest.raises(InvalidArgument, match=complaint):
        await deployments.create(TENANT, spec)


@pytest.mark.parametrize(
    "spec",
    [
        DeploymentSpec(name="web", model="nope", version=1),
        DeploymentSpec(name="web", model="digits", version=9),
        DeploymentSpec(name="web", model="digits", alias="staging"),
    ],
)
async def test_create_needs_the_version_in_the_tenant(deployments, spec):
    with pytest.raises(NotFound):
        await deployments.create(TENANT, spec)
    with pytest.raises(NotFound):
        await deployments.create("other", DeploymentSpec(name="web", model="digits", version=1))


async def test_create_refuses_versions_that_cannot_be_served(deployments, registry):
    registry.add("old", 1, state=registry_pb2.VERSION_STATE_ARCHIVED)
    registry.add("weird", 1, fmt=registry_pb2.ARTIFACT_FORMAT_UNSPECIFIED)
    text = common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="text", datatype=common_pb2.DATA_TYPE_BYTES, shape=[1])],
        outputs=[common_pb2.TensorSpec(name="y", datatype=common_pb2.DATA_TYPE_FP32, shape=[1])],
    )
    registry.add("texts", 1, signature=text)
    with pytest.raises(FailedPrecondition, match="archived"):
        await deployments.create(TENANT, DeploymentSpec(name="a", model="old", version=1))
    with pytest.raises(FailedPrecondition, match="TorchScript or ONNX"):
        await deployments.create(TENANT, DeploymentSpec(name="b", model="weird", version=1))
    with pytest.raises(FailedPrecondition, match="numeric tensors"):
        await deployments.create(TENANT, DeploymentSpec(name="c", model="texts", version=1))


async def test_gpu_on_a_host_without_one_is_refused_clearly(deployments):
    with pytest.raises(FailedPrecondition, match="no GPU; use AUTO or CPU"):
        await deployments.create(TENANT, DeploymentSpec(name="web", model="digits", version=1, device="GPU"))


async def test_names_are_unique_per_tenant(deployments, registry):
    await deployments.create(TENANT, DeploymentSpec(name="web", model="digits", version=1))
    with pytest.raises(AlreadyExists):
        await deployments.create(TENANT, DeploymentSpec(name="web", model="digits", version=2))
    registry.add("digits", 1, tenant="other")
    await deployments.create("other", DeploymentSpec(name="web", model="digits", version=1))


async def test_a_load_error_fails_the_deployment_with_tritons_reason(deployments, triton):
    triton.fail_loads = "load failed for model: RuntimeError: not a TorchScript archive"
    await deployments.create(TENANT, DeploymentSpec(name="web", model="digits", version=1))
    failed = await wait_state(deployments, "web", FAILED)
    assert "not a TorchScript archive" in failed.message
    with pytest.raises(FailedPrecondition, match="not a TorchScript archive"):
        await deployments.serving.predict(TENANT, predict_request())


async def test_an_artifact_with_the_wrong_sha256_fails_the_deployment(deployments, registry, tmp_path):
    registry.corrupt = True
    await deployments.create(TENANT, DeploymentSpec(name="web", model="digits", version=1))
    failed = await wait_state(deployments, "web", FAILED)
    assert "sha256" in failed.message
    assert not [p for p in (tmp_path / "artifacts").iterdir()]  # no stray partial file


async def test_an_unavailable_registry_is_retried(store, repository, triton, tmp_path):
    class FlakyRegistry(FakeRegistry):
        failures = 2

        async def chunks(self, tenant, model, version):
            if self.failures:
                self.failures -= 1
                raise Unavailable("registry is starting")
            async for chunk in super().chunks(tenant, model, version):
                yield chunk

    registry = FlakyRegistry()
    registry.add("digits", 1)
    cache = ArtifactCache(tmp_path / "artifacts", registry, retry_delays=(0.01, 0.01, 0.01))  # type: ignore[arg-type]
    path = await cache.fetch(TENANT, "digits", 1, registry.versions[(TENANT, "digits", 1)][0].sha256)
    assert path.read_bytes() == b"torchscript bytes"


async def test_predict_forwards_to_triton_and_converts_back(deployments, triton):
    await deploy(deployments)
    x, tensor = x_tensor(3)
    response = await deployments.serving.predict(
        TENANT, inference_pb2.PredictRequest(deployment="web", inputs=[tensor])
    )
    assert (response.model, response.version) == ("digits", 1)
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("y", common_pb2.DATA_TYPE_FP32, [3, 3])
    np.testing.assert_allclose(np.frombuffer(output.raw, dtype=np.float32).reshape(3, 3), x @ WEIGHTS)
    route = (await anext(deployments.routes.watch()))[0]
    assert triton.requests[-1].model_name == route.deployment.triton_model


async def test_predict_compiles_the_signature_once_per_deployment(deployments, monkeypatch):
    built = []
    real = routes_module.CompiledSignature
    monkeypatch.setattr(routes_module, "CompiledSignature", lambda *args: built.append(1) or real(*args))
    await deploy(deployments)
    for _ in range(5):
        await deployments.serving.predict(TENANT, predict_request())
    assert len(built) == 1


@pytest.mark.parametrize(
    "inputs, output_names, complaint",
    [
        ([x_tensor(2, datatype=common_pb2.DATA_TYPE_FP64, raw=b"\0" * 64)[1]], [], "datatype FP64"),
        ([x_tensor(2, columns=5)[1]], [], r"shape \[2, 5\]"),
        ([x_tensor(2, raw=b"\0" * 7)[1]], [], "carries 7 bytes"),
        (
            [common_pb2.Tensor(name="z", datatype=common_pb2.DATA_TYPE_FP32, shape=[1, 4], raw=b"\0" * 16)],
            [],
            "unknown input",
        ),
        ([], [], "missing input"),
        ([x_tensor(9)[1]], [], "exceeds this deployment's max_batch_size 8"),
        ([x_tensor(2)[1]], ["nope"], "unknown output"),
        ([common_pb2.Tensor(name="x", shape=[1, 4], raw=b"\0" * 16)], [], "needs a datatype"),
    ],
)
async def test_predict_refuses_inputs_that_do_not_match_the_signature(
    deployments, triton, inputs, output_names, complaint
):
    await deploy(deployments)
    request = inference_pb2.PredictRequest(deployment="web", inputs=inputs, output_names=output_names)
    with pytest.raises(InvalidArgument, match=complaint):
        await deployments.serving.predict(TENANT, request)
    assert not triton.requests


async def test_predict_finds_only_the_callers_deployments(deployments):
    await deploy(deployments)
    with pytest.raises(NotFound) as missing:
        await deployments.serving.predict("other", predict_request())
    assert str(missing.value) == "deployment 'web' not found"  # never another tenant's names
    with pytest.raises(NotFound, match=r"^deployment 'wbe' not found; did you mean 'web'\?$"):
        await deployments.serving.predict(TENANT, predict_request("wbe"))
    with pytest.raises(NotFound, match=r"did you mean 'web'\?"):
        await deployments.get(TENANT, "webb")
    with pytest.raises(NotFound):
        await deployments.serving.predict(TENANT, predict_request("missing"))
    with pytest.raises(InvalidArgument, match="invalid deployment name"):
        await deployments.serving.predict(TENANT, predict_request("Not A Name"))


async def test_predict_while_loading_waits_for_the_deployment(deployments, triton):
    triton.load_delay = 0.3
    await deployments.create(TENANT, DeploymentSpec(name="web", model="digits", version=1))
    assert (await deployments.serving.predict(TENANT, predict_request(), timeout=5)).version == 1


async def test_predict_while_loading_gives_up_at_its_deadline(deployments, triton):
    triton.load_delay = 1.0
    await deployments.create(TENANT, DeploymentSpec(name="web", model="digits", version=1))
    with pytest.raises(Unavailable, match="deployment 'web' is still loading"):
        await deployments.serving.predict(TENANT, predict_request(), timeout=0.05)
    await wait_state(deployments, "web", READY)


async def test_predict_while_loading_fails_fast_when_the_load_fails(deployments, triton):
    triton.load_delay = 0.1
    triton.fail_loads = "bad artifact"
    await deployments.create(TENANT, DeploymentSpec(name="web", model="digits", version=1))
    with pytest.raises(FailedPrecondition, match="bad artifact"):
        await deployments.serving.predict(TENANT, predict_request(), timeout=5)


async def test_an_update_rolls_to_the_new_version_while_the_old_one_serves(deployments, triton, repository):
    await deploy(deployments)
    old = (await deployments.get(TENANT, "web")).triton_model
    deployments.converger.drain_seconds = 0.2
    triton.load_delay = 0.3
    updated = await deployments.update(TENANT, DeploymentSpec(name="web", version=2), ["version"])
    assert updated.state == LOADING and "version 1 serves until it is ready" in updated.message
    # The new version is a Triton model of its own; the old one is untouched meanwhile.
    assert updated.triton_model != old
    response = await deployments.serving.predict(TENANT, predict_request())
    assert response.version == 1 and triton.requests[-1].model_name == old
    await wait_state(deployments, "web", READY)
    response = await deployments.serving.predict(TENANT, predict_request())
    assert response.version == 2 and triton.requests[-1].model_name == updated.triton_model
    # Both stay loaded while the old one drains, then only the new one.
    assert {old, updated.triton_model} <= triton.loaded
    await asyncio.sleep(0.5)
    assert triton.loaded == {updated.triton_model}
    assert repository.names() == {updated.triton_model}


async def test_a_superseded_roll_leaves_nothing_behind(deployments, triton, repository):
    await deploy(deployments)
    deployments.converger.drain_seconds = 0
    triton.load_delay = 0.2
    await deployments.update(TENANT, DeploymentSpec(name="web", version=2), ["version"])
    final = await deployments.update(TENANT, DeploymentSpec(name="web", version=1), ["version"])
    await wait_state(deployments, "web", READY)
    await asyncio.sleep(0.3)
    assert triton.loaded == {final.triton_model}
    assert repository.names() == {final.triton_model}


async def test_an_alias_following_deployment_rolls_when_the_alias_moves(deployments, registry, triton):
    deployments.converger.drain_seconds = 0
    await deploy(deployments, version=None, alias="production")
    await deployments.rollouts.follow_aliases()
    assert (await deployments.get(TENANT, "web")).state == READY  # nothing moved
    registry.aliases[(TENANT, "digits", "production")] = 2
    await deployments.rollouts.follow_aliases()
    rolled = await wait_state(deployments, "web", READY)
    assert rolled.resolved_version == 2 and rolled.alias == "production"
    assert (await deployments.serving.predict(TENANT, predict_request())).version == 2


async def test_an_alias_moved_to_an_unservable_version_is_refused_once(deployments, registry, triton):
    await deploy(deployments, version=None, alias="production")
    registry.add("digits", 3, state=registry_pb2.VERSION_STATE_ARCHIVED)
    registry.aliases[(TENANT, "digits", "production")] = 3
    loads = len(triton.loads)
    await deployments.rollouts.follow_aliases()
    await deployments.rollouts.follow_aliases()
    current = await deployments.get(TENANT, "web")
    assert current.resolved_version == 1 and current.state == READY
    assert len(triton.loads) == loads
    assert (await deployments.serving.predict(TENANT, predict_request())).version == 1


async def test_a_failed_update_leaves_the_old_version_serving(deployments, triton):
    await deploy(deployments)
    triton.fail_loads = "bad artifact"
    await deployments.update(TENANT, DeploymentSpec(name="web", version=2), ["version"])
    failed = await wait_state(deployments, "web", FAILED)
    assert "bad artifact" in failed.message and "version 1 keeps serving" in failed.message
    assert (await deployments.serving.predict(TENANT, predict_request())).version == 1


async def test_update_of_cacheable_alone_does_not_reload(deployments, triton):
    await deploy(deployments)
    loads = len(triton.loads)
    updated = await deployments.update(TENANT, DeploymentSpec(name="web", cacheable=True), ["cacheable"])
    assert updated.cacheable and updated.state == READY
    assert len(triton.loads) == loads
    (route,) = await anext(deployments.routes.watch())
    assert route.ready and route.deployment.cacheable


async def test_update_of_instances_rewrites_the_config_and_reloads(deployments, triton, repository):
    await deploy(deployments)
    updated = await deployments.update(
        TENANT,
        DeploymentSpec(name="web", instances=3, max_batch_size=64, device="CPU"),
        ["instances", "max_batch_size", "device"],
    )
    await wait_state(deployments, "web", READY)
    config = (repository.path(updated.triton_model) / "config.pbtxt").read_text()
    assert "count: 3" in config and "max_batch_size: 64" in config and "KIND_CPU" in config
    _, tensor = x_tensor(64)
    await deployments.serving.predict(TENANT, inference_pb2.PredictRequest(deployment="web", inputs=[tensor]))


@pytest.mark.parametrize(
    "spec, fields, complaint",
    [
        (DeploymentSpec(name="web"), [], "update_mask is required"),
        (DeploymentSpec(name="web", model="other"), ["model"], "cannot update"),
        (
            DeploymentSpec(name="web", version=2, alias="prod"),
            ["version", "alias"],
            "either version or alias",
        ),
        (DeploymentSpec(name="web"), ["version"], "set the new version"),
        (DeploymentSpec(name="web", version=-2), ["version"], "version must be 1 or more"),
        (DeploymentSpec(name="web", instances=99), ["instances"], "instances must be between"),
        (DeploymentSpec(name="web", device="TPU"), ["device"], "device must be one of"),
    ],
)
async def test_update_refuses_bad_requests(deployments, spec, fields, complaint):
    await deploy(deployments)
    with pytest.raises(InvalidArgument, match=complaint):
        await deployments.update(TENANT, spec, fields)


async def test_update_of_a_missing_deployment_or_version(deployments):
    with pytest.raises(NotFound):
        await deployments.update(TENANT, DeploymentSpec(name="web", instances=2), ["instances"])
    await deploy(deployments)
    with pytest.raises(NotFound):
        await deployments.update(TENANT, DeploymentSpec(name="web", version=7), ["version"])


async def test_delete_unloads_and_removes_everything(deployments, triton, repository):
    await deploy(deployments)
    triton_model = (await deployments.get(TENANT, "web")).triton_model
    await deployments.delete(TENANT, "web")
    assert triton_model not in triton.loaded
    assert not repository.path(triton_model).exists()
    assert await anext(deployments.routes.watch()) == []
    with pytest.raises(NotFound):
        await deployments.get(TENANT, "web")
    with pytest.raises(NotFound):
        await deployments.delete(TENANT, "web")
    with pytest.raises(NotFound):
        await deployments.serving.predict(TENANT, predict_request())


async def test_delete_while_loading_leaves_nothing_loaded(deployments, triton, repository):
    triton.load_delay = 0.2
    created = await deployments.create(TENANT, DeploymentSpec(name="web", model="digits", version=1))
    await asyncio.sleep(0.05)
    await deployments.delete(TENANT, "web")
    await asyncio.sleep(0.3)
    assert created.triton_model not in triton.loaded
    assert not repository.path(created.triton_model).exists()


async def test_list_pages_by_name_within_the_tenant(deployments, registry):
    for name in ("c-web", "a-web", "b-web"):
        await deployments.create(TENANT, DeploymentSpec(name=name, model="digits", version=1))
    registry.add("digits", 1, tenant="other")
    await deployments.create("other", DeploymentSpec(name="z-web", model="digits", version=1))
    first, token = await deployments.list_page(TENANT, 2, "")
    assert [d.name for d in first] == ["a-web", "b-web"] and token
    second, token = await deployments.list_page(TENANT, 2, token)
    assert [d.name for d in second] == ["c-web"] and token == ""
    with pytest.raises(InvalidArgument, match="page_token"):
        await deployments.list_page(TENANT, 2, "not base64!")


async def test_reconcile_after_a_triton_restart_reloads_and_drops_strays(deployments, triton, repository):
    await deploy(deployments)
    triton_model = (await deployments.get(TENANT, "web")).triton_model
    await deployments.converger.triton_down()
    with pytest.raises(Unavailable, match="still loading"):
        await deployments.serving.predict(TENANT, predict_request())
    triton.loaded = {"m_stray"}  # a fresh Triton that someone loaded another model into
    (repository.root / "m_stray").mkdir()
    await deployments.converger.reconcile()
    await wait_state(deployments, "web", READY)
    assert triton.loaded == {triton_model}
    assert repository.names() == {triton_model}
    await deployments.serving.predict(TENANT, predict_request())


async def test_a_restarted_service_restores_routes_and_reconciles(
    deployments, store, registry, repository, tmp_path
):
    await deploy(deployments)
    await deployments.close()
    fresh_triton = FakeTriton(repository)
    restarted = Deployments(
        store=store,
        registry=registry,  # type: ignore[arg-type]
        artifacts=ArtifactCache(tmp_path / "artifacts", registry),  # type: ignore[arg-type]
        nodes=one_node(repository, fresh_triton),
        gpu_available=False,
        load_timeout=5,
        load_concurrency=2,
        predict_timeout=5,
    )
    (tmp_path / "artifacts" / ("0" * 64)).write_bytes(b"no deployment uses this")
    (tmp_path / "artifacts" / ".abc.part").write_bytes(b"an interrupted download")
    await restarted.converger.restore()
    assert [path.name for path in (tmp_path / "artifacts").iterdir()] == [
        (await restarted.get(TENANT, "web")).sha256
    ]
    with pytest.raises(Unavailable):  # known at once, served once reloaded
        await restarted.serving.predict(TENANT, predict_request())
    await restarted.converger.reconcile()
    await wait_state(restarted, "web", READY)
    assert (await restarted.serving.predict(TENANT, predict_request())).version == 1
    assert registry.downloads == 1  # the artifact cache survived
    await restarted.close()


async def test_watch_routes_sends_the_table_at_once_and_after_each_change(deployments):
    watch = deployments.routes.watch()
    assert await anext(watch) == []
    await deployments.create(TENANT, DeploymentSpec(name="web", model="digits", version=1, cacheable=True))
    (loading,) = await asyncio.wait_for(anext(watch), 1)
    assert not loading.ready and loading.deployment.cacheable
    (ready,) = await asyncio.wait_for(anext(watch), 1)
    assert ready.ready and ready.served.resolved_version == 1
    await deployments.delete(TENANT, "web")
    assert await asyncio.wait_for(anext(watch), 1) == []
    await watch.aclose()


def test_settings_fill_paths_from_home(tmp_path: Path):
    from services.inference.config import InferenceSettings

    settings = InferenceSettings(home=tmp_path)
    assert settings.directory == tmp_path / "inference"
    assert settings.inference_database_url == f"sqlite:///{tmp_path / 'inference' / 'inference.db'}"
    assert settings.external_triton_addresses == [] and settings.triton_nodes == 1
    assert settings.embedded_ports(0) == (50061, 50062, 50063)
    assert settings.embedded_ports(2) == (50067, 50068, 50069)
    assert InferenceSettings(home=tmp_path, triton_url="triton:8001").external_triton_addresses == ["triton:8001"]
    listed = InferenceSettings(home=tmp_path, triton_urls="a:8001, b:8001,")
    assert listed.external_triton_addresses == ["a:8001", "b:8001"]


# -- canaries -----------------------------------------------------------------------------------


async def start_canary(deployments: Deployments, weight: int = 50, max_error_rate: float = 0.0):
    await deployments.rollouts.start_canary(TENANT, "web", 2, weight, max_error_rate)
    deadline = time.monotonic() + 60  # the whole suite (and more) may share two cores with it
    while (await deployments.get(TENANT, "web")).canary.state != READY:
        assert time.monotonic() < deadline, "the canary is not READY after 60 s"
        await asyncio.sleep(0.01)


async def versions_answering(deployments: Deployments, request_ids: range) -> dict[str, int]:
    answers = {}
    for number in request_ids:
        token = request_id_var.set(f"request-{number}")
        try:
            answers[f"request-{number}"] = (await deployments.serving.predict(TENANT, predict_request())).version
        finally:
            request_id_var.reset(token)
    return answers


async def test_a_canary_takes_its_share_the_same_way_for_each_request_id(deployments, triton):
    await deploy(deployments)
    started = await deployments.rollouts.start_canary(TENANT, "web", 2, 20, 0.0)
    assert started.canary.state == LOADING and started.canary.weight == 20
    await start_canary(deployments, weight=20)
    first = await versions_answering(deployments, range(200))
    assert 20 < list(first.values()).count(2) < 60
    assert await versions_answering(deployments, range(200)) == first
    (route,) = await anext(deployments.routes.watch())
    assert route.canary is not None and route.canary.triton_model in triton.loaded
    # Hold at another weight: same canary, no reload.
    loads = len(triton.loads)
    held = await deployments.rollouts.start_canary(TENANT, "web", 2, 90, 0.0)
    assert held.canary.weight == 90 and held.canary.state == READY and len(triton.loads) == loads
    assert list((await versions_answering(deployments, range(200))).values()).count(2) > 150


async def test_a_new_weight_read_before_the_canary_loaded_does_not_put_it_back_to_loading(
    deployments, triton, monkeypatch
):
    """The weight change's read of the deployment may predate the load's end: it changes the
    weight and leaves the state as the load recorded it (it once saved the whole stale row back,
    so the canary stayed LOADING for good)."""
    await deploy(deployments)
    loading = await deployments.rollouts.start_canary(TENANT, "web", 2, 20, 0.0)
    await start_canary(deployments, weight=20)  # READY now
    read = deployments.get

    async def read_before_the_load_ended(tenant: str, name: str):
        await read(tenant, name)
        return loading

    monkeypatch.setattr(deployments, "get", read_before_the_load_ended)
    held = await deployments.rollouts.start_canary(TENANT, "web", 2, 60, 0.25)
    monkeypatch.undo()
    stored = (await deployments.get(TENANT, "web")).canary
    assert (held.canary.state, stored.state) == (READY, READY)
    assert (stored.weight, stored.max_error_rate) == (60, 0.25)
    (route,) = await anext(deployments.routes.watch())
    assert route.canary is not None and route.canary.weight == 60


async def test_promote_makes_the_canary_the_deployment_and_drains_the_old_version(deployments, triton):
    await deploy(deployments)
    deployments.converger.drain_seconds = 0.1
    old = (await deployments.get(TENANT, "web")).triton_model
    await start_canary(deployments)
    canary_model = (await deployments.get(TENANT, "web")).canary.triton_model
    promoted = await deployments.rollouts.promote_canary(TENANT, "web")
    assert promoted.resolved_version == promoted.version == 2 and promoted.canary is None
    assert promoted.triton_model == canary_model and len(triton.loads) == 2  # no reload
    assert set((await versions_answering(deployments, range(20))).values()) == {2}
    await asyncio.sleep(0.3)
    assert triton.loaded == {canary_model} and old not in triton.loaded
    assert (await deployments.get(TENANT, "web")).resolved_version == 2


async def test_rollback_sends_everything_back_and_unloads_the_canary(deployments, triton, repository):
    await deploy(deployments)
    deployments.converger.drain_seconds = 0
    await start_canary(deployments)
    rolled_back = await deployments.rollouts.rollback_canary(TENANT, "web")
    assert rolled_back.canary is None and rolled_back.resolved_version == 1
    assert set((await versions_answering(deployments, range(20))).values()) == {1}
    await asyncio.sleep(0.1)
    assert triton.loaded == {rolled_back.triton_model}
    assert repository.names() == {rolled_back.triton_model}
    with pytest.raises(FailedPrecondition, match="no canary"):
        await deployments.rollouts.rollback_canary(TENANT, "web")
    with pytest.raises(FailedPrecondition, match="no canary"):
        await deployments.rollouts.promote_canary(TENANT, "web")


async def test_a_canary_failing_too_often_is_rolled_back_on_its_own(deployments, triton):
    await deploy(deployments)
    deployments.converger.drain_seconds = 0
    await start_canary(deployments, max_error_rate=0.2)
    canary_model = (await deployments.get(TENANT, "web")).canary.triton_model
    triton.counts[canary_model] = (50, 5)  # 9 % failed: within the threshold
    await deployments.rollouts.check_canaries()
    assert (await deployments.get(TENANT, "web")).canary is not None
    triton.counts[canary_model] = (55, 20)  # 15 of the last 20 failed
    await deployments.rollouts.check_canaries()
    rolled_back = await deployments.get(TENANT, "web")
    assert rolled_back.canary is None and "15 of its last 20 requests failed" in rolled_back.message
    assert set((await versions_answering(deployments, range(20))).values()) == {1}


async def test_a_canary_that_fails_to_load_takes_no_traffic(deployments, triton):
    await deploy(deployments)
    triton.fail_loads = "bad artifact"
    await deployments.rollouts.start_canary(TENANT, "web", 2, 50, 0.0)
    deadline = time.monotonic() + 5
    while (canary := (await deployments.get(TENANT, "web")).canary).state != FAILED:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert "bad artifact" in canary.message
    assert set((await versions_answering(deployments, range(20))).values()) == {1}
    with pytest.raises(FailedPrecondition, match="promote it once it is READY"):
        await deployments.rollouts.promote_canary(TENANT, "web")


@pytest.mark.parametrize(
    "version, weight, rate, error, complaint",
    [
        (2, 0, 0.0, InvalidArgument, "weight_percent must be between 1 and 99"),
        (2, 100, 0.0, InvalidArgument, "weight_percent must be between 1 and 99"),
        (2, 10, 1.5, InvalidArgument, "max_error_rate"),
        (1, 10, 0.0, InvalidArgument, "serves already"),
        (9, 10, 0.0, NotFound, "version 9"),
    ],
)
async def test_start_canary_refuses_bad_requests(deployments, version, weight, rate, error, complaint):
    await deploy(deployments)
    with pytest.raises(error, match=complaint):
        await deployments.rollouts.start_canary(TENANT, "web", version, weight, rate)


async def test_canaries_need_a_pinned_version_and_the_same_signature(deployments, registry):
    await deploy(deployments, version=None, alias="production")
    with pytest.raises(FailedPrecondition, match="follows alias"):
        await deployments.rollouts.start_canary(TENANT, "web", 2, 10, 0.0)
    other = common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="z", datatype=common_pb2.DATA_TYPE_FP32, shape=[4])],
        outputs=[common_pb2.TensorSpec(name="y", datatype=common_pb2.DATA_TYPE_FP32, shape=[3])],
    )
    registry.add("digits", 3, signature=other)
    await deploy(deployments, name="pinned")
    with pytest.raises(FailedPrecondition, match="another signature"):
        await deployments.rollouts.start_canary(TENANT, "pinned", 3, 10, 0.0)


async def test_a_canary_survives_a_restart_of_triton(deployments, triton):
    await deploy(deployments)
    await start_canary(deployments)
    await deployments.converger.triton_down()
    triton.loaded.clear()
    await deployments.converger.reconcile()
    deadline = time.monotonic() + 5
    while True:
        (route,) = await anext(deployments.routes.watch())
        if route.ready and route.canary is not None:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert len(triton.loaded) == 2
