# Shared build for every MaaS service image: the repository installed with the `server` extra
# into /opt/venv, run as an unprivileged user. Build from the repository root:
#   docker build -f deploy/docker/base.Dockerfile -t maas/base:0.1.0 .
# The per-service Dockerfiles start FROM it. Not built in this repository's CI (no Docker engine).
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sdk ./sdk
COPY services ./services
# The CPU build of torch by default; a GPU image passes --build-arg TORCH_INDEX=<a CUDA wheel index>.
ARG TORCH_INDEX=""
RUN if [ -n "$TORCH_INDEX" ]; then /opt/venv/bin/pip install --index-url "$TORCH_INDEX" torch==2.13.0; fi \
 && /opt/venv/bin/pip install '.[server]'

FROM python:3.11-slim-bookworm
RUN useradd --uid 10001 --home-dir /var/lib/maas --create-home maas
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
COPY deploy/docker/triton-entrypoint.sh /app/deploy/docker/triton-entrypoint.sh
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 MAAS_HOME=/var/lib/maas
WORKDIR /app
USER 10001
ENTRYPOINT ["python"]
