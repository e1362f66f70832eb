"""A node's share of the VM networks: bridges, VXLAN devices, taps, filtering and DHCP (see
``workers.contract``'s networks section). Everything this node creates carries its device tag
(:func:`workers.net.names.node_tag`), so several node workers can share one network namespace (as
``make run``'s local nodes do) and each removes only its own devices."""
