"""Issue 18's done-when, in containers: the images, built from Debian alone, run the whole
platform; the README tour and stock tritonclient work through the containerized gateway; a Triton
node container killed under load costs no request with two replicas; a restarted registry keeps
every upload it acknowledged."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from maas import signature
from maas.errors import ApiError

from tests.containers.conftest import NODES, ContainerStack, docker
from tests.deploy.test_images_match_charts import image_config
from tests.e2e.test_fleet import predict_loop, ready_nodes, wait_until
from tests.e2e.test_readme import README, runnable_blocks, script
from tests.support.digits import SIGNATURE, train_digits_mlp
from tests.support.tenants import developer_clients

pytestmark = [pytest.mark.slow, pytest.mark.containers]

SERVICES = ("gateway", "registry", "inference", "trainer")
NODE_ROLES = tuple(f"triton-{i}" for i in range(NODES))


def test_every_container_is_healthy_unprivileged_and_only_the_gateway_is_published(container_stack: ContainerStack):
    for role in (*SERVICES, *NODE_ROLES, "postgres", "redis"):
        state = container_stack.inspect(role)
        assert state["State"]["Health"]["Status"] == "healthy", role
        assert state["Config"]["User"] not in ("", "0", "root"), f"{role} runs as root"
        assert state["HostConfig"]["CapDrop"] == ["ALL"], role
        published = {port: bindings for port, bindings in (state["HostConfig"]["PortBindings"] or {}).items()}
        if role == "gateway":
            assert {binding["HostIp"] for bindings in published.values() for binding in bindings} == {"127.0.0.1"}
        else:
            assert not published, f"{role} publishes {published}"
    # The nodes hold no secret but the token their protocols require.
    node_env = {entry.split("=", 1)[0] for entry in container_stack.inspect("triton-0")["Config"]["Env"]}
    assert not {"MAAS_INTERNAL_TOKEN", "MAAS_REDIS_URL", "MAAS_INFERENCE_DATABASE_URL"} & node_env


def test_no_image_layer_carries_a_secret(container_stack: ContainerStack):
    secrets = (container_stack.home / "containers" / f"{container_stack.name}.env").read_text()
    values = [line.split("=", 1)[1] for line in secrets.splitlines()] + [container_stack.admin_key]
    for image in ("base", *SERVICES, "postgres", "redis"):
        tag = container_stack.inspect("gateway")["Config"]["Image"].split(":")[1]
        history = docker("history", "--no-trunc", f"maas/{image}:{tag}").stdout
        config = docker("image", "inspect", f"maas/{image}:{tag}").stdout
        assert not any(value in history or value in config for value in values), image
        assert "BEGIN CERTIFICATE" not in history


def test_the_readme_tour_runs_through_the_containerized_gateway(container_stack: ContainerStack, tmp_path: Path):
    text = README.read_text()
    tour_ends = text.index("\n## Concepts")
    tour = runnable_blocks(text[:tour_ends])
    assert len(tour) >= 3 and "tritonclient.grpc" in "".join(block.code for block in tour)
    (tmp_path / "tour.sh").write_text(script(tour))
    env = dict(container_stack.env, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", str(tmp_path / "tour.sh")], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert result.returncode == 0, f"the tour failed (exit {result.returncode}):\n{result.stdout[-6000:]}"


@pytest.fixture(scope="module")
def fleet(container_stack: ContainerStack, tmp_path_factory):
    digits = train_digits_mlp(tmp_path_factory.mktemp("digits"))
    with developer_clients(container_stack, "fleet") as clients:
        client = clients["fleet"]
        client.create_model("digits")
        client.upload_version("digits", digits.path, format="torchscript", signature=SIGNATURE)
        client.create_deployment("digits", "digits", version=1, replicas=NODES)
        wait_until(lambda: len(ready_nodes(client, "digits")) == NODES, 300, f"{NODES} ready replicas")
        key = dict(client._metadata)["authorization"].removeprefix("Bearer ")
        yield client, key, digits


def test_stock_tritonclient_through_the_gateway(container_stack: ContainerStack, fleet):
    _, key, digits = fleet
    triton = triton_grpc.InferenceServerClient(container_stack.gateway)
    x = triton_grpc.InferInput("x", [4, 64], "FP32")
    x.set_data_from_numpy(digits.test_x[:4])
    answer = triton.infer("digits", [x], headers={"authorization": f"Bearer {key}"})
    np.testing.assert_allclose(answer.as_numpy("logits"), digits.reference(digits.test_x[:4]), rtol=1e-4, atol=1e-4)
    assert triton.is_model_ready("digits", headers={"authorization": f"Bearer {key}"})
    triton.close()


def test_a_node_container_killed_under_load_costs_no_request(container_stack: ContainerStack, fleet):
    client, key, digits = fleet
    placed = ready_nodes(client, "digits")
    assert len(set(placed)) == NODES, placed
    victim = f"{container_stack.name}-triton-0"
    with predict_loop(container_stack, key, "digits", digits.test_x[:1]) as tally:
        time.sleep(3)
        before = tally["ok"]
        docker("kill", victim)
        wait_until(lambda: len(ready_nodes(client, "digits")) == NODES - 1, 10, "the killed node's replica leaves")
        time.sleep(3)
    assert tally["failed"] == [], f"{len(tally['failed'])} of {tally['ok']} requests failed: {tally['failed'][:3]}"
    assert tally["ok"] > before > 0
    # The node comes back as the same name and address; its replica is placed on it again.
    docker("start", victim)
    wait_until(lambda: len(ready_nodes(client, "digits")) == NODES, 180, "the replica back on the restarted node")
    print(f"node container kill: {tally['ok']} requests, 0 failed")


def test_a_restarted_registry_keeps_every_acknowledged_upload(container_stack: ContainerStack, tmp_path: Path):
    """Uploads run in a loop while the registry container restarts: some are refused while it is
    down (UNAVAILABLE is fine), but every version the registry acknowledged is there afterwards,
    with the bytes that were sent."""
    with developer_clients(container_stack, "uploads") as clients:
        client = clients["uploads"]
        client.create_model("blobs")
        acknowledged: dict[int, str] = {}
        refused: list[str] = []
        stop = threading.Event()

        def upload_loop() -> None:
            i = 0
            while not stop.is_set():
                artifact = tmp_path / f"m{i}.pt"
                save_linear(artifact, seed=i)
                try:
                    version = client.upload_version("blobs", artifact, format="torchscript",
                                                    signature=signature({"x": ("FP32", [4])}, {"y": ("FP32", [2])}))
                    acknowledged[version.version] = hashlib.sha256(artifact.read_bytes()).hexdigest()
                except ApiError as error:
                    refused.append(str(error)[:200])
                i += 1

        uploader = threading.Thread(target=upload_loop, daemon=True)
        uploader.start()
        time.sleep(3)
        docker("restart", "--time", "5", container_stack.container("registry"), timeout=120)
        wait_until(lambda: container_stack.inspect("registry")["State"]["Health"]["Status"] == "healthy", 120,
                   "the registry healthy again")
        time.sleep(3)
        stop.set()
        uploader.join(timeout=120)
        assert len(acknowledged) >= 2, refused
        versions = {v.version: v.sha256 for v in client.list_versions("blobs")}
        assert {n: versions.get(n) for n in acknowledged} == acknowledged, refused
        for number, sha256 in acknowledged.items():
            client.download_version("blobs", number, tmp_path / f"back{number}.pt")
            assert hashlib.sha256((tmp_path / f"back{number}.pt").read_bytes()).hexdigest() == sha256


def save_linear(path: Path, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2).eval()), str(path))


@pytest.mark.parametrize("service", SERVICES)
def test_the_built_images_are_what_the_charts_were_checked_against(container_stack: ContainerStack, service: str):
    """tests/deploy/test_images_match_charts.py checks the charts against the Dockerfiles; this
    checks the Dockerfiles against the images they built."""
    expected = image_config(service)
    tag = container_stack.inspect("gateway")["Config"]["Image"].split(":")[1]
    config = json.loads(docker("image", "inspect", f"maas/{service}:{tag}").stdout)[0]["Config"]
    assert config["User"] == expected["user"]
    assert config["Entrypoint"] == expected["entrypoint"] and config["Cmd"] == expected["cmd"]
    assert {int(port.split("/")[0]) for port in config["ExposedPorts"]} == expected["expose"]
    assert f"MAAS_HOME={expected['env']['MAAS_HOME']}" in config["Env"]
    home = docker("run", "--rm", "--entrypoint", "stat", f"maas/{service}:{tag}", "-c", "%u %a",
                  expected["env"]["MAAS_HOME"]).stdout.split()
    assert home[0] == expected["user"]
