#!/usr/bin/env bash
# The whole platform in containers, from the images build.sh makes:
#   deploy/docker/stack.sh up       PostgreSQL, Redis, the four services and N Triton node containers
#                                   on a network of their own; waits until every one is healthy
#   deploy/docker/stack.sh status   each container's state and health
#   deploy/docker/stack.sh down     removes the containers and the network (--volumes: the data too)
# Only the gateway is reachable from the host, on 127.0.0.1. `up` writes $MAAS_HOME/admin.key and
# prints the exports that point the `maas` CLI and the SDK at it. Settings (environment):
#   MAAS_HOME                  where admin.key and the stack's generated secrets go (default
#                              .maas-containers: not `maas up`'s .maas, whose admin key it would replace)
#   MAAS_STACK_NAME            prefix of every container, volume and the network (default maas)
#   MAAS_CONTAINER_NODES       Triton node containers (default 2)
#   MAAS_GATEWAY_PORT          host port of the gateway's gRPC endpoint (default 50051)
#   MAAS_GATEWAY_HTTP_PORT     host port of its HTTP/OpenAI endpoint (default 50080)
#   MAAS_IMAGE_TAG             image tag (default: the charts' appVersion)
#   MAAS_STACK_ENV             extra MAAS_* settings for every service: "NAME=value NAME=value"
set -euo pipefail
cd "$(dirname "$0")/../.."

NAME=${MAAS_STACK_NAME:-maas}
HOME_DIR=${MAAS_HOME:-.maas-containers}
NODES=${MAAS_CONTAINER_NODES:-2}
GATEWAY_PORT=${MAAS_GATEWAY_PORT:-50051}
HTTP_PORT=${MAAS_GATEWAY_HTTP_PORT:-50080}
TAG=${MAAS_IMAGE_TAG:-$(sed -n 's/^appVersion: *"\(.*\)"/\1/p' deploy/helm/gateway/Chart.yaml)}
NETWORK=$NAME-net
SECRETS=$HOME_DIR/containers/$NAME.env
# Tenants' models run in the node containers: no capability, no privilege gain, anywhere. --init
# reaps what a service's children leave behind and forwards signals.
HARDENED=(--init --cap-drop ALL --security-opt no-new-privileges --restart unless-stopped)

containers() {
    docker ps -a --filter "label=maas.stack=$NAME" --format '{{.Names}}'
}

secrets() {
    # Generated once per stack, kept 0600 under MAAS_HOME: never in an image, never on a command line.
    mkdir -p "$(dirname "$SECRETS")"
    chmod 700 "$(dirname "$SECRETS")"
    if [ ! -s "$SECRETS" ]; then
        (
            umask 077
            for secret in POSTGRES_PASSWORD REDIS_PASSWORD MAAS_INTERNAL_TOKEN MAAS_TRITON_TOKEN; do
                echo "$secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
            done > "$SECRETS"
        )
    fi
    # shellcheck disable=SC1090
    . "$SECRETS"
}

volume() {  # volume ROLE: the stack's named volume for ROLE, labelled so that `down --volumes` finds it
    docker volume create --label "maas.stack=$NAME" "$NAME-$1" > /dev/null
    echo "$NAME-$1"
}

run() {  # run ROLE IMAGE [docker run options...] -- [command...]
    local role=$1 image=$2
    shift 2
    local options=() command=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do options+=("$1"); shift; done
    [ $# -gt 0 ] && shift && command=("$@")
    docker run -d --name "$NAME-$role" --hostname "$NAME-$role" --network "$NETWORK" \
        --label "maas.stack=$NAME" --label "maas.role=$role" "${options[@]}" "$image:$TAG" "${command[@]}" > /dev/null
}

service_env() {  # the settings every service shares: peers, secrets, datastores
    local database=$1
    local env=(
        -e MAAS_INTERNAL_TOKEN="$MAAS_INTERNAL_TOKEN" -e MAAS_TRITON_TOKEN="$MAAS_TRITON_TOKEN"
        -e MAAS_REGISTRY_ADDR="$NAME-registry:50052" -e MAAS_INFERENCE_ADDR="$NAME-inference:50053"
        -e MAAS_TRAINER_ADDR="$NAME-trainer:50054" -e MAAS_GATEWAY_ADDR="$NAME-gateway:50051"
        -e MAAS_REDIS_URL="redis://:$REDIS_PASSWORD@$NAME-redis:6379/0"
        -e MAAS_TRITON_TLS=false
    )
    if [ -n "$database" ]; then
        local upper
        upper=$(echo "$database" | tr '[:lower:]' '[:upper:]')
        env+=(-e "MAAS_${upper}_DATABASE_URL=postgresql+psycopg://postgres:$POSTGRES_PASSWORD@$NAME-postgres:5432/$database")
    fi
    for setting in ${MAAS_STACK_ENV:-}; do env+=(-e "$setting"); done
    printf '%s\0' "${env[@]}"
}

wait_healthy() {  # wait_healthy SECONDS CONTAINER...
    local deadline=$((SECONDS + $1)) container state
    shift
    for container in "$@"; do
        while :; do
            state=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}} {{.RestartCount}}' "$container")
            [ "${state% *}" = healthy ] && break
            # A process that keeps dying is restarted by its policy: two restarts are enough to tell.
            if [ "${state#* }" -ge 2 ] || [ $SECONDS -gt $deadline ]; then
                echo "stack.sh: $container is ${state% *} after ${state#* } restarts; its log ends:" >&2
                docker logs --tail 40 "$container" >&2 || true
                exit 1
            fi
            sleep 1
        done
    done
}

