"""Build NovaCron's Debian 12 cloud image from Debian's packages: ``make image-debian``.

``python -m workers.guest.debian [--out DIR] [--mirror URL]`` (as root) writes ``DIR/debian-12.qcow2``
(default ``var/images/debian-12``) and ``DIR/manifest.json`` (the recipe's digest, size, build time).

Recipe: ``mmdebstrap`` (variant ``apt``, no Recommends) installs bookworm with the kernel, systemd,
cloud-init, OpenSSH, the QEMU guest agent, sudo and ifupdown + the ISC DHCP client (cloud-init's ENI
renderer, as in Debian's own cloud images) straight into the ext4 root of a partitioned raw disk
(one MBR partition behind a loop device); ``extlinux`` and syslinux's MBR make it boot under SeaBIOS
with ``console=ttyS0``. cloud-init reads NoCloud only (no waiting for EC2 metadata) and makes the
default user ``debian`` (passwordless sudo, locked password) from Debian's ``cloud.cfg``; sshd takes
keys only; the image carries no SSH host keys or machine-id (each VM makes its own on first boot);
timers that only slow a TCG guest down are masked. Free blocks are trimmed (holes in the raw file), and
the raw disk becomes a compressed qcow2.

Invariants: the output appears only complete (written under a temporary name, then renamed); a build
whose recipe digest (settings, file texts, the code of the steps, the mirror) matches the manifest is
skipped; loop devices and mounts are released on every failure.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "var" / "images" / "debian-12"
IMAGE_NAME = "debian-12.qcow2"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
PACKAGES = (
    "linux-image-amd64",
    "initramfs-tools",
    "systemd-sysv",
    "udev",
    "cloud-init",
    "openssh-server",
    "qemu-guest-agent",
    "sudo",
    "ifupdown",
    "isc-dhcp-client",
    "netbase",
    "e2fsprogs",
    "procps",
    "iproute2",
)
DISK_SIZE = 3 * 1024**3  # the image's virtual size; the qcow2 holds only what is written
PARTITION_START = 1024**2  # one MBR partition from 1 MiB to the end
PARTITION_SIZE = DISK_SIZE - PARTITION_START
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
# no_timer_check: a TCG guest on a loaded host can fail the IO-APIC timer check and panic.
# net.ifnames=0: NIC i is eth<i>, as the seed's network-config names it.
KERNEL_ARGS = "ro console=ttyS0 net.ifnames=0 no_timer_check"
# Timers and services that only cost a TCG guest time; the unit names exist in bookworm.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-networkd-wait-online.service",
)
CLOUD_CFG = """\
# NovaCron: the node's NoCloud seed drive (label cidata) is the only datasource.
datasource_list: [NoCloud, None]
# What cost a TCG guest's first boot most (cloud-init analyze blame): RSA host key generation, and
# modules with nothing to do here: GRUB's debconf (extlinux boots this image) and locale generation
# (the guest keeps the C locale).
ssh_genkeytypes: [ed25519, ecdsa]
grub_dpkg:
  enabled: false
locale: false
"""
SSHD_CONFIG = """\
# NovaCron image: keys only.
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
"""
FSTAB = "UUID={uuid} / ext4 errors=remount-ro 0 1\n"
EXTLINUX_CONF = """\
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
  LINUX /boot/{kernel}
  INITRD /boot/{initrd}
  APPEND root=UUID={uuid} {args}
