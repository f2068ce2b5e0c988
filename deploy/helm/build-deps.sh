#!/usr/bin/env bash
# Vendors the file:// dependencies (service charts need maas-lib, the umbrella needs the
# service charts) into each chart's charts/ folder, offline. Run before `helm install`.
set -euo pipefail
cd "$(dirname "$0")"
helm=${HELM:-helm}
for chart in gateway registry inference trainer maas; do
  "$helm" dependency build "$chart" >/dev/null
done
