# The gateway: public gRPC endpoint (50051), HTTP and OpenAI-compatible endpoint (50080) and
# metrics (9151). deploy/docker/build.sh builds it; by hand:
#   docker build -f deploy/docker/gateway.Dockerfile -t maas/gateway:0.1.0 .
ARG BASE=maas/base:0.1.0
FROM ${BASE}
EXPOSE 50051 50080 9151
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-m", "services.common.healthcheck", "127.0.0.1:50051"]
CMD ["-m", "services.gateway"]
