#!/usr/bin/env bash
# `make run`: the whole system on this machine — web (granian), streams (granian ASGI), control
# worker, beat, Flower and two local nodes — under honcho. Files go under NOVACRON_VAR_DIR (default var/).
# SECRET_KEY, DWCP_SECRET and NOVACRON_ADMIN_PASSWORD come from the environment when set; the ones
# missing come from var/secrets.env (mode 0600), generated once (scripts/local-secrets.sh).
# Each process logs to var/log/<process>.log; the console shows warnings and errors (scripts/logged.py).
# On stop it says what keeps running (VMs outlive make run); `make stop` ends them.
set -euo pipefail
cd "$(dirname "$0")/.."
export NOVACRON_VAR_DIR="$(realpath -m "${NOVACRON_VAR_DIR:-var}")"
var="$NOVACRON_VAR_DIR"
mkdir -p "$var/log"
export HOST="${HOST:-127.0.0.1}" PORT="${PORT:-8000}" FLOWER_PORT="${FLOWER_PORT:-5555}"
# The streams service (migration events) on its own port; pages of the web port may open its streams.
export STREAMS_PORT="${STREAMS_PORT:-8001}"
export STREAMS_ALLOWED_ORIGINS="${STREAMS_ALLOWED_ORIGINS:-http://$HOST:$PORT,http://localhost:$PORT,http://127.0.0.1:$PORT}"
export NODE1_DWCP_PORT="${NODE1_DWCP_PORT:-7001}" NODE2_DWCP_PORT="${NODE2_DWCP_PORT:-7002}"
# Both local nodes share this host's network namespace: each needs its own VXLAN UDP port.
export NODE1_VXLAN_PORT="${NODE1_VXLAN_PORT:-4789}" NODE2_VXLAN_PORT="${NODE2_VXLAN_PORT:-4790}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"

scripts/system-deps.sh run
scripts/ensure-redis.sh

password_given="${NOVACRON_ADMIN_PASSWORD:+yes}"
source scripts/local-secrets.sh
admin_password="password: $NOVACRON_ADMIN_PASSWORD (kept in $secrets)"
[[ -n "$password_given" ]] && admin_password="password from NOVACRON_ADMIN_PASSWORD"
export ALLOWED_HOSTS="${ALLOWED_HOSTS:-127.0.0.1,localhost,$HOST}"

if [[ ! -f "$var/images/testguest/manifest.json" ]]; then
  echo "building the test guest image (Debian kernel + busybox, once)"
  .venv/bin/python -m workers.guest.build --out "$var/images/testguest"
fi
# The busybox test guest ignores ACPI: give it a short grace period before stop falls back to quit.
export NODE_POWERDOWN_TIMEOUT="${NODE_POWERDOWN_TIMEOUT:-5}"

.venv/bin/python manage.py migrate --no-input -v 0
.venv/bin/python manage.py bootstrap
.venv/bin/python manage.py collectstatic --no-input -v 0

# Prometheus multiprocess mode: the web and Celery processes write their counters under this directory
# and GET /metrics merges them. Files of an earlier run would be counted again: empty it at each start.
export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-$var/prometheus}"
mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
find "$PROMETHEUS_MULTIPROC_DIR" -name '*.db' -type f -delete

cat <<MSG

NovaCron is starting:
  API (browsable)  http://$HOST:$PORT/api/v1/
  API docs         http://$HOST:$PORT/api/v1/docs/
  Streams          http://$HOST:$STREAMS_PORT/api/v1/migrations/<id>/events/ (SSE; docs/streams.md)
  Admin            http://$HOST:$PORT/admin/      user admin, $admin_password
  Flower           http://127.0.0.1:$FLOWER_PORT/  user admin, same password
  Dashboard        http://$HOST:$PORT/dashboard/  (staff login); Prometheus text at /metrics
  Consoles         http://$HOST:$PORT/vms/<id>/console/  a VM's serial console in the browser (docs/console.md)
  Nodes            node1 (DWCP 127.0.0.1:$NODE1_DWCP_PORT, VXLAN $NODE1_VXLAN_PORT), node2 (DWCP 127.0.0.1:$NODE2_DWCP_PORT, VXLAN $NODE2_VXLAN_PORT), data in $var/nodes/
  Try              POST /api/v1/vms/ {"name": "demo", "image": "testguest", "vcpus": 1, "memory_mb": 128, "disk_gb": 1}
  Database         ${DATABASE_URL:-SQLite file $var/novacron.sqlite3}
  Logs             $var/log/<process>.log; this console shows warnings and errors only
Stop with Ctrl-C; VMs keep running until \`make stop\`.

MSG
# honcho runs in the background so that this script outlives it and can say what keeps running. A
# Ctrl-C reaches honcho directly (same process group); a SIGTERM to this script is passed on.
.venv/bin/honcho start -f Procfile &
honcho_pid=$!
trap 'kill -TERM "$honcho_pid" 2>/dev/null || true' INT TERM
status=0
wait "$honcho_pid" || status=$?
while kill -0 "$honcho_pid" 2>/dev/null; do wait "$honcho_pid" || status=$?; done
.venv/bin/python -m workers.node.stop --report || true
exit "$status"
