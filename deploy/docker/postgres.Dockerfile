# PostgreSQL 15 from Debian's packages, for the containerized stack (deploy/docker/stack.sh): one
# database per service, password auth on the stack's own network only (it publishes no port).
ARG DEBIAN_IMAGE=maas/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* /var/lib/postgresql/15 \
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
 && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
COPY deploy/docker/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PGDATA=/var/lib/postgresql/data PATH=/usr/lib/postgresql/15/bin:$PATH
USER postgres
EXPOSE 5432
HEALTHCHECK --interval=2s --timeout=5s --start-period=30s --retries=5 CMD ["pg_isready", "-h", "127.0.0.1", "-q"]
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
