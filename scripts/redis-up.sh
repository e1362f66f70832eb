#!/usr/bin/env bash
# Exit 0 when a Redis server answers PING at REDIS_URL (default redis://127.0.0.1:6379/0), else 1.
# Plain bash (/dev/tcp): it runs before the virtualenv exists.
set -uo pipefail
url="${REDIS_URL:-redis://127.0.0.1:6379/0}"
hostport="${url#*://}"
hostport="${hostport##*@}"
hostport="${hostport%%/*}"
host="${hostport%%:*}"
port="${hostport##*:}"
[[ "$port" == "$hostport" ]] && port=6379
{ exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null || exit 1
printf 'PING\r\n' >&3
read -r -t 2 answer <&3 || exit 1
exec 3>&-
[[ "$answer" == +PONG* || "$answer" == -NOAUTH* ]]