up() {
    if [ -n "$(containers)" ]; then
        echo "stack.sh: stack '$NAME' exists (stack.sh status; stack.sh down to remove it)" >&2
        exit 1
    fi
    secrets
    docker network inspect "$NETWORK" > /dev/null 2>&1 || docker network create "$NETWORK" > /dev/null

    run postgres maas/postgres "${HARDENED[@]}" \
        -e POSTGRES_PASSWORD="$POSTGRES_PASSWORD" -e POSTGRES_DATABASES="registry inference trainer gateway" \
        -v "$(volume postgres):/var/lib/postgresql/data"
    run redis maas/redis "${HARDENED[@]}" -e REDIS_PASSWORD="$REDIS_PASSWORD" -v "$(volume redis):/data"
    wait_healthy 120 "$NAME-postgres" "$NAME-redis"

    local urls=() i
    for ((i = 0; i < NODES; i++)); do
        # Each node: its own address on the network, its own scratch, shared memory for the python
        # backend's tensors, and no secret but the Triton token its protocols require.
        run "triton-$i" maas/inference "${HARDENED[@]}" --shm-size 1g \
            -e MAAS_TRITON_TOKEN="$MAAS_TRITON_TOKEN" \
            --health-cmd "python -m services.common.healthcheck http://127.0.0.1:8000/v2/health/live" \
            --health-interval 2s --health-start-period 60s -- -m services.inference.node
        urls+=("$NAME-triton-$i:8001")
    done
    local joined
    joined=$(IFS=,; echo "${urls[*]}")

    local env
    mapfile -d '' env < <(service_env registry)
    run registry maas/registry "${HARDENED[@]}" "${env[@]}" -e MAAS_REGISTRY_ADDR=0.0.0.0:50052 \
        -e MAAS_REGISTRY_METRICS_ADDR=0.0.0.0:9152 -v "$(volume registry):/var/lib/maas"
    mapfile -d '' env < <(service_env inference)
    run inference maas/inference "${HARDENED[@]}" "${env[@]}" -e MAAS_INFERENCE_ADDR=0.0.0.0:50053 \
        -e MAAS_INFERENCE_METRICS_ADDR=0.0.0.0:9153 -e MAAS_TRITON_URLS="$joined" -e MAAS_TRITON_METRICS_PORT=8002 \
        -e MAAS_GPU_AVAILABLE=false -v "$(volume inference):/var/lib/maas"
    mapfile -d '' env < <(service_env trainer)
    run trainer maas/trainer "${HARDENED[@]}" "${env[@]}" -e MAAS_TRAINER_ADDR=0.0.0.0:50054 \
        -e MAAS_TRAINER_METRICS_ADDR=0.0.0.0:9154 -v "$(volume trainer):/var/lib/maas"
    mapfile -d '' env < <(service_env gateway)
    run gateway maas/gateway "${HARDENED[@]}" "${env[@]}" -e MAAS_GATEWAY_ADDR=0.0.0.0:50051 \
        -e MAAS_GATEWAY_HTTP_ADDR=0.0.0.0:50080 -e MAAS_GATEWAY_METRICS_ADDR=0.0.0.0:9151 \
        -p "127.0.0.1:$GATEWAY_PORT:50051" -p "127.0.0.1:$HTTP_PORT:50080" -v "$(volume gateway):/var/lib/maas"

    local nodes=()
    for ((i = 0; i < NODES; i++)); do nodes+=("$NAME-triton-$i"); done
    wait_healthy 300 "${nodes[@]}" "$NAME-registry" "$NAME-inference" "$NAME-trainer" "$NAME-gateway"

    # The first admin key (idempotent): issued inside the gateway, copied out 0600.
    docker exec "$NAME-gateway" python -m services.gateway bootstrap-admin --key-file /var/lib/maas/admin.key
    mkdir -p "$HOME_DIR"
    local key
    key=$(docker exec "$NAME-gateway" cat /var/lib/maas/admin.key)
    if [ -s "$HOME_DIR/admin.key" ] && [ "$(cat "$HOME_DIR/admin.key")" != "$key" ]; then
        # Another stack's key (a `maas up` stack's, say): replacing it would lose that admin key.
        echo "stack.sh: $HOME_DIR/admin.key holds another stack's admin key; set MAAS_HOME to a folder of this stack's own" >&2
        exit 1
    fi
    (umask 077 && printf '%s\n' "$key" > "$HOME_DIR/admin.key")
    echo "stack '$NAME' is up: $NODES Triton node containers; the gateway on 127.0.0.1:$GATEWAY_PORT"
    echo "export MAAS_HOME=$HOME_DIR MAAS_GATEWAY_ADDR=127.0.0.1:$GATEWAY_PORT"
}

status() {
    docker ps -a --filter "label=maas.stack=$NAME" --format 'table {{.Names}}\t{{.Status}}\t{{.Ports}}'
}

down() {
    local names
    names=$(containers)
    [ -z "$names" ] || docker rm -f $names > /dev/null
    docker network rm "$NETWORK" > /dev/null 2>&1 || true
    if [ "${1:-}" = --volumes ]; then
        docker volume ls -q --filter "label=maas.stack=$NAME" | xargs -r docker volume rm > /dev/null
        rm -f "$SECRETS"
    fi
    echo "stack '$NAME' is down"
}

case "${1:-}" in
    up) up ;;
    status) status ;;
    down) shift; down "$@" ;;
    *) echo "usage: deploy/docker/stack.sh up|status|down [--volumes]" >&2; exit 2 ;;
esac
