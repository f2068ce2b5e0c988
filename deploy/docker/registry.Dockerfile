# The registry: gRPC 50052, metrics 9152. Blobs go to S3 when MAAS_REGISTRY_S3_BUCKET is set,
# else under /var/lib/maas (mount a volume there to keep them).
#   docker build -f deploy/docker/registry.Dockerfile -t maas/registry:0.1.0 .
ARG BASE=maas/base:0.1.0
FROM ${BASE}
EXPOSE 50052 9152
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-m", "services.common.healthcheck", "127.0.0.1:50052"]
CMD ["-m", "services.registry"]
