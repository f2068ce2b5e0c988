from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from services.common.settings import CommonSettings


class InferenceSettings(CommonSettings):
    """inference_addr (where this service listens) and registry_addr (where versions and their
    artifacts come from) are shared with every service in CommonSettings."""

    inference_metrics_addr: str = "127.0.0.1:9153"
    # Empty: the SQLite file under $MAAS_HOME/inference.
    inference_database_url: str = ""
    # Embedded serving fleet: how many tritonserver processes ("nodes") to start on this host,
    # each with its own model repository; node i listens on the three ports below plus 3 x i.
    triton_nodes: int = Field(default=1, ge=1, le=16)
    # External fleet: comma-separated host:port gRPC endpoints of Triton servers (for Kubernetes,
    # the StatefulSet's pods by their names in its headless Service). Set: none is started here.
    triton_urls: str = ""
    # One external Triton (the setting before MAAS_TRITON_URLS); the same as a one-entry list.
    triton_url: str = ""
    triton_grpc_port: int = 50061
    triton_http_port: int = 50062
    # Embedded nodes' metrics port (plus 3 x i); external nodes are asked on this port too.
    triton_metrics_port: int = 50063
    # Capacity of each node where Triton reports no GPU: replicas it may hold, and the memory
    # their model processes may take (MB; 0: three quarters of this host's memory, shared by
    # the embedded nodes, or 16384 for an external node).
    triton_node_model_slots: int = Field(default=16, ge=1, le=1024)
    triton_node_memory_mb: int = Field(default=0, ge=0)
    # Model repository, backend dir, artifact cache and triton.log. Empty: $MAAS_HOME/inference.
    # An external Triton must see the model repository at this same path.
    inference_dir: Path | None = None
    triton_start_timeout_seconds: float = 60.0
    model_load_timeout_seconds: float = 300.0
    # Deployments loading at once: each python-backend model starts a process and imports torch.
    model_load_concurrency: int = 2
    # Upper bound for a Predict that carries no deadline of its own.
    predict_timeout_seconds: float = 60.0
    # How long a Predict without a deadline waits for a deployment that is still loading.
    cold_start_wait_seconds: float = 10.0
    # After a roll, how long the replaced revision stays loaded once routes no longer name it.
    rollout_drain_seconds: float = 2.0
    # How often deployments that follow an alias look it up in the registry; 0 turns it off.
    alias_poll_seconds: float = 2.0
    # How often a canary's error rate is checked, over the requests since the last check.
    canary_check_seconds: float = 5.0
    # How often the per-deployment load gauges are refreshed from Triton; 0 turns them off.
    load_refresh_seconds: float = 5.0
    # Whether Triton may place models on a GPU. Unset: look for an NVIDIA device on this host.
    gpu_available: bool | None = None
    # "required": each model's Triton stub runs inside a Landlock fence (its own files only, no
    # network) and refuses to start where the kernel has no Landlock. "off": unfenced; only for a
    # host where every model is trusted.
    model_fence: Literal["required", "off"] = "required"
    # Longest one request may run inside a model before its process is killed and restarted;
    # a deployment may set its own (execution_limit_seconds).
    inference_execution_limit_seconds: int = Field(default=30, ge=1, le=3600)
    # Per tenant: deployments, and the memory their model processes are estimated to take
    # (instances x (a model process's own footprint + the artifact)). 0: no cap.
    inference_max_deployments_per_tenant: int = Field(default=20, ge=0)
    inference_max_memory_per_tenant_mb: int = Field(default=8192, ge=0)
    # Replicas a tenant's deployments may reserve together (the sum of their max_replicas);
    # a tenant's quota (maas admin quota set --max-replicas) overrides it. 0: no cap.
    inference_max_replicas_per_tenant: int = Field(default=16, ge=0)
    # Autoscaling: requests in flight per replica it aims for (a deployment may set its own),
    # how long load must stay above it before a replica is added, below it before one is
    # removed, and how long a min_replicas=0 deployment idles before it scales to zero.
    inference_target_in_flight: float = Field(default=4.0, gt=0)
    inference_scale_up_window_seconds: float = Field(default=5.0, gt=0)
    inference_scale_down_window_seconds: float = Field(default=30.0, gt=0)
    inference_scale_to_zero_seconds: float = Field(default=300.0, gt=0)
    # How often replicas are checked against what each deployment wants (lost nodes, drains,
    # scaling), and how often the autoscaler samples load.
    inference_replica_check_seconds: float = Field(default=0.5, gt=0)
    inference_autoscale_seconds: float = Field(default=1.0, gt=0)
    # How often the leader adds its READY replicas x the seconds since its previous count to
    # replica_usage (replica-seconds per tenant, deployment, tier and UTC day; billed per replica-hour).
    inference_replica_meter_seconds: float = Field(default=60.0, gt=0)
    # Several inference replicas (Helm): only the one holding the leader lock drives Triton.
    inference_leader_election: bool = False

    @model_validator(mode="after")
    def _fill_defaults_from_home(self) -> InferenceSettings:
        if not self.inference_database_url:
            self.inference_database_url = self.sqlite_url("inference")
        # Absolute: tritonserver and its stubs run with other working directories.
        self.inference_dir = (self.inference_dir or self.home / "inference").expanduser().resolve()
        return self

    @property
    def external_triton_addresses(self) -> list[str]:
        """The external nodes' gRPC endpoints; empty: start embedded nodes."""
        listed = self.triton_urls or self.triton_url
        return [address.strip() for address in listed.split(",") if address.strip()]

    def embedded_ports(self, index: int) -> tuple[int, int, int]:
        """(gRPC, HTTP, metrics) ports of embedded node `index`."""
        step = 3 * index
        return self.triton_grpc_port + step, self.triton_http_port + step, self.triton_metrics_port + step

    @property
    def directory(self) -> Path:
        assert self.inference_dir is not None  # filled in by the validator
        return self.inference_dir
