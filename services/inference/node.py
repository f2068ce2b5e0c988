"""A Triton node of its own: `python -m services.inference.node` in a node container or pod.

It starts the same tritonserver the inference service supervises (the wheel's binary, the python
backend, each model's stub inside the Landlock fence), but listening on the container's addresses,
and then becomes it (exec): the container runtime or Kubernetes restarts it, and the inference
service, which reaches it through MAAS_TRITON_URLS, reloads its models. Models arrive in their load
requests, so the node holds no state worth keeping and mounts no secret but the Triton token.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.inference.triton import TritonLaunch


class NodeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAAS_", extra="ignore")

    # Model repository, backends and scratch: this node's own, empty at start.
    triton_node_dir: Path = Path("/var/lib/triton")
    # Triton's own default ports (the chart's too).
    triton_grpc_port: int = Field(default=8001, ge=1, le=65535)
    triton_http_port: int = Field(default=8000, ge=1, le=65535)
    triton_metrics_port: int = Field(default=8002, ge=1, le=65535)
    triton_listen_host: str = "0.0.0.0"
    # Set: every protocol but health needs this header value (the services send MAAS_TRITON_TOKEN).
    triton_token: str = ""
    model_fence: Literal["required", "off"] = "required"


def launch_of(settings: NodeSettings) -> TritonLaunch:
    return TritonLaunch(
        directory=settings.triton_node_dir,
        grpc_port=settings.triton_grpc_port,
        http_port=settings.triton_http_port,
        metrics_port=settings.triton_metrics_port,
        listen_host=settings.triton_listen_host,
        token=settings.triton_token,
        fence_models=settings.model_fence == "required",
    )


def main() -> None:
    launch = launch_of(NodeSettings())
    launch.prepare()
    command = launch.command()
    # Nothing but models where Triton and its stubs run: the token is on its command line only.
    os.chdir(launch.model_repository)
    os.execve(command[0], command, launch.environment())


if __name__ == "__main__":
    main()
