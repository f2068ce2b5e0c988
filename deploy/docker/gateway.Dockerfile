# The gateway: public gRPC endpoint (50051) and metrics (9151).
#   docker build -f deploy/docker/gateway.Dockerfile -t maas/gateway:0.1.0 .
ARG BASE=maas/base:0.1.0
FROM ${BASE}
EXPOSE 50051 9151
CMD ["-m", "services.gateway"]