"""


class BuildError(RuntimeError):
    """The image could not be built; the message says which step failed and why."""


def _run(command: list[str], *, timeout: float = 1800) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"{' '.join(command)} took more than {timeout:g} s") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-20:])
        raise BuildError(f"{' '.join(command)} failed ({result.returncode}):\n{tail}")
    return result.stdout


def recipe_digest(mirror: str) -> str:
    """What decides the image's contents: the recipe's settings, the code of its steps and the mirror."""
    settings = [SUITE, PACKAGES, DISK_SIZE, PARTITION_START, KERNEL_ARGS, MASKED_UNITS]
    texts = [CLOUD_CFG, SSHD_CONFIG, FSTAB, EXTLINUX_CONF, mirror]
    steps = [inspect.getsource(step) for step in (_partition, _install_system, _configure, _assemble)]
    return hashlib.sha256(json.dumps([settings, texts, steps]).encode()).hexdigest()


def _manifest(out: Path) -> dict[str, object] | None:
    try:
        data = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def up_to_date(out: Path, mirror: str = DEFAULT_MIRROR) -> bool:
    """Whether ``out`` holds an image built by this recipe."""
    manifest = _manifest(out)
    return (
        manifest is not None
        and manifest.get("recipe") == recipe_digest(mirror)
        and (out / IMAGE_NAME).is_file()
    )


@contextlib.contextmanager
def _loop_device(raw: Path) -> Iterator[str]:
    # The partition alone, by offset: no partition scan, which needs udev to make the device nodes.
    device = _run(
        [
            "losetup",
            "--find",
            "--show",
            f"--offset={PARTITION_START}",
            f"--sizelimit={PARTITION_SIZE}",
            str(raw),
        ]
    ).strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


@contextlib.contextmanager
def _mounted(device: str, mountpoint: Path) -> Iterator[Path]:
    _run(["mount", device, str(mountpoint)])
    try:
        yield mountpoint
    finally:
        # Processes left by package scripts inside the chroot would keep it busy; lazy as the last resort.
        if subprocess.run(["umount", str(mountpoint)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mountpoint)], check=False)


def _partition(raw: Path) -> None:
    with open(raw, "wb") as disk:
        disk.truncate(DISK_SIZE)
    layout = f"label: dos\nstart={PARTITION_START // 512}, size={PARTITION_SIZE // 512}, type=83, bootable\n"
    result = subprocess.run(
        ["sfdisk", "--quiet", str(raw)], input=layout, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise BuildError(f"sfdisk failed: {result.stderr.strip()}")


def _install_system(root: Path, mirror: str) -> None:
    # mmdebstrap wants an empty directory: mkfs's lost+found goes and comes back afterwards.
    (root / "lost+found").rmdir()
    _run(
        [
            "mmdebstrap",
            "--variant=apt",
            "--components=main",
            "--aptopt=APT::Install-Recommends false",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(root),
            mirror,
        ]
    )


def _configure(root: Path, uuid: str) -> None:
    """Write the image's configuration (filesystem ``uuid``) and the boot loader's."""
    boot = root / "boot"
    kernels = sorted(p.name for p in boot.glob("vmlinuz-*"))
    initrds = sorted(p.name for p in boot.glob("initrd.img-*"))
    if len(kernels) != 1 or len(initrds) != 1:
        raise BuildError(f"expected one kernel and one initrd in /boot, found {kernels} and {initrds}")
    (root / "etc/fstab").write_text(FSTAB.format(uuid=uuid))
    (root / "etc/hostname").write_text("debian\n")
    (root / "etc/cloud/cloud.cfg.d/90-novacron.cfg").write_text(CLOUD_CFG)
    (root / "etc/ssh/sshd_config.d/90-novacron.conf").write_text(SSHD_CONFIG)
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # cloud-init generates each VM's own host keys on first boot
    (root / "etc/machine-id").write_text("")  # systemd makes one on first boot
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for unit in MASKED_UNITS:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    for cache in ("var/lib/apt/lists", "var/cache/apt"):
        for entry in (root / cache).rglob("*"):
            if entry.is_file() and entry.name != "lock":
                entry.unlink()
    extlinux = boot / "extlinux"
    extlinux.mkdir(exist_ok=True)
    (extlinux / "extlinux.conf").write_text(
        EXTLINUX_CONF.format(kernel=kernels[0], initrd=initrds[0], uuid=uuid, args=KERNEL_ARGS)
    )


def build(out: Path = DEFAULT_OUT, mirror: str = DEFAULT_MIRROR, *, force: bool = False) -> Path:
    """Build the image into ``out`` unless it is up to date; return the qcow2's path."""
    image = out / IMAGE_NAME
    if not force and up_to_date(out, mirror):
        return image
    if os.geteuid() != 0:
        raise BuildError("building the Debian image needs root (loop devices, mounts, mmdebstrap's chroot)")
    for tool in ("mmdebstrap", "extlinux", "sfdisk", "losetup", "mkfs.ext4", "fstrim", "qemu-img"):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} is missing; run scripts/system-deps.sh test as root")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the second finds the first's result
        if not force and up_to_date(out, mirror):
            return image
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=".build-", dir=out) as work_dir:
            _assemble(Path(work_dir), mirror).replace(image)
        seconds = round(time.monotonic() - started, 1)
        manifest = {
            "recipe": recipe_digest(mirror),
            "suite": SUITE,
            "packages": list(PACKAGES),
            "size_bytes": image.stat().st_size,
            "virtual_size_bytes": DISK_SIZE,
            "build_seconds": seconds,
        }
        temporary = out / ".manifest.json.tmp"
        temporary.write_text(json.dumps(manifest, indent=2) + "\n")
        temporary.replace(out / "manifest.json")
    return image


