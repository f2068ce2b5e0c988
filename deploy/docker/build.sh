#!/usr/bin/env bash
# Builds every MaaS image from Debian alone, with no image registry:
#   1. maas/debian:bookworm  a debootstrapped bookworm (minbase, python3), imported into Docker;
#   2. .build/wheelhouse     every wheel the services need, from this machine's pip (its cache, its
#                            index, the CPU build of torch on its disk), so no build reaches an index;
#   3. maas/base, then maas/gateway, maas/registry, maas/inference (also the Triton nodes' image),
#      maas/trainer, and maas/postgres and maas/redis for the containerized stack (stack.sh).
# Run it from anywhere, as a user who may use Docker; debootstrap needs root (sudo is used if
# needed). Images are tagged with the charts' appVersion. Steps whose result exists are skipped;
# MAAS_REBUILD_DEBIAN=1 makes the Debian image again.
#   MAAS_IMAGE_TAG      tag (default: the charts' appVersion)
#   MAAS_PYTHON         the interpreter whose pip fills the wheelhouse (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/../.."

TAG=${MAAS_IMAGE_TAG:-$(sed -n 's/^appVersion: *"\(.*\)"/\1/p' deploy/helm/gateway/Chart.yaml)}
DEBIAN_IMAGE=maas/debian:bookworm
PYTHON=${MAAS_PYTHON:-.venv/bin/python}
TIMES=.build/build-times.tsv
mkdir -p .build/wheelhouse
: > "$TIMES"

step() {  # step NAME COMMAND...: run it and record how long it took
    local name=$1 started=$SECONDS
    shift
    echo "== $name"
    "$@"
    printf '%s\t%s\n' "$name" $((SECONDS - started)) >> "$TIMES"
}

debian_mirror() {
    # The mirror this machine's apt already uses (deb822 or one-line sources).
    local mirror
    mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
    [ -n "$mirror" ] || { echo "build.sh: no Debian mirror in /etc/apt sources" >&2; exit 1; }
    echo "$mirror"
}

build_debian() {
    local rootfs sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    rootfs=$(mktemp -d)
    # passwd for useradd; libpython3.11 for the python backend's stub, which links libpython.
    $sudo debootstrap --variant=minbase --include=python3,python3-venv,libpython3.11,passwd,ca-certificates \
        bookworm "$rootfs" "$(debian_mirror)" > .build/debootstrap.log
    $sudo rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    $sudo tar -C "$rootfs" -c . | docker import - "$DEBIAN_IMAGE" > /dev/null
    $sudo rm -rf "$rootfs"
}

fill_wheelhouse() {
    # The server extra's pins (and the build backend), as wheels for this platform and Python 3.11.
    "$PYTHON" - > .build/requirements.txt <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join([*project["project"]["dependencies"], *project["project"]["optional-dependencies"]["server"],
                 *project["build-system"]["requires"], "wheel",
                 # redis needs it below Python 3.11.3 (bookworm has 3.11.2); pip download evaluates
                 # markers with --python-version's major.minor only, so it would leave it out.
                 "async-timeout>=4.0.3"]))
PY
    # Wheels for the image's own interpreter (bookworm's 3.11.2: environment markers differ from
    # this machine's Python) and glibc, whatever this machine runs.
    local python_version platforms=() i
    python_version=$(docker run --rm "$DEBIAN_IMAGE" python3 -c 'import platform; print(platform.python_version())')
    for i in $(seq 5 36); do platforms+=(--platform "manylinux_2_${i}_x86_64"); done
    platforms+=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64
                --platform linux_x86_64)
    if ! "$PYTHON" -m pip download --only-binary=:all: --python-version "$python_version" --implementation cp \
        --abi cp311 --abi abi3 --abi none "${platforms[@]}" -d .build/wheelhouse -r .build/requirements.txt \
        > .build/pip-download.log 2>&1; then
        grep -v "^WARNING: Location" .build/pip-download.log >&2
        exit 1
    fi
}

build() {  # build IMAGE DOCKERFILE [ARGS...]
    local image=$1 file=$2
    shift 2
    docker build --quiet -f "deploy/docker/$file" -t "$image:$TAG" "$@" . > /dev/null
}

if [ -n "${MAAS_REBUILD_DEBIAN:-}" ] || ! docker image inspect "$DEBIAN_IMAGE" > /dev/null 2>&1; then
    step debian build_debian
fi
step wheelhouse fill_wheelhouse
step base build maas/base base.Dockerfile --build-arg PYTHON_IMAGE="$DEBIAN_IMAGE"
for service in gateway registry inference trainer; do
    step "$service" build "maas/$service" "$service.Dockerfile" --build-arg BASE="maas/base:$TAG"
done
for store in postgres redis; do
    step "$store" build "maas/$store" "$store.Dockerfile" --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE"
done
# The layers a rebuild replaced (a new dependency set is a new 2 GB layer): nothing else uses them.
docker image prune -f > /dev/null
echo "built (seconds per step in $TIMES):"
docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep "^maas/" | sort
