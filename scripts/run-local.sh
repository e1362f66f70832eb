#!/usr/bin/env bash
# `make run`: the whole system on this machine — web (granian), control worker, beat, Flower and
# two local nodes — under honcho. Secrets are generated once into var/secrets.env (mode 0600).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p var
export HOST="${HOST:-127.0.0.1}" PORT="${PORT:-8000}" FLOWER_PORT="${FLOWER_PORT:-5555}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"

scripts/system-deps.sh run
scripts/ensure-redis.sh

if [[ ! -f var/secrets.env ]]; then
  umask 077
  {
    echo "SECRET_KEY=$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(50))')"
    echo "DWCP_SECRET=$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(32))')"
    echo "NOVACRON_ADMIN_PASSWORD=$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(12))')"
  } > var/secrets.env
fi
set -a
# shellcheck disable=SC1091
source var/secrets.env
set +a
export SECRET_KEY DWCP_SECRET NOVACRON_ADMIN_PASSWORD
export ALLOWED_HOSTS="${ALLOWED_HOSTS:-127.0.0.1,localhost,$HOST}"

if [[ ! -f var/images/testguest/manifest.json ]]; then
  echo "building the test guest image (Debian kernel + busybox, once)"
  .venv/bin/python -m workers.guest.build --out var/images/testguest
fi
# The busybox test guest ignores ACPI: give it a short grace period before stop falls back to quit.
export NODE_POWERDOWN_TIMEOUT="${NODE_POWERDOWN_TIMEOUT:-5}"

.venv/bin/python manage.py migrate --no-input -v 0
.venv/bin/python manage.py bootstrap
.venv/bin/python manage.py collectstatic --no-input -v 0

# Prometheus multiprocess mode: the web and Celery processes write their counters under this directory
# and GET /metrics merges them. Files of an earlier run would be counted again: empty it at each start.
export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-$PWD/var/prometheus}"
mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
find "$PROMETHEUS_MULTIPROC_DIR" -name '*.db' -type f -delete

cat <<MSG

NovaCron is starting:
  API (browsable)  http://$HOST:$PORT/api/v1/
  API docs         http://$HOST:$PORT/api/v1/docs/
  Admin            http://$HOST:$PORT/admin/      user admin, password: $NOVACRON_ADMIN_PASSWORD
  Flower           http://127.0.0.1:$FLOWER_PORT/  user admin, same password
  Dashboard        http://$HOST:$PORT/dashboard/  (staff login); Prometheus text at /metrics
  Nodes            node1 (DWCP 127.0.0.1:7001), node2 (DWCP 127.0.0.1:7002), data in var/nodes/
  Try              POST /api/v1/vms/ {"name": "demo", "image": "testguest", "vcpus": 1, "memory_mb": 128, "disk_gb": 1}
  Database         ${DATABASE_URL:-SQLite file var/novacron.sqlite3}
Stop with Ctrl-C.

MSG
exec .venv/bin/honcho start -f Procfile
