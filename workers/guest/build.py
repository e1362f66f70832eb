"""Build the NovaCron test guest (kernel + busybox initramfs) from Debian packages.

``python -m workers.guest.build [--out DIR] [--cache DIR] [--no-boot-check]``

Nothing is installed on the host: the packages are fetched with ``apt-get download`` into a cache and read
with ``dpkg-deb --fsys-tarfile`` (only the files needed are taken; those of the kernel package are kept
in the cache too). The kernel is the real package behind the ``linux-image-amd64`` metapackage; its
``vmlinuz`` is decompressed to an ELF ``vmlinux`` for PVH boot (it boots faster under TCG).
The initramfs holds the static busybox, the init script ``init.sh``, the DHCP client's event script
``udhcpc.sh`` and the virtio-blk and virtio-net modules (each set with its load order). A boot check
runs the result under TCG; if the uncompressed kernel does not reach the first tick, the compressed
``vmlinuz`` is used instead and the manifest says why. A second run with the same inputs reuses the output.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from workers.guest import cpio
from workers.guest.boot import QEMU, GuestError, GuestImage, GuestVM
from workers.guest.kernel import KernelError, extract_vmlinux, has_pvh_entry, load_order

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parents[1]
DEFAULT_OUT = REPO_ROOT / "var" / "images" / "testguest"
DEFAULT_CACHE = REPO_ROOT / "var" / "cache" / "testguest-debs"
KERNEL_METAPACKAGE = "linux-image-amd64"
KERNEL_SERIES = "6.1."
BUSYBOX_PACKAGE = "busybox-static"
# no_timer_check: on a loaded host a TCG guest can fail the kernel's IO-APIC timer check at boot
# and panic ("IO-APIC + timer doesn't work!"); virtual machines commonly skip that check.
CMDLINE = "console=ttyS0 quiet no_timer_check"
# Modules init loads when a virtio block / network device is present (their dependencies are added;
# AF_PACKET, which udhcpc needs, is built into Debian's kernel).
MODULE_SETS = {"disk": ("virtio_pci", "virtio_blk"), "net": ("virtio_pci", "virtio_net")}
# Where those modules and their dependencies live in the kernel package (files directly in these dirs).
MODULE_DIRS = ("kernel/drivers/virtio/", "kernel/drivers/block/", "kernel/drivers/net/", "kernel/net/core/")
# Builder sources and guest files whose bytes decide the output (a change to any forces a rebuild).
SOURCES = ("build.py", "cpio.py", "kernel.py", "init.sh", "udhcpc.sh")
BOOT_CHECK_TIMEOUT = 90.0
MANIFEST_FORMAT = 2  # 2: initrd.modules is a load order per module set

Log = Callable[[str], None]


class BuildError(RuntimeError):
    """The guest could not be built; the message says what to fix."""


@dataclass(frozen=True)
class Package:
    """A Debian package at the version apt would install."""

    name: str
    version: str


def _run(command: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _candidates(*names: str) -> dict[str, str]:
    """Candidate versions (what ``apt-get install`` would pick) of the packages apt knows."""
    found: dict[str, str] = {}
    for block in re.split(r"^(?=\S)", _run(["apt-cache", "policy", *names]), flags=re.MULTILINE):
        match = re.match(r"(\S+):\n\s+Installed:.*\n\s+Candidate:\s*(\S+)", block)
        if match and match.group(2) != "(none)":
            found[match.group(1)] = match.group(2)
    return found


def _kernel_dependency() -> str | None:
    result = subprocess.run(
        ["apt-cache", "depends", KERNEL_METAPACKAGE], capture_output=True, text=True, check=False
    )
    names = re.findall(r"^\s*Depends:\s*(linux-image-\d\S*)", result.stdout, re.MULTILINE)
    return names[0] if result.returncode == 0 and names else None


def resolve_packages(log: Log) -> tuple[Package, Package]:
    """The real kernel package behind the metapackage and busybox-static, with candidate versions.

    Runs ``apt-get update`` once when the package lists do not know the metapackage.
    """
    kernel = _kernel_dependency()
    if kernel is None:
        log(f"apt package lists do not resolve {KERNEL_METAPACKAGE}: running apt-get update")
        _run(["apt-get", "update"])
        kernel = _kernel_dependency()
    if kernel is None:
        raise BuildError(f"{KERNEL_METAPACKAGE} depends on no linux-image-<version> package")
    versions = _candidates(kernel, BUSYBOX_PACKAGE)
    if kernel not in versions or BUSYBOX_PACKAGE not in versions:
        raise BuildError(f"apt has no installable version of {kernel} or {BUSYBOX_PACKAGE}: {versions}")
    if not versions[kernel].startswith(KERNEL_SERIES):
        raise BuildError(f"{kernel} is {versions[kernel]}, expected a {KERNEL_SERIES}x kernel")
    return Package(kernel, versions[kernel]), Package(BUSYBOX_PACKAGE, versions[BUSYBOX_PACKAGE])


def _deb_field(deb: Path, name: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), name]).strip()


def download(package: Package, cache: Path, log: Log) -> Path:
    """The package's .deb in ``cache``, fetched with ``apt-get download`` unless already there."""
    cache.mkdir(parents=True, exist_ok=True)
    for deb in sorted(cache.glob(f"{package.name}_*.deb")):
        if _deb_field(deb, "Package") == package.name and _deb_field(deb, "Version") == package.version:
            return deb
    log(f"downloading {package.name} {package.version}")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        _run(["apt-get", "download", f"{package.name}={package.version}"], cwd=Path(tmp))
        (fetched,) = Path(tmp).glob("*.deb")
        return fetched.replace(cache / fetched.name)


