#!/usr/bin/env bash
# Installs the Debian packages NovaCron needs (as root), or prints the exact command to run.
# Usage: scripts/system-deps.sh [--with-redis]
set -euo pipefail
packages=(qemu-system-x86 qemu-utils)
command -v python3 >/dev/null || packages+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || packages+=(python3-venv)
if [[ "${1:-}" == "--with-redis" ]] && ! command -v redis-server >/dev/null; then
  packages+=(redis-server)
fi
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -eq 0 ]]; then
  echo "installing system packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
else
  echo "NovaCron needs these system packages; run:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
