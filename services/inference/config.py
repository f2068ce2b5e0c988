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
    # host:port of an existing Triton gRPC endpoint. Empty: start our own tritonserver.
    triton_url: str = ""
    triton_grpc_port: int = 50061
    triton_http_port: int = 50062
    triton_metrics_port: int = 50063
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
    # Triton's Prometheus endpoint, read for pending requests. Empty: our own Triton's metrics port.
    triton_metrics_url: str = ""
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

    @model_validator(mode="after")
    def _fill_defaults_from_home(self) -> InferenceSettings:
        if not self.inference_database_url:
            self.inference_database_url = self.sqlite_url("inference")
        # Absolute: tritonserver and its stubs run with other working directories.
        self.inference_dir = (self.inference_dir or self.home / "inference").expanduser().resolve()
        return self

    @property
    def triton_address(self) -> str:
        """host:port of the Triton gRPC endpoint the service drives."""
        return self.triton_url or f"127.0.0.1:{self.triton_grpc_port}"

    @property
    def metrics_url(self) -> str:
        return self.triton_metrics_url or f"http://127.0.0.1:{self.triton_metrics_port}/metrics"

    @property
    def directory(self) -> Path:
        assert self.inference_dir is not None  # filled in by the validator
        return self.inference_dir
