#!/bin/sh
# NovaCron test guest: PID 1 of the busybox initramfs built by workers/guest/build.py.
# Two serial ports (see workers/guest/__init__.py): the console (ttyS0) is a user's, with a busybox shell
# respawned whenever it exits; the guest channel (ttyS1) carries "tick N" every 100 ms, the dirty memory's
# reports and the answers to the one-line requests read from it. Nothing of the channel's protocol is
# printed on the console. Optionally keeps rewriting dirty_mb MiB of RAM at dirty_rate_mb MiB/s.
# PID 1 must never exit: nothing here uses "set -e" and the console's loop never ends.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp
mount -t tmpfs -o mode=0755 tmpfs /run

# The guest channel stays open on fd 3 for PID 1's whole life (its settings hold while it is open).
# Requests arrive on it: echo off first, so its output holds only the guest's own lines.
CHANNEL=/dev/ttyS1
exec 3<>$CHANNEL
stty -echo 115200 <&3
echo >&3

echo "NovaCron test guest: this console is a shell; the test protocol is on the second serial port ($CHANNEL)"

DIRTY_FILE=/dirty/mem
DIRTY_MB=0
DIRTY_RATE_MB=0
DIRTY_DATA=random
CORPUS=/run/corpus

# Decimal without leading zeros: ash reads "08" as bad octal, and an arithmetic error would end PID 1.
is_number() {
	case $1 in '' | *[!0-9]* | 0?*) return 1 ;; esac
	[ ${#1} -le 9 ]
}

for arg in $(cat /proc/cmdline); do
	case $arg in
	dirty_mb=*) is_number "${arg#*=}" && DIRTY_MB=${arg#*=} ;;
	dirty_rate_mb=*) is_number "${arg#*=}" && DIRTY_RATE_MB=${arg#*=} ;;
	dirty_data=binaries) DIRTY_DATA=binaries ;;
	esac
done

