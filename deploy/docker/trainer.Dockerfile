# The trainer: gRPC 50054, metrics 9154; training runs as worker subprocesses (torch, torchrun).
#   docker build -f deploy/docker/trainer.Dockerfile -t maas/trainer:0.1.0 .
ARG BASE=maas/base:0.1.0
FROM ${BASE}
EXPOSE 50054 9154
CMD ["-m", "services.trainer"]
