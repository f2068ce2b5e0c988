"""The charts and the images agree: every image a chart names is one build.sh builds, from a
Dockerfile that exposes the ports the chart sends traffic to, runs as the user the chart demands,
keeps its state where the chart mounts volumes, and starts the module the chart runs; every
variable the chart sets on a Triton node is one the node reads. The container suite checks the
built images' own configuration the same way (tests/containers)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest

from services.inference.node import NodeSettings
from tests.deploy.test_helm_charts import REPO, SERVICES, by_kind, render

DOCKER = REPO / "deploy" / "docker"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def image_config(name: str) -> dict[str, Any]:
    """What an image gets from its own Dockerfile and from maas/base's final stage."""
    config: dict[str, Any] = {"expose": set(), "env": {}}
    for file in (DOCKER / "base.Dockerfile", DOCKER / f"{name}.Dockerfile"):
        final_stage = [step for step in instructions(file)]
        froms = [i for i, (op, _) in enumerate(final_stage) if op == "FROM"]
        for op, args in final_stage[froms[-1]:]:
            if op == "EXPOSE":
                config["expose"] |= {int(port) for port in args.split()}
            elif op == "ENV":
                config["env"].update(dict(pair.split("=", 1) for pair in args.split()))
            elif op in ("USER", "WORKDIR"):
                config[op.lower()] = args
            elif op in ("CMD", "ENTRYPOINT"):
                config[op.lower()] = json.loads(args)
            elif op == "RUN":
                config.setdefault("run", []).append(args)
    return config


@pytest.fixture(scope="module")
def platform(helm: str, yaml: Any, charts: Path) -> list[dict]:
    return render(helm, yaml, charts / "maas")


def containers_of(objects: list[dict]) -> dict[str, dict]:
    found = {}
    for kind in ("Deployment", "StatefulSet"):
        for name, workload in by_kind(objects, kind).items():
            spec = workload["spec"]["template"]["spec"]
            for container in spec["containers"]:
                found[name] = {**container, "podSecurityContext": spec.get("securityContext", {})}
    return found


def test_every_image_a_chart_names_is_built_by_the_build_script(platform: list[dict]) -> None:
    build = (DOCKER / "build.sh").read_text()
    images = {container["image"] for container in containers_of(platform).values()}
    version = re.search(r'appVersion: "(.*)"', (REPO / "deploy/helm/maas/Chart.yaml").read_text())[1]
    assert images == {f"maas/{service}:{version}" for service in SERVICES}
    for image in images:
        name = image.split(":")[0].removeprefix("maas/")
        assert (DOCKER / f"{name}.Dockerfile").exists()
        assert re.search(rf"for service in [^;]*\b{name}\b", build), f"build.sh does not build {name}"
    # The script tags what the charts pull: their appVersion.
    assert "appVersion" in build


def test_ports_users_paths_and_commands_agree(platform: list[dict]) -> None:
    configs = {name: o["data"] for name, o in by_kind(platform, "ConfigMap").items()}
    base = image_config("gateway")
    useradd = next(run for run in base["run"] if "useradd" in run)
    for workload, container in containers_of(platform).items():
        image = container["image"].split(":")[0].removeprefix("maas/")
        config = image_config(image)
        # Ports: every port the chart names is one the image exposes.
        for port in container["ports"]:
            assert port["containerPort"] in config["expose"], (workload, port, config["expose"])
        # User: the chart's uid is the one the image creates and runs as.
        uid = container["podSecurityContext"]["runAsUser"]
        assert config["user"] == str(uid) and f"--uid {uid}" in useradd, workload
        # Command: the image's python runs the module the chart names.
        assert config["entrypoint"] == ["python"]
        args = container["args"]
        assert args[0] == "-m" and importlib.util.find_spec(args[1]) is not None, args
        if workload != "t-triton":
            assert config["cmd"] == args, (workload, config["cmd"], args)
            assert configs[workload]["MAAS_HOME"] == config["env"]["MAAS_HOME"] == "/var/lib/maas"
        # Paths: every volume the chart mounts for state is a directory the image's user owns.
        for mount in container.get("volumeMounts", []):
            if mount["mountPath"] in ("/var/lib/maas", "/var/lib/triton"):
                assert mount["mountPath"] in useradd or f"chown maas:maas {mount['mountPath']}" in useradd


def test_a_triton_node_reads_every_variable_the_chart_sets(platform: list[dict]) -> None:
    node = containers_of(platform)["t-triton"]
    known = {f"MAAS_{field.upper()}" for field in NodeSettings.model_fields}
    names = {variable["name"] for variable in node["env"]}
    assert names <= known, names - known
    ports = {port["name"]: port["containerPort"] for port in node["ports"]}
    values = {variable["name"]: variable["value"] for variable in node["env"]}
    assert int(values["MAAS_TRITON_GRPC_PORT"]) == ports["grpc"]
    assert int(values["MAAS_TRITON_HTTP_PORT"]) == ports["http"]
    assert int(values["MAAS_TRITON_METRICS_PORT"]) == ports["metrics"]
