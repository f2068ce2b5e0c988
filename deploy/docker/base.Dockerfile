# Shared build for every MaaS service image: the repository installed with the `server` extra
# into /opt/venv, run as an unprivileged user (uid 10001). deploy/docker/build.sh builds it, and
# every other image, from Debian alone: a debootstrapped bookworm with python3 (PYTHON_IMAGE) and
# a wheelhouse of this machine's wheels (.build/wheelhouse, the CPU build of torch among them).
# Where an image registry is reachable, the official Python base works as well:
#   mkdir -p .build/wheelhouse && docker build -f deploy/docker/base.Dockerfile \
#     --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm --build-arg TORCH_INDEX=<a CPU wheel index> \
#     -t maas/base:0.1.0 .
# Nothing secret enters a layer: the wheelhouse holds public wheels, and no key or certificate is
# copied (the services get theirs at run time, from the environment or mounted files).
ARG PYTHON_IMAGE=maas/debian:bookworm
FROM ${PYTHON_IMAGE} AS dependencies
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
COPY .build/wheelhouse /wheels
COPY pyproject.toml /tmp/
# With a wheelhouse, nothing comes from an index. Without one, TORCH_INDEX names where the CPU (or a
# CUDA) build of torch comes from: the index's default torch is a multi-GB CUDA build.
ARG TORCH_INDEX=""
# What the project depends on, and its build backend: this layer is rebuilt only when
# pyproject.toml changes, not with every change to the code.
RUN set -e; \
    if ls /wheels/*.whl >/dev/null 2>&1; then source="--no-index --find-links /wheels"; else source=""; fi; \
    if [ -n "$TORCH_INDEX" ]; then /opt/venv/bin/pip install --index-url "$TORCH_INDEX" torch==2.13.0; fi; \
    /opt/venv/bin/python -c 'import tomllib; p = tomllib.load(open("/tmp/pyproject.toml", "rb")); \
print("\n".join(p["project"]["dependencies"] + p["project"]["optional-dependencies"]["server"] \
+ p["build-system"]["requires"]))' > /tmp/requirements.txt; \
    /opt/venv/bin/pip install $source -r /tmp/requirements.txt

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 maas && useradd --uid 10001 --gid 10001 --home-dir /var/lib/maas --create-home maas \
 && mkdir -p /var/lib/triton && chown maas:maas /var/lib/triton
COPY --from=dependencies /opt/venv /opt/venv
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sdk ./sdk
COPY services ./services
# The project itself, offline: its dependencies and build backend are in the venv already.
RUN /opt/venv/bin/pip install --quiet --no-cache-dir --no-deps --no-build-isolation --no-index . \
 && rm -rf build sdk/*.egg-info *.egg-info
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 MAAS_HOME=/var/lib/maas
USER 10001
ENTRYPOINT ["python"]
