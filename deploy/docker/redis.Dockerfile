# Redis from Debian's packages, for the containerized stack (deploy/docker/stack.sh): limits,
# quotas and the request cache. The password comes from $REDIS_PASSWORD at run time.
ARG DEBIAN_IMAGE=maas/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
HEALTHCHECK --interval=2s --timeout=5s --start-period=10s --retries=5 \
  CMD ["sh", "-c", "REDISCLI_AUTH=\"$REDIS_PASSWORD\" redis-cli ping | grep -q PONG"]
# Append-only, as `maas up` runs it: quota spending survives a restart.
CMD ["sh", "-c", "exec redis-server --bind 0.0.0.0 --protected-mode no --dir /data --save '' --appendonly yes --requirepass \"$REDIS_PASSWORD\""]
