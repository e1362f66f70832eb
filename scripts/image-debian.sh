#!/usr/bin/env bash
# `make image-debian`: build the Debian 12 cloud image (workers/guest/debian.py) and import it into the
# image store of `make run`'s system (same NOVACRON_VAR_DIR, database and secrets), as debian-12.
set -euo pipefail
cd "$(dirname "$0")/.."
export NOVACRON_VAR_DIR="$(realpath -m "${NOVACRON_VAR_DIR:-var}")"
mkdir -p "$NOVACRON_VAR_DIR"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
source scripts/local-secrets.sh
exec .venv/bin/python -m workers.guest.debian "$@"
