"""The Helm charts lint, and `helm template` renders a complete, consistent platform."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from services.gateway.config import GatewaySettings
from services.inference.config import InferenceSettings
from services.registry.config import RegistrySettings
from services.trainer.config import TrainerSettings

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "registry", "inference", "trainer")
PORTS = {"gateway": 50051, "registry": 50052, "inference": 50053, "trainer": 50054}
SETTINGS = (GatewaySettings, RegistrySettings, InferenceSettings, TrainerSettings)


def render(helm: str, yaml: Any, chart: Path, *values: str, namespace: str = "") -> list[dict]:
    args = [helm, "template", "t", str(chart)]
    if namespace:
        args += ["--namespace", namespace]
    for value in values:
        args += ["--set", value]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def known_settings() -> set[str]:
    return {f"MAAS_{field.upper()}" for cls in SETTINGS for field in cls.model_fields}


@pytest.mark.parametrize("chart", [*SERVICES, "maas"])
def test_each_chart_lints(helm: str, charts: Path, chart: str) -> None:
    result = subprocess.run([helm, "lint", "--strict", str(charts / chart)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_umbrella_renders_every_service_wired_to_its_peers(helm: str, yaml: Any, charts: Path) -> None:
    objects = render(helm, yaml, charts / "maas")
    deployments = by_kind(objects, "Deployment")
    services = by_kind(objects, "Service")
    configs = by_kind(objects, "ConfigMap")
    assert set(deployments) == {f"t-{name}" for name in SERVICES}
    assert set(by_kind(objects, "StatefulSet")) == {"t-triton"}
    assert set(by_kind(objects, "PodDisruptionBudget")) == {f"t-{name}" for name in SERVICES} | {"t-triton"}
    assert set(by_kind(objects, "HorizontalPodAutoscaler")) == {"t-gateway"}
    assert not by_kind(objects, "ServiceMonitor")
    assert not by_kind(objects, "PersistentVolumeClaim")  # Triton shares no model repository

    for name in SERVICES:
        service_ports = {p["name"]: p["port"] for p in services[f"t-{name}"]["spec"]["ports"]}
        assert service_ports["grpc"] == PORTS[name]
        config = configs[f"t-{name}"]["data"]
        assert config[f"MAAS_{name.upper()}_ADDR"] == f"0.0.0.0:{PORTS[name]}"
        # Every peer address names a Service this release renders, on that service's port.
        for peer in set(SERVICES) - {name, "gateway"}:
            host, port = config[f"MAAS_{peer.upper()}_ADDR"].split(":")
            assert host in services and int(port) == PORTS[peer]
        # Every MAAS_* variable is a real setting: a typo would be silently ignored.
        assert set(config) <= known_settings(), set(config) - known_settings()

        pod = deployments[f"t-{name}"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["args"] == ["-m", f"services.{name}"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == PORTS[name]
        assert container["resources"]["requests"] and container["resources"]["limits"]
        secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
        assert secret_env["MAAS_INTERNAL_TOKEN"]["name"] == "maas-internal-token"
        assert secret_env[f"MAAS_{name.upper()}_DATABASE_URL"]["name"] == f"maas-{name}-db"

    # One Triton node by default, named through the headless Service on its gRPC port.
    inference = configs["t-inference"]["data"]
    (node,) = inference["MAAS_TRITON_URLS"].split(",")
    host, triton_port = node.split(":")
    pod, service = host.split(".")[:2]
    assert pod == "t-triton-0" and services[service]["spec"]["clusterIP"] == "None"
    triton_ports = {p["name"]: p["port"] for p in services[service]["spec"]["ports"]}
    assert triton_ports["grpc"] == int(triton_port)
    assert triton_ports["metrics"] == int(inference["MAAS_TRITON_METRICS_PORT"])
    assert inference["MAAS_INFERENCE_LEADER_ELECTION"] == "false"
    registry = configs["t-registry"]["data"]
    assert registry["MAAS_REGISTRY_S3_BUCKET"] and registry["MAAS_REGISTRY_S3_ENDPOINT_URL"]
    assert configs["t-gateway"]["data"]["MAAS_REDIS_URL"].startswith("redis://")
    assert services["t-gateway"]["spec"]["type"] == "LoadBalancer"
    assert services["t-triton"]["spec"]["type"] == "ClusterIP"  # headless, never exposed


def test_gpu_tls_monitoring_and_autoscaling_toggles(helm: str, yaml: Any, charts: Path) -> None:
    objects = render(
        helm, yaml, charts / "maas",
        "inference.triton.gpus=1",
        "gateway.tls.enabled=true", "gateway.tls.secretName=maas-gateway-tls",
        "registry.tls.enabled=true", "registry.tls.secretName=maas-internal-tls",
        "registry.tls.requireClientCertificates=true",
        "gateway.serviceMonitor.enabled=true", "inference.autoscaling.enabled=true",
        "prometheusRule.enabled=true",
    )
    deployments = by_kind(objects, "Deployment")
    triton = by_kind(objects, "StatefulSet")["t-triton"]["spec"]["template"]["spec"]["containers"][0]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert configs_of(objects, "t-inference")["MAAS_GPU_AVAILABLE"] == "true"

    gateway = configs_of(objects, "t-gateway")
    assert gateway["MAAS_TLS_CERT_FILE"] == "/etc/maas/tls/tls.crt" and "MAAS_TLS_CLIENT_CA_FILE" not in gateway
    assert configs_of(objects, "t-registry")["MAAS_TLS_CLIENT_CA_FILE"] == "/etc/maas/tls/ca.crt"
    pod = deployments["t-gateway"]["spec"]["template"]["spec"]
    assert {"name": "tls", "secret": {"secretName": "maas-gateway-tls"}} in pod["volumes"]
    # Kubelet's grpc probes cannot speak TLS.
    assert "tcpSocket" in pod["containers"][0]["readinessProbe"]

    assert set(by_kind(objects, "ServiceMonitor")) == {"t-gateway"}
    assert set(by_kind(objects, "HorizontalPodAutoscaler")) == {"t-gateway", "t-inference"}
    rule = by_kind(objects, "PrometheusRule")["t-maas"]
    assert {group["name"] for group in rule["spec"]["groups"]} >= {"maas-requests", "maas-inference"}


def test_triton_pods_hold_no_secret_and_only_the_gateway_and_inference_reach_them(
    helm: str, yaml: Any, charts: Path
) -> None:
    """A tenant's model runs inside Triton: nothing secret may be mounted or passed into its pod,
    and only the gateway (inference calls) and the inference service (model control) may dial it."""
    objects = render(
        helm, yaml, charts / "maas", "inference.triton.gpus=1", "inference.triton.replicas=2",
        "gateway.tls.enabled=true", "gateway.tls.secretName=maas-gateway-tls",
    )
    pod = by_kind(objects, "StatefulSet")["t-triton"]["spec"]["template"]["spec"]
    for volume in pod.get("volumes", []):
        assert not {"secret", "projected"} & set(volume), f"Triton mounts {volume}"
    assert pod.get("automountServiceAccountToken") is False
    for container in pod["containers"]:
        assert not [e for e in container.get("env", []) if "valueFrom" in e], container["env"]
        assert not [e for e in container.get("envFrom", []) if "secretRef" in e]
    policy = by_kind(objects, "NetworkPolicy")["t-triton"]["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    grpc_rule = next(rule for rule in policy["ingress"] if rule.get("from"))
    allowed = grpc_rule["from"][0]["podSelector"]["matchExpressions"][0]["values"]
    assert sorted(allowed) == ["maas-gateway", "maas-inference"]
    assert [port["port"] for port in grpc_rule["ports"]] == [8001]
    # Whatever reaches Triton without a selector may only read its metrics.
    open_rules = [rule for rule in policy["ingress"] if not rule.get("from")]
    assert [port["port"] for rule in open_rules for port in rule["ports"]] == [8002]
    for service in ("t-gateway", "t-inference"):
        assert configs_of(objects, service)["MAAS_TRITON_TLS"] == "false"


def configs_of(objects: list[dict], name: str) -> dict[str, str]:
    return by_kind(objects, "ConfigMap")[name]["data"]


def test_a_missing_secret_reference_fails_the_render(helm: str, charts: Path) -> None:
    result = subprocess.run(
        [helm, "template", "t", str(charts / "gateway"), "--set", "secrets.internalToken.name="],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode != 0 and "internal token" in result.stderr


def pod_spec(objects: list[dict], kind: str, name: str) -> dict:
    return by_kind(objects, kind)[name]["spec"]["template"]["spec"]


def test_a_gpu_fleet_of_three_triton_nodes_is_named_to_the_inference_service(
    helm: str, yaml: Any, charts: Path
) -> None:
    """triton.replicas=3: a StatefulSet of three GPU pods behind a headless Service, each pod's
    stable DNS name in MAAS_TRITON_URLS, and no volume shared between inference and Triton."""
    objects = render(
        helm, yaml, charts / "maas", "inference.triton.replicas=3", "inference.triton.gpus=2",
        "inference.triton.modelSlots=4", "inference.triton.memoryMb=12000",
        "inference.triton.nodeSelector.nvidia\\.com/gpu\\.present=true",
        namespace="serving",
    )
    fleet = by_kind(objects, "StatefulSet")["t-triton"]["spec"]
    headless = by_kind(objects, "Service")[fleet["serviceName"]]["spec"]
    assert fleet["replicas"] == 3 and fleet["podManagementPolicy"] == "Parallel"
    assert headless["clusterIP"] == "None" and headless["selector"] == fleet["selector"]["matchLabels"]

    config = configs_of(objects, "t-inference")
    assert config["MAAS_TRITON_URLS"].split(",") == [
        f"t-triton-{i}.{fleet['serviceName']}.serving.svc.cluster.local:8001" for i in range(3)
    ]
    assert config["MAAS_TRITON_NODE_MODEL_SLOTS"] == "4" and config["MAAS_TRITON_NODE_MEMORY_MB"] == "12000"
    assert config["MAAS_GPU_AVAILABLE"] == "true"
    assert "MAAS_TRITON_URL" not in config and "MAAS_INFERENCE_DIR" not in config

    triton = pod_spec(objects, "StatefulSet", "t-triton")
    container = triton["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in triton["tolerations"]
    assert triton["nodeSelector"] == {"nvidia.com/gpu.present": "true"}

    # Each node's model repository is its own emptyDir; nothing is shared with the inference pod.
    assert not by_kind(objects, "PersistentVolumeClaim")
    assert all("emptyDir" in volume for volume in triton["volumes"]), triton["volumes"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    node_dir = next(e["value"] for e in container["env"] if e["name"] == "MAAS_TRITON_NODE_DIR")
    assert node_dir in mounts and container["args"] == ["-m", "services.inference.node"]
    inference = pod_spec(objects, "Deployment", "t-inference")
    assert {v["name"] for v in inference["volumes"]} == {"data", "tmp"}
    assert not any("persistentVolumeClaim" in v for v in inference["volumes"])


def test_the_default_is_one_cpu_node_and_a_new_size_rolls_the_inference_pods(
    helm: str, yaml: Any, charts: Path
) -> None:
    for chart in (charts / "inference", charts / "maas"):
        objects = render(helm, yaml, chart)
        fleet = by_kind(objects, "StatefulSet")["t-triton"]["spec"]
        assert fleet["replicas"] == 1
        config = configs_of(objects, "t-inference")
        assert config["MAAS_TRITON_URLS"] == "t-triton-0.t-triton.default.svc.cluster.local:8001"
        assert config["MAAS_GPU_AVAILABLE"] == "false"
        triton = fleet["template"]["spec"]
        assert "nvidia.com/gpu" not in triton["containers"][0]["resources"]["limits"]
        assert "tolerations" not in triton

    # helm upgrade with another size re-renders MAAS_TRITON_URLS and restarts inference to read it.
    def checksum(*values: str) -> str:
        inference = by_kind(render(helm, yaml, charts / "maas", *values), "Deployment")["t-inference"]
        return inference["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum() != checksum("inference.triton.replicas=2")


def test_more_than_one_inference_replica_turns_on_leader_election(helm: str, yaml: Any, charts: Path) -> None:
    objects = render(helm, yaml, charts / "maas", "inference.replicaCount=3")
    assert by_kind(objects, "Deployment")["t-inference"]["spec"]["replicas"] == 3
    assert configs_of(objects, "t-inference")["MAAS_INFERENCE_LEADER_ELECTION"] == "true"
    autoscaled = render(helm, yaml, charts / "maas", "inference.autoscaling.enabled=true")
    assert configs_of(autoscaled, "t-inference")["MAAS_INFERENCE_LEADER_ELECTION"] == "true"
    forced = render(helm, yaml, charts / "maas", "inference.leaderElection=true")
    assert configs_of(forced, "t-inference")["MAAS_INFERENCE_LEADER_ELECTION"] == "true"
    # Only the inference chart elects a leader.
    assert "MAAS_INFERENCE_LEADER_ELECTION" not in configs_of(objects, "t-gateway")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        # Each pod's own SQLite: replicas would neither share state nor see each other's lock.
        (["replicaCount=2"], "shared PostgreSQL database"),
        (["leaderElection=true"], "shared PostgreSQL database"),
        # A GPU setting of the single-Triton chart must not be ignored silently.
        (["triton.gpu.enabled=true"], "triton.gpus"),
    ],
)
def test_settings_that_cannot_work_fail_the_render(helm: str, charts: Path, values: list[str], message: str) -> None:
    args = [helm, "template", "t", str(charts / "inference")]
    for value in values:
        args += ["--set", value]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_the_registry_reads_its_kek_from_a_secret_no_other_pod_mounts(helm: str, yaml: Any, charts: Path) -> None:
    objects = render(helm, yaml, charts / "maas")
    assert configs_of(objects, "t-registry")["MAAS_REGISTRY_KEK_FILE"] == "/etc/maas/kek/kek"
    registry = pod_spec(objects, "Deployment", "t-registry")
    (volume,) = [volume for volume in registry["volumes"] if volume["name"] == "kek"]
    assert volume["secret"] == {"secretName": "maas-kek", "defaultMode": 0o400, "items": [{"key": "kek", "path": "kek"}]}
    assert {"name": "kek", "mountPath": "/etc/maas/kek", "readOnly": True} in registry["containers"][0]["volumeMounts"]
    for other in ("t-gateway", "t-inference", "t-trainer"):
        assert "MAAS_REGISTRY_KEK_FILE" not in configs_of(objects, other)
        assert not [v for v in pod_spec(objects, "Deployment", other)["volumes"] if v["name"] == "kek"]
    result = subprocess.run(
        [helm, "template", "t", str(charts / "registry"), "--set", "secrets.kek.name="],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode != 0 and "key-encryption key" in result.stderr