def deb_members(deb: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Regular files of the package's data archive (paths without ``./``) for which ``wanted`` is true."""
    found: dict[str, bytes] = {}
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as archive:
            for member in archive:
                path = member.name.removeprefix("./")
                if member.isfile() and wanted(path):
                    extracted = archive.extractfile(member)
                    assert extracted is not None
                    found[path] = extracted.read()
    if proc.returncode != 0:
        raise BuildError(f"dpkg-deb --fsys-tarfile {deb} failed ({proc.returncode})")
    return found


def kernel_files(deb: Path, release: str, log: Log) -> tuple[bytes, dict[str, bytes]]:
    """The ``vmlinuz`` and the modules in `MODULE_DIRS` (by module name) of a kernel package.

    Reading them means decompressing the whole 70 MB data archive, so they are kept next to the .deb
    (``<deb>.files-<digest of MODULE_DIRS>/``) for the next build with the same package and dirs.
    """
    dirs_digest = hashlib.sha256("\0".join(MODULE_DIRS).encode()).hexdigest()[:12]
    unpacked = deb.with_name(f"{deb.name}.files-{dirs_digest}")
    if not unpacked.is_dir():
        log(f"extracting {deb.name}")
        module_root = f"lib/modules/{release}/"
        files = deb_members(
            deb,
            lambda path: (
                path == f"boot/vmlinuz-{release}"
                or (
                    path.startswith(module_root)
                    and path.endswith(".ko")
                    and path.removeprefix(module_root).rpartition("/")[0] + "/" in MODULE_DIRS
                )
            ),
        )
        vmlinuz = files.pop(f"boot/vmlinuz-{release}", None)
        if vmlinuz is None:
            raise BuildError(f"{deb.name} has no boot/vmlinuz-{release}")
        with tempfile.TemporaryDirectory(dir=deb.parent) as tmp:
            staging = Path(tmp) / "files"
            (staging / "modules").mkdir(parents=True)
            (staging / "vmlinuz").write_bytes(vmlinuz)
            for path, data in files.items():
                (staging / "modules" / Path(path).name).write_bytes(data)
            try:
                staging.rename(unpacked)
            except OSError:
                # Another build (other output directory) unpacked the same package meanwhile.
                if not unpacked.is_dir():
                    raise
    modules = {ko.stem: ko.read_bytes() for ko in (unpacked / "modules").glob("*.ko")}
    return (unpacked / "vmlinuz").read_bytes(), modules


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def builder_fingerprint() -> str:
    """Hash of the builder's own sources and the init script: a change to either forces a rebuild."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + (PACKAGE_DIR / name).read_bytes())
    return digest.hexdigest()


def module_orders(modules: dict[str, bytes]) -> dict[str, list[str]]:
    """Per set of `MODULE_SETS`, the modules to load with their dependencies, each after its own."""
    return {name: load_order(wanted, modules) for name, wanted in MODULE_SETS.items()}


def initramfs(busybox: bytes, modules: dict[str, bytes], orders: dict[str, list[str]]) -> bytes:
    """The gzip-compressed newc initramfs: busybox, ``/init``, the DHCP client's script, device nodes,
    and the modules with one ``lib/modules/<set>.order`` file per set."""
    entries = [cpio.directory(path) for path in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "lib", "etc")]
    entries += [cpio.directory(path) for path in ("lib/modules", "dev", "proc", "sys", "tmp", "run")]
    entries += [
        cpio.char_device("dev/console", 5, 1),
        cpio.char_device("dev/null", 1, 3, perm=0o666),
        cpio.regular("bin/busybox", busybox, perm=0o755),
        cpio.symlink("bin/sh", "busybox"),
        cpio.regular("init", (PACKAGE_DIR / "init.sh").read_bytes(), perm=0o755),
        cpio.regular("etc/udhcpc.script", (PACKAGE_DIR / "udhcpc.sh").read_bytes(), perm=0o755),
    ]
    entries += [
        cpio.regular(f"lib/modules/{name}.order", ("\n".join(order) + "\n").encode())
        for name, order in orders.items()
    ]
    shipped = sorted({module for order in orders.values() for module in order})
    entries += [cpio.regular(f"lib/modules/{name}.ko", modules[name]) for name in shipped]
    return gzip.compress(cpio.archive(entries), compresslevel=6, mtime=0)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _file_record(out: Path, name: str) -> dict[str, object]:
    path = out / name
    return {"path": name, "size": path.stat().st_size, "sha256": _file_sha256(path)}


def _up_to_date(out: Path, inputs: dict[str, str], boot_check: bool) -> bool:
    """Whether ``out`` holds an intact build of the same inputs (boot-checked, if that is asked for)."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("inputs") != inputs:
        return False
    if boot_check and manifest.get("boot_check") is None:
        return False
    for key in ("kernel", "initrd"):
        record = manifest[key]
        path = out / record["path"]
        if (
            not path.is_file()
            or path.stat().st_size != record["size"]
            or _file_sha256(path) != record["sha256"]
        ):
            return False
    return True


def check_boot(out: Path, kernel_name: str, log: Log) -> float:
    """Boot the built guest under TCG, check that its guest channel answers requests, and return the
    seconds from starting QEMU to its first tick."""
    image = GuestImage(out / kernel_name, out / "initrd.img", CMDLINE)
    with (
        tempfile.TemporaryDirectory(prefix="testguest-boot-") as run_dir,
        GuestVM(image, Path(run_dir)) as vm,
    ):
        channel = vm.start()
        seconds = vm.wait_first_tick(BOOT_CHECK_TIMEOUT)
        if channel.request("ping") != [] or channel.checksum() != "none":
            raise GuestError(f"unexpected answers on the guest channel: {channel.lines[-3:]}")
    log(f"boot check: {kernel_name} reached its first tick in {seconds:.2f} s under TCG")
    return seconds


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build(
    out: Path = DEFAULT_OUT, cache: Path = DEFAULT_CACHE, boot_check: bool = True, log: Log = print
) -> Path:
    """Build (or reuse) the test guest in ``out`` and return the path of its ``manifest.json``."""
    if boot_check and shutil.which(QEMU) is None:
        raise BuildError(f"{QEMU} not found (Debian package qemu-system-x86); or pass --no-boot-check")
    kernel_pkg, busybox_pkg = resolve_packages(log)
    inputs = {
        "kernel_package": kernel_pkg.name,
        "kernel_version": kernel_pkg.version,
        "busybox_package": busybox_pkg.name,
        "busybox_version": busybox_pkg.version,
        "builder_sha256": builder_fingerprint(),
    }
    with _locked(out):
        if _up_to_date(out, inputs, boot_check):
            log(f"test guest in {out} is up to date")
            return out / "manifest.json"
        kernel_deb = download(kernel_pkg, cache, log)
        busybox_deb = download(busybox_pkg, cache, log)

        release = kernel_pkg.name.removeprefix("linux-image-")
        vmlinuz, modules = kernel_files(kernel_deb, release, log)
        orders = module_orders(modules)
        busybox = deb_members(busybox_deb, lambda path: path == "bin/busybox").get("bin/busybox")
        if busybox is None:
            raise BuildError(f"{busybox_deb.name} has no bin/busybox")

        fallback: str | None = None
        try:
            vmlinux = extract_vmlinux(vmlinuz)
            if not has_pvh_entry(vmlinux):
                raise KernelError("the uncompressed kernel has no PVH entry note")
        except KernelError as error:
            fallback = f"uncompressed vmlinux unusable ({error}); using the compressed vmlinuz"
            log(fallback)

        # Files are replaced by rename, never removed first: QEMUs started from an older build keep working.
        _write(out / "initrd.img", initramfs(busybox, modules, orders))
        kernel_name = "vmlinuz" if fallback else "vmlinux"
        _write(out / kernel_name, vmlinuz if fallback else vmlinux)

        boot_result: dict[str, object] | None = None
        if boot_check:
            try:
                seconds = check_boot(out, kernel_name, log)
            except GuestError as error:
                if kernel_name == "vmlinuz":
                    raise BuildError(f"the test guest does not boot: {error}") from None
                fallback = (
                    f"PVH boot of the uncompressed vmlinux failed ({error}); using the compressed vmlinuz"
                )
                log(fallback)
                kernel_name = "vmlinuz"
                _write(out / kernel_name, vmlinuz)
                seconds = check_boot(out, kernel_name, log)
            boot_result = {"accel": "tcg", "first_tick_seconds": round(seconds, 2), "checked_at": time.time()}

        manifest = {
            "format": MANIFEST_FORMAT,
            "name": "testguest",
            "kernel": {
                **_file_record(out, kernel_name),
                "boot": "bzimage" if fallback else "pvh",
                "package": kernel_pkg.name,
                "version": kernel_pkg.version,
                "release": release,
            },
            "initrd": {
                **_file_record(out, "initrd.img"),
                "compression": "gzip",
                "busybox_package": busybox_pkg.name,
                "busybox_version": busybox_pkg.version,
                "modules": orders,
            },
            "cmdline": CMDLINE,
            "fallback": fallback,
            "boot_check": boot_result,
            "inputs": inputs,
        }
        _write(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
        # The kernel of the other kind, left by an earlier build, is not described by the manifest.
        (out / ("vmlinux" if kernel_name == "vmlinuz" else "vmlinuz")).unlink(missing_ok=True)
        log(f"test guest written to {out}")
        return out / "manifest.json"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)"
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=".deb cache (default: %(default)s)")
    parser.add_argument(
        "--no-boot-check", dest="boot_check", action="store_false", help="do not boot the result under TCG"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        manifest = build(args.out.resolve(), args.cache.resolve(), args.boot_check)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{manifest} ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
