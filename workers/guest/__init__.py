"""The NovaCron test guest: a Debian kernel + busybox initramfs that shows, on its guest channel (a second
serial port), that it keeps running (``tick N`` every 100 ms) and keeps its memory (a checksum of RAM it
keeps rewriting), and answers requests there; its serial console is a user's, with a shell.

Build (from Debian packages only, nothing installed on the host; a second run reuses the output)::

    python -m workers.guest.build [--out var/images/testguest] [--cache var/cache/testguest-debs]

This writes ``vmlinux`` (uncompressed ELF kernel, PVH boot; ``vmlinuz`` only if PVH boot failed, see the
manifest's ``fallback``), ``initrd.img`` (gzip newc cpio) and ``manifest.json``::

    {"format": 2, "name": "testguest",
     "kernel": {"path": "vmlinux", "size": ..., "sha256": ..., "boot": "pvh" | "bzimage",
                "package": "linux-image-6.1.0-56-amd64", "version": "6.1.192-2", "release": "6.1.0-56-amd64"},
     "initrd": {"path": "initrd.img", "size": ..., "sha256": ..., "compression": "gzip",
                "busybox_package": "busybox-static", "busybox_version": ...,
                "modules": {"disk": [...], "net": [...]}},
     "cmdline": "console=ttyS0 quiet no_timer_check", "fallback": null | "why vmlinuz is used",
     "boot_check": {"accel": "tcg", "first_tick_seconds": 2.7, "checked_at": <unix time>} | null,
     "inputs": {package names and versions, sha256 of the builder sources}}

Paths in the manifest are relative to its directory.

Boot (TCG; KVM works the same way on hosts where it really boots Linux)::

    qemu-system-x86_64 -machine q35,accel=tcg -m 256 -nodefaults -no-user-config -display none \\
        -kernel vmlinux -initrd initrd.img \\
        -append "console=ttyS0 quiet no_timer_check dirty_mb=16 dirty_rate_mb=8" \\
        -chardev socket,id=console,path=console.sock,server=on,wait=off,logfile=console.log \\
        -serial chardev:console \\
        -chardev socket,id=guest,path=guest.sock,server=on,wait=off,logfile=guest.log \\
        -serial chardev:guest

The first serial port (``ttyS0``) is the console, the second (``ttyS1``) the guest channel; a node's VMs
have the same two (`workers.qemu.cmdline`: ``console.sock`` and ``guest.sock``). Optional: a
virtio-blk disk, e.g. ``-blockdev driver=file,filename=disk.qcow2,node-name=file0 -blockdev
driver=qcow2,file=file0,node-name=disk0 -device virtio-blk-pci,drive=disk0``, becomes ``/dev/vda`` (init
loads the virtio modules only when one is present). Optional: virtio-net NICs, e.g. ``-netdev
tap,id=net0,ifname=TAP,script=no,downscript=no -device virtio-net-pci,netdev=net0,mac=MAC,romfile=``, become
``eth0``, ``eth1``, ...: init then loads virtio-net, runs busybox ``udhcpc`` on each in the background
(the lease sets address, MTU (option 26) and, for eth0 only, the default route and ``/etc/resolv.conf``;
it prints ``dhcp bound ethN ADDRESS/PREFIX`` when it gets or changes its address, ``dhcp leasefail ethN``
after 10 unanswered discovers, then tries again 5 s later) and serves TCP on every address: echo on port
7, and on port 9000 a counter streaming ``0``, ``1``, ... one line every 10 ms (a client sees order and
gaps). A guest without a virtio-net device does none of this and boots as fast as before.

Kernel command line (besides ``console=ttyS0``): ``dirty_mb=M`` fills M MiB of a tmpfs (RAM) with random
data, then, with ``dirty_rate_mb=R``, keeps rewriting it round robin at about R MiB/s (under TCG the guest's
own speed caps the rate; ``dirty_rate_mb=0`` or absent: filled once, never rewritten).
``dirty_data=binaries`` fills and rewrites it with program text and data (busybox, the kernel modules, the
kernel's symbol table) instead of random bytes, like a real guest's RAM: its migration stream compresses
with lz4 and zstd, where random data does not compress at all. Values are
decimal without leading zeros (others are ignored). The guest needs at least 96 MiB of RAM (64 MiB does
not boot) plus M.

Serial console (``ttyS0``): the kernel's messages (few, with ``quiet``), a line saying where the test
protocol is, then a busybox shell with the prompt ``testguest# `` and ``ttyS0`` as its controlling
terminal (job control, ^C), started again whenever it exits. Its echo is on, as for any terminal. Nothing
of the protocol below appears on it.

Guest channel output (``ttyS1``): an empty line first, then ``tick 0``, ``tick 1``, ... every 100 ms
(paced from ``/proc/uptime``; after a pause or a migration the count goes on without a burst; a reset
restarts it at 0). The first tick comes a few seconds after QEMU starts under TCG (longer on a loaded
host, and longer with the compressed vmlinuz): wait for it rather than for a fixed time. Then
``dirty ready M R`` once the dirty memory is filled (``dirty error fill-failed`` if it does not fit).
The ``dhcp ...`` lines above come here too. Lines end in ``\\r\\n``.

Request protocol: write one line ``COMMAND TAG [VALUE]`` to the guest channel's input (``guest.sock``
above); TAG is a word chosen by the caller (``-`` if omitted) and is repeated in the one-line answer,
which may come between tick lines. Init turns the channel's echo off as it opens it; send requests only
after the first ``tick`` line, since input that arrives before is lost or echoed.

==========================  ======================================================================
request                     answer
==========================  ======================================================================
``ping TAG``                ``pong TAG``
``checksum TAG``            ``checksum TAG <md5 hex of the dirty memory>``; ``checksum TAG none``
                            without dirty_mb; ``error TAG dirty-not-ready`` before ``dirty ready``
``pause TAG``               ``paused TAG`` once no rewrite is in flight (the checksum stays fixed)
``resume TAG``              ``resumed TAG`` (rewriting restarts at the configured rate)
``disk-write TAG VALUE``    ``disk-written TAG VALUE``: ``novacron-testguest VALUE`` in sector 0 of
                            /dev/vda, fsynced
``disk-read TAG``           ``disk TAG VALUE`` (``-`` when sector 0 holds no marker)
``net TAG``                 ``net TAG eth0 ADDRESS/PREFIX MAC MTU [eth1 ...]`` (ADDRESS ``-`` before
                            a lease); ``net TAG none`` without NICs
``reach TAG IP``            ``reach TAG ok`` when any of 3 pings (200 ms apart) is answered, else
                            ``reach TAG fail``
``tcp TAG IP PORT WORD``    connects, sends ``WORD`` and a newline, answers ``tcp TAG LINE`` with the
                            first line that came back within 5 s (``-`` for none)
``spoof-ip TAG IP``         holds IP (an address of eth0's subnet that is not its own) on eth0 and
                            pings eth0's gateway from it: ``spoof-ip TAG ok`` if answered, ``fail`` if
                            not (what a node with anti-spoofing must give)
``spoof-mac TAG MAC``       the same with eth0's MAC changed to MAC (restored afterwards):
                            ``spoof-mac TAG ok|fail``
``dhcp-serve TAG``          starts busybox ``udhcpd`` on eth0 offering .200-.250 of its /24 with
                            itself as router: ``dhcp-serve TAG started``
==========================  ======================================================================

Failures answer ``error TAG <reason>`` (``no-dirty-memory``, ``no-disk``, ``no-nic``, ``no-lease``,
``bad-address``, ``bad-mac``, ``unknown-command CMD``, ...).
A checksum is slow under TCG: allow for it in timeouts. :mod:`workers.guest.boot` implements a client
(:class:`~workers.guest.boot.GuestVM`, :class:`~workers.guest.boot.GuestChannel`). PID 1 never exits;
the guest has no ACPI handling, so stop it with QMP ``quit`` or by killing QEMU.
"""
