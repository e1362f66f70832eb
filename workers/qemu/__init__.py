"""NovaCron's QEMU driver: create, start, stop, inspect and delete VMs on one node.

It runs `qemu-img` and a daemonized `qemu-system-x86_64` per VM and talks QMP through `qemu.qmp`.
It never imports Django: the node worker calls it and reports results through the control queue.
"""