# NOW = seconds since boot in centiseconds, read without forking (busybox date has no %N).
now_cs() {
	read -r up _ </proc/uptime
	NOW=$((${up%.*} * 100 + 1${up#*.} - 100))
}

sleep_cs() {
	sleep "$(($1 / 100)).$(($1 % 100 / 10))$(($1 % 10))"
}

ticker() {
	n=0
	now_cs
	next=$NOW
	while :; do
		echo "tick $n"
		n=$((n + 1))
		next=$((next + 10))
		now_cs
		# Late (guest paused, CPU starved): resynchronise instead of printing a burst of ticks.
		[ $((next - NOW)) -le 0 ] && next=$((NOW + 10))
		sleep_cs $((next - NOW))
	done
}

# Fill DIRTY_FILE once, then rewrite it round robin at DIRTY_RATE_MB MiB/s, in dd calls of about 100 ms
# worth of data (at least 256 KiB) so that process start-up does not cap the rate.
# /run/dirty.pause (created by a "pause" request) stops the writes; /run/dirty.paused acknowledges it.
dirtier() {
	unit_kb=64
	total=$((DIRTY_MB * 1024 / unit_kb))
	rate_kb=$((DIRTY_RATE_MB * 1024))
	chunk=$((rate_kb / 10 / unit_kb))
	[ $chunk -lt 4 ] && chunk=4
	if [ "$DIRTY_DATA" = binaries ]; then
		# What a real guest's RAM holds: program text and data (busybox, kernel modules, the kernel's
		# symbol table), here 64 KiB blocks taken from that corpus at shifting offsets.
		cat /bin/busybox /lib/modules/*.ko /proc/kallsyms >$CORPUS 2>/dev/null
		corpus_blocks=$(($(wc -c <$CORPUS) / 65536))
		if [ "$corpus_blocks" -le $((chunk + 8)) ]; then
			echo "dirty error corpus-too-small"
			return
		fi
		source=$CORPUS
		block=0
		while [ $block -lt $total ]; do
			n=$((corpus_blocks - 7))
			[ $((block + n)) -gt $total ] && n=$((total - block))
			dd if=$CORPUS of=$DIRTY_FILE bs=64k count=$n seek=$block skip=$((block % 7)) conv=notrunc \
				2>/dev/null || { echo "dirty error fill-failed"; return; }
			block=$((block + n))
		done
	else
		source=/dev/urandom
		if ! dd if=/dev/urandom of=$DIRTY_FILE bs=1M count="$DIRTY_MB" iflag=fullblock 2>/dev/null; then
			echo "dirty error fill-failed"
			return
		fi
	fi
	: >/run/dirty.ready
	echo "dirty ready $DIRTY_MB $DIRTY_RATE_MB"
	pos=0
	done_kb=0
	now_cs
	start=$NOW
	while :; do
		if [ -e /run/dirty.pause ]; then
			: >/run/dirty.paused
			sleep 0.05
			now_cs
			start=$NOW
			done_kb=0
			continue
		fi
		rm -f /run/dirty.paused
		if [ "$rate_kb" -eq 0 ]; then
			sleep 0.1
			continue
		fi
		now_cs
		due_kb=$(((NOW - start) * rate_kb / 100))
		# Never owe more than one second of writes: a guest that cannot keep up just runs at its ceiling.
		[ $((due_kb - done_kb)) -gt "$rate_kb" ] && done_kb=$((due_kb - rate_kb))
		if [ $((due_kb - done_kb)) -lt $((chunk * unit_kb)) ]; then
			sleep 0.02
			continue
		fi
		n=$chunk
		[ $((pos + n)) -gt $total ] && n=$((total - pos))
		if [ "$source" = /dev/urandom ]; then
			skip=0
		else
			skip=$(((pos * 7 + done_kb) % (corpus_blocks - n)))
		fi
		dd if=$source of=$DIRTY_FILE bs=${unit_kb}k count=$n seek=$pos skip=$skip conv=notrunc iflag=fullblock \
			2>/dev/null
		done_kb=$((done_kb + n * unit_kb))
		pos=$(((pos + n) % total))
	done
}

ticker >&3 &

# Whether a virtio PCI device with one of the given device ids is present.
pci_present() {
	for dev in /sys/bus/pci/devices/*; do
		[ -r "$dev/vendor" ] || continue
		read -r vendor <"$dev/vendor"
		read -r device <"$dev/device"
		[ "$vendor" = 0x1af4 ] || continue
		for wanted in "$@"; do [ "$device" = "$wanted" ] && return 0; done
	done
	return 1
}

# Load a module set (/lib/modules/<set>.order, dependencies first); one already loaded fails harmlessly.
load_modules() {
	for mod in $(cat "/lib/modules/$1.order"); do
		insmod "/lib/modules/$mod.ko" 2>/dev/null
	done
}

# Block devices: load virtio-blk (shipped as modules) only when a virtio block device is present.
DISK=
pci_present 0x1001 0x1042 && load_modules disk
[ -b /dev/vda ] && DISK=/dev/vda

# Network: only when a virtio-net device is present (a guest without one does nothing more here), load
# virtio-net, bring every ethN up with a DHCP client in the background (nothing waits for a lease; the
# event script prints "dhcp bound ethN ADDRESS/PREFIX"), and start the TCP services on all addresses:
# echo on port 7, and on port 9000 a counter streaming "0", "1", ... one line every 10 ms.
NICS=
if pci_present 0x1000 0x1041; then
	load_modules net
	ip link set dev lo up
	for link in /sys/class/net/eth*; do
		[ -e "$link" ] || continue
		nic=${link##*/}
		NICS="$NICS $nic"
		ip link set dev "$nic" up
		udhcpc -f -i "$nic" -s /etc/udhcpc.script -O mtu -t 10 -T 1 -A 5 >/dev/null 2>&1 &
	done
	nc -ll -p 7 -e cat >/dev/null 2>&1 &
	# The counter waits on a FIFO nobody writes to (read -t) rather than forking a sleep per line: less
	# memory written per line, and a steadier 10 ms.
	mkfifo /run/counter.fifo
	nc -ll -p 9000 -e sh -c 'exec 3<>/run/counter.fifo; n=0; while echo $n; do n=$((n + 1)); read -t 0.01 _ <&3; done' \
		>/dev/null 2>&1 &
fi

DISK_MAGIC=novacron-testguest

disk_write() {
	printf '%s %s\n' "$DISK_MAGIC" "$1" | dd of=$DISK bs=512 count=1 conv=sync,fsync 2>/dev/null
}

disk_read() {
	line=$(dd if=$DISK bs=512 count=1 2>/dev/null | head -n 1 | tr -d '\000')
	case $line in "$DISK_MAGIC "*) echo "${line#"$DISK_MAGIC "}" ;; *) echo "-" ;; esac
}

# NICs: "ethN ADDRESS/PREFIX|- MAC MTU" for each, or "none".
net_state() {
	answer=
	for nic in $NICS; do
		read -r mac <"/sys/class/net/$nic/address"
		read -r mtu <"/sys/class/net/$nic/mtu"
		address=$(cat "/run/net/$nic.addr" 2>/dev/null)
		answer="$answer $nic ${address:--} $mac $mtu"
	done
	echo "${answer:- none}"
}

is_ipv4() {
	case $1 in *[!0-9.]* | *..* | .* | *.) return 1 ;; *.*.*.*) return 0 ;; *) return 1 ;; esac
}

