#!/usr/bin/env bash
# A Docker engine for the images and the container suite (tests/containers): Debian's docker.io
# and debootstrap where they are missing, and dockerd started where none answers. Safe to run
# again. Without root and without a running engine it says what to do and fails.
set -euo pipefail
sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo

missing=()
command -v dockerd > /dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap > /dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (apt)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
fi

if ! docker info > /dev/null 2>&1; then
    echo "starting dockerd (log: /var/log/maas-dockerd.log)"
    $sudo sh -c 'nohup dockerd > /var/log/maas-dockerd.log 2>&1 &'
    for _ in $(seq 60); do
        docker info > /dev/null 2>&1 && break
        sleep 1
    done
    docker info > /dev/null 2>&1 || { tail -n 20 /var/log/maas-dockerd.log >&2; exit 1; }
fi
