"""A container's health check: `python -m services.common.healthcheck TARGET`.

TARGET is a service's gRPC address (host:port), asked through the standard gRPC health service,
or an http:// URL (a Triton node's /v2/health/ready), which must answer 200. Exit 0 when healthy,
1 otherwise, with the reason on stderr: what `docker inspect` shows of a failing check.
"""

from __future__ import annotations

import sys
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_SECONDS = 3.0


def check(target: str) -> str | None:
    """None when healthy, else why not."""
    if target.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(target, timeout=TIMEOUT_SECONDS) as response:
                return None if response.status == 200 else f"{target} answered {response.status}"
        except OSError as error:
            return f"{target}: {error}"
    with grpc.insecure_channel(target) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            return f"{target}: {error.code().name} {error.details()}"
    serving = answer.status == health_pb2.HealthCheckResponse.SERVING
    return None if serving else f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m services.common.healthcheck HOST:PORT|URL", file=sys.stderr)
        return 2
    problem = check(argv[0])
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