# ok when a few pings to $1 (from source address $2, if given) get at least one reply, fail otherwise.
pings() {
	if ping -c 3 -i 0.2 -W 1 ${2:+-I "$2"} "$1" >/dev/null 2>&1; then echo ok; else echo fail; fi
}

# eth0's router from its lease, or nothing.
gateway() {
	router=$(cat /run/net/eth0.router 2>/dev/null)
	[ "$router" != - ] && echo "$router"
}

# Send from a forged IPv4 source: hold the address on eth0 for a moment and ping the gateway from it.
spoof_ip() {
	gw=$(gateway)
	[ -n "$gw" ] || { echo "error $tag no-lease"; return; }
	ip addr add "$1/32" dev eth0 2>/dev/null || { echo "error $tag bad-address"; return; }
	result=$(pings "$gw" "$1")
	ip addr del "$1/32" dev eth0
	echo "spoof-ip $tag $result"
}

# Send from a forged MAC: change eth0's MAC, ping the gateway (ARP first: the neighbours are flushed),
# then restore the MAC and make the gateway learn the real one again.
spoof_mac() {
	gw=$(gateway)
	[ -n "$gw" ] || { echo "error $tag no-lease"; return; }
	read -r own </sys/class/net/eth0/address
	ip link set dev eth0 address "$1" 2>/dev/null || { echo "error $tag bad-mac"; return; }
	ip neigh flush dev eth0
	result=$(pings "$gw")
	ip link set dev eth0 address "$own"
	ip neigh flush dev eth0
	ping -c 1 -W 1 "$gw" >/dev/null 2>&1
	echo "spoof-mac $tag $result"
}

