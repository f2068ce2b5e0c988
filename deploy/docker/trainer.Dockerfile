# The trainer: gRPC 50054, metrics 9154; training runs as worker subprocesses (torch, torchrun).
#   docker build -f deploy/docker/trainer.Dockerfile -t maas/trainer:0.1.0 .
ARG BASE=maas/base:0.1.0
FROM ${BASE}
EXPOSE 50054 9154
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-m", "services.common.healthcheck", "127.0.0.1:50054"]
CMD ["-m", "services.trainer"]
