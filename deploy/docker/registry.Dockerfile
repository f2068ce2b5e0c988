# The registry: gRPC 50052, metrics 9152. Blobs go to S3 when MAAS_REGISTRY_S3_BUCKET is set.
#   docker build -f deploy/docker/registry.Dockerfile -t maas/registry:0.1.0 .
ARG BASE=maas/base:0.1.0
FROM ${BASE}
EXPOSE 50052 9152
CMD ["-m", "services.registry"]