def _assemble(work: Path, mirror: str) -> Path:
    """Make the image in ``work``: the raw disk, its system and boot loader, then the compressed qcow2."""
    raw = work / "disk.raw"
    _partition(raw)
    with _loop_device(raw) as partition:
        _run(["mkfs.ext4", "-q", "-L", "root", "-O", "^metadata_csum_seed,^orphan_file", partition])
        uuid = _run(["blkid", "-s", "UUID", "-o", "value", partition]).strip()
        mountpoint = work / "root"
        mountpoint.mkdir()
        with _mounted(partition, mountpoint) as root:
            _install_system(root, mirror)
            with contextlib.chdir(root):
                _run(["mklost+found"], timeout=60)
            _configure(root, uuid)
            _run(["extlinux", "--install", str(root / "boot" / "extlinux")])
            # Free blocks (packages unpacked, then deleted) become holes, which qemu-img skips.
            _run(["fstrim", str(root)])
    with open(raw, "r+b") as disk:
        disk.write(SYSLINUX_MBR.read_bytes()[:440])  # boot code only: the partition table stays
    partial = work / IMAGE_NAME
    _run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(partial)])
    return partial


def register(image: Path) -> str:
    """Import the image into the store as ``debian-12`` (``manage.py image_import``, after the
    database's migrations): unchanged when the same bytes are there already."""
    manage = [sys.executable, str(REPO_ROOT / "manage.py")]
    _run([*manage, "migrate", "--noinput", "-v", "0"])
    answer = _run(
        [
            *manage,
            "image_import",
            "debian-12",
            str(image),
            "--format",
            "qcow2",
            "--visibility",
            "shared",
            "--os-type",
            "linux",
            "--os-version",
            "12",
            "--min-memory-mb",
            "256",
        ]
    )
    return answer.strip() or "imported into the image store as debian-12"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)"
    )
    parser.add_argument("--mirror", default=DEFAULT_MIRROR, help="Debian mirror (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the image is up to date")
    parser.add_argument("--no-register", action="store_true", help="do not run manage.py image_import")
    args = parser.parse_args(argv)
    skipped = not args.force and up_to_date(args.out, args.mirror)
    try:
        image = build(args.out, args.mirror, force=args.force)
    except BuildError as exc:
        print(f"image-debian: {exc}", file=sys.stderr)
        return 1
    manifest = _manifest(args.out) or {}
    size_mib = image.stat().st_size / 1024**2
    what = "up to date" if skipped else f"built in {manifest.get('build_seconds')} s"
    print(f"{image}: {size_mib:.1f} MiB, {what}")
    if not args.no_register:
        try:
            print(register(image))
        except BuildError as exc:
            print(f"image-debian: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
