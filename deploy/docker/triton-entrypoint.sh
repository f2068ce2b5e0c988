#!/usr/bin/env bash
# Runs the tritonserver that the nvidia-pytriton wheel ships, as the inference service would,
# but listening on the pod's addresses so that the gateway can call it directly.
set -euo pipefail
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
wheel="$site/pytriton/tritonserver"
version=$(python -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
backends=$(mktemp -d)/backends
mkdir -p "$backends/python"
cp "$wheel/backends/python/libtriton_python.so" "$wheel/backends/python/triton_python_backend_utils.py" \
   "$wheel/python_backend_stubs/$version/triton_python_backend_stub" "$backends/python/"
mkdir -p "$TRITON_MODEL_REPOSITORY"
# The stub links libpython: this interpreter's own copy first; it finds torch through `python` on PATH.
export LD_LIBRARY_PATH="$(python -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))'):$site/nvidia_pytriton.libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$wheel/bin/tritonserver" \
  --model-repository="$TRITON_MODEL_REPOSITORY" --model-control-mode=explicit \
  --backend-directory="$backends" \
  --grpc-address=0.0.0.0 --grpc-port="${TRITON_GRPC_PORT:-8001}" \
  --http-address=0.0.0.0 --http-port="${TRITON_HTTP_PORT:-8000}" \
  --allow-metrics=true --metrics-address=0.0.0.0 --metrics-port="${TRITON_METRICS_PORT:-8002}" \
  --strict-readiness=true --exit-timeout-secs=5
