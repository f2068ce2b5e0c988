#!/bin/sh
# First start: a cluster whose superuser password is $POSTGRES_PASSWORD (never in a layer), with
# the databases named in $POSTGRES_DATABASES. Every start: listen on the container's addresses.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
    password_file=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$password_file"
    # UTF8 explicitly: the image has no locale, and initdb would pick SQL_ASCII.
    initdb --username=postgres --pwfile="$password_file" --auth-local=peer --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$password_file"
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
    pg_ctl -w -o "-c listen_addresses=''" start >/dev/null
    for database in ${POSTGRES_DATABASES:-}; do
        createdb "$database"
    done
    pg_ctl -w stop >/dev/null
fi
exec postgres -c listen_addresses='*' -c max_connections=200
