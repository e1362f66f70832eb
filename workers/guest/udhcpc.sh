#!/bin/sh
# NovaCron test guest: busybox udhcpc's event script (/etc/udhcpc.script), called as "$0 EVENT" with the
# lease in the environment: interface, ip, mask (prefix length), router, dns, mtu (option 26, requested
# with -O mtu). It configures the interface from the lease, records it in /run/net/<interface>.* for
# init's requests, and prints "dhcp bound <interface> <ip>/<mask>" on the guest channel (ttyS1) when the
# address changes (udhcpc's own output goes nowhere).
# Only eth0 gets the default route and /etc/resolv.conf, so a second NIC never takes them over.

state=/run/net/$interface
mkdir -p /run/net

case $1 in
deconfig)
	ip -4 addr flush dev "$interface"
	ip link set dev "$interface" up
	rm -f "$state".addr "$state".router
	;;
bound | renew)
	[ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
	address=$ip/${mask:-32}
	previous=$(cat "$state".addr 2>/dev/null)
	if [ "$previous" != "$address" ]; then
		ip -4 addr flush dev "$interface"
		ip addr add "$address" dev "$interface"
		echo "$address" >"$state".addr
		echo "dhcp bound $interface $address" >/dev/ttyS1
	fi
	gateway=${router%% *}
	echo "${gateway:--}" >"$state".router
	if [ "$interface" = eth0 ]; then
		[ -n "$gateway" ] && ip route replace default via "$gateway" dev "$interface"
		: >/etc/resolv.conf
		for server in $dns; do echo "nameserver $server" >>/etc/resolv.conf; done
	fi
	;;
leasefail | nak)
	echo "dhcp $1 $interface" >/dev/ttyS1
	;;
esac
exit 0
