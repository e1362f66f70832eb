#!/usr/bin/env bash
# Installs the Debian packages NovaCron needs (as root), or prints the exact command and fails.
# Usage: scripts/system-deps.sh run|test|bench|image
#   run:  what `make run` needs (QEMU; the VM networks' data plane: iproute2, nftables, dnsmasq-base;
#         and a Redis server when none answers at REDIS_URL)
#   test: what `make test` needs: the above, plus what the suite drives (network namespaces and tc,
#         nc and rsync as transfer baselines, Chromium for the dashboard and chromium-driver for the
#         console page (Selenium types into it), redis-server for the fault scenarios' private
#         servers, losetup for block-device sends, busybox's udhcpc as the
#         network tests' DHCP client, iputils' ping for the clients' view of a moving VM)
#   bench: what the `make bench-*` targets need: the test set and wrk (bench-api's load generator)
#   image: what `make image-debian` needs (mmdebstrap, extlinux + syslinux's MBR, sfdisk, e2fsprogs);
#         test and bench include it: the guest tests build that image when it is missing
# Nothing else is touched: a package already installed is not upgraded.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-}"
case "$profile" in
  run | test | bench | image) ;;
  *) echo "usage: $0 run|test|bench|image" >&2; exit 2 ;;
esac

packages=(qemu-system-x86 qemu-utils iproute2 nftables dnsmasq-base)
command -v python3 >/dev/null || packages+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || packages+=(python3-venv)
image_packages=(mmdebstrap extlinux syslinux-common fdisk e2fsprogs util-linux openssh-client)
if [[ "$profile" == image ]]; then
  packages+=("${image_packages[@]}")
elif [[ "$profile" == test || "$profile" == bench ]]; then
  packages+=(netcat-openbsd rsync chromium chromium-driver redis-server util-linux busybox iputils-ping "${image_packages[@]}")
  [[ "$profile" == bench ]] && packages+=(wrk)
elif ! command -v redis-server >/dev/null && ! scripts/redis-up.sh; then
  packages+=(redis-server)
fi

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -eq 0 ]]; then
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "make $profile needs these Debian packages; install them as root, then run it again:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi
