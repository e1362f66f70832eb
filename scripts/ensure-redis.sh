#!/usr/bin/env bash
# Start a local redis-server on 127.0.0.1:6379 (data in var/redis, nothing persisted) when no Redis
# answers at REDIS_URL; used by `make run` and `make test`. A Redis elsewhere is never started here.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/redis-up.sh && exit 0
url="${REDIS_URL:-redis://127.0.0.1:6379/0}"
case "$url" in
  redis://127.0.0.1:6379* | redis://localhost:6379*) ;;
  *) echo "no Redis answers at $url; start it, or unset REDIS_URL for a local one" >&2; exit 1 ;;
esac
echo "starting a local redis-server on 127.0.0.1:6379 (data in var/redis)"
mkdir -p var/redis
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --dir "$PWD/var/redis" --save "" --appendonly no \
  --logfile "$PWD/var/redis/redis.log"
for _ in $(seq 50); do scripts/redis-up.sh && exit 0; sleep 0.1; done
echo "redis-server did not answer within 5 s; see var/redis/redis.log" >&2
exit 1
