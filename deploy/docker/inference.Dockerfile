# The inference service (gRPC 50053, metrics 9153). The same image runs Triton: its tritonserver
# binary, python backend and stub come from the nvidia-pytriton wheel, with torch and onnxruntime
# beside them for the python-backend runner (the chart's Triton Deployment uses
# deploy/docker/triton-entrypoint.sh as its command).
#   docker build -f deploy/docker/inference.Dockerfile -t maas/inference:0.1.0 .
ARG BASE=maas/base:0.1.0
FROM ${BASE}
EXPOSE 50053 9153 8000 8001 8002
CMD ["-m", "services.inference"]