# Pretend to be a DHCP server on eth0 (busybox udhcpd offering addresses of eth0's /24), to show that
# the node never lets it be heard.
dhcp_serve() {
	address=$(cat /run/net/eth0.addr 2>/dev/null)
	[ -n "$address" ] || { echo "error $tag no-lease"; return; }
	own=${address%/*}
	if ! { [ -e /run/udhcpd.pid ] && kill -0 "$(cat /run/udhcpd.pid)" 2>/dev/null; }; then
		cat >/run/udhcpd.conf <<-EOT
			interface eth0
			start ${own%.*}.200
			end ${own%.*}.250
			lease_file /run/udhcpd.leases
			pidfile /run/udhcpd.pid
			option subnet 255.255.255.0
			option router $own
			option dns $own
		EOT
		: >/run/udhcpd.leases
		udhcpd -f /run/udhcpd.conf >/dev/null 2>&1 &
	fi
	echo "dhcp-serve $tag started"
}

# Requests that need a NIC, with their arguments checked.
handle_net() {
	cmd=$1
	if [ -z "$NICS" ]; then
		echo "error $tag no-nic"
		return
	fi
	case $cmd in
	reach | tcp | spoof-ip)
		is_ipv4 "$3" || { echo "error $tag bad-address"; return; }
		;;
	esac
	case $cmd in
	reach) echo "reach $tag $(pings "$3")" ;;
	tcp)
		if ! is_number "$4" || [ -z "$5" ]; then
			echo "error $tag usage-tcp-IP-PORT-WORD"
			return
		fi
		reply=$(printf '%s\n' "$5" | timeout 5 nc -w 3 "$3" "$4" 2>/dev/null | head -n 1 | tr -d '\r')
		echo "tcp $tag ${reply:--}"
		;;
	spoof-ip) spoof_ip "$3" ;;
	spoof-mac)
		case $3 in [0-9a-f][0-9a-f]:*:*:*:*:*) spoof_mac "$3" ;; *) echo "error $tag bad-mac" ;; esac
		;;
	dhcp-serve) dhcp_serve ;;
	esac
}

handle() {
	cmd=$1
	tag=${2:--}
	case $cmd in
	'') ;;
	ping) echo "pong $tag" ;;
	checksum)
		if [ "$DIRTY_MB" -eq 0 ]; then
			echo "checksum $tag none"
		elif [ ! -e /run/dirty.ready ]; then
			echo "error $tag dirty-not-ready"
		else
			set -- $(md5sum $DIRTY_FILE)
			echo "checksum $tag $1"
		fi
		;;
	pause)
		if [ "$DIRTY_MB" -eq 0 ]; then
			echo "error $tag no-dirty-memory"
			return
		fi
		: >/run/dirty.pause
		waited=0
		while [ ! -e /run/dirty.paused ] && [ $waited -lt 600 ]; do
			sleep 0.05
			waited=$((waited + 1))
		done
		if [ -e /run/dirty.paused ]; then echo "paused $tag"; else echo "error $tag pause-timeout"; fi
		;;
	resume)
		rm -f /run/dirty.pause
		echo "resumed $tag"
		;;
	disk-write)
		if [ -z "$DISK" ]; then
			echo "error $tag no-disk"
		elif [ -z "$3" ]; then
			echo "error $tag missing-value"
		else
			disk_write "$3" && echo "disk-written $tag $3" || echo "error $tag disk-write-failed"
		fi
		;;
	disk-read)
		if [ -z "$DISK" ]; then echo "error $tag no-disk"; else echo "disk $tag $(disk_read)"; fi
		;;
	net) echo "net $tag$(net_state)" ;;
	reach | tcp | spoof-ip | spoof-mac | dhcp-serve) handle_net "$@" ;;
	*) echo "error $tag unknown-command $cmd" ;;
	esac
}

if [ "$DIRTY_MB" -gt 0 ]; then
	mkdir -p /dirty
	mount -t tmpfs -o size=$((DIRTY_MB + 1))m tmpfs /dirty
	dirtier >&3 &
fi

# Requests from the guest channel; answers go back on it.
serve_requests() {
	while :; do
		while read -r line; do
			# Unquoted on purpose: split the request into words (no globbing of request text).
			set -f
			set -- $line
			set +f
			handle "$@"
		done
		# End of input (hangup of the channel): keep serving.
		sleep 1
	done
}
serve_requests <&3 >&3 &

# The user's console: an interactive shell with ttyS0 as its controlling terminal (job control, ^C),
# started again whenever it exits. It runs in PID 1's foreground because a background command of this
# script starts with SIGINT ignored, which the shell and its commands would keep (no ^C). It does not
# inherit the channel, so nothing typed there can take the channel's requests.
while :; do
	PS1='testguest# ' setsid cttyhack sh </dev/console >/dev/console 2>&1 3>&-
	sleep 0.2
done
