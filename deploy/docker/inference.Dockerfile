# The inference service (gRPC 50053, metrics 9153), and the Triton nodes it drives: the same image
# runs a node with `-m services.inference.node` (gRPC 8001, HTTP 8000, metrics 8002), the wheel's
# tritonserver with the python backend, each model's stub fenced (services/inference/stub_fence.py).
#   docker build -f deploy/docker/inference.Dockerfile -t maas/inference:0.1.0 .
ARG BASE=maas/base:0.1.0
FROM ${BASE}
EXPOSE 50053 9153 8000 8001 8002
# The service's health; a node container overrides it with its /v2/health/ready (stack.sh, the chart).
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-m", "services.common.healthcheck", "127.0.0.1:50053"]
CMD ["-m", "services.inference"]
