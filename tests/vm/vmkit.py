"""A Debian release booted on its own kernel in qemu, built from the Debian archive alone.

Owns the cached base image of each release (``/var/cache/vicifast-agent-test/vm-<release>-<hash>``:
debootstrap + ``linux-image-amd64`` + what the package depends on, made once per package list and
never modified afterwards) and each run: a copy-on-write overlay of that image, a small data disk
with the run's files, and one qemu process that boots the release's own kernel, runs
``guest.py`` from the data disk under systemd and powers off. It never downloads an image,
never touches the host's network (the VM has no network device at all) and never mounts anything
on the host.

These machines are virtual themselves: their ``/dev/kvm`` opens but cannot run a stock kernel
(6.1 stalls; 6.12 stops on "KVM internal error ... emulation failure"; ``-accel kvm:tcg`` does not
fall back because KVM opens fine). So qemu's TCG emulation is used unless a hardware KVM module
(``kvm_intel`` / ``kvm_amd``) is loaded: about 20-35 s to boot through systemd.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE = Path("/var/cache/vicifast-agent-test")
MIRROR = "http://deb.debian.org/debian"
# Debian release codename -> its number, as the README and the package names say it.
RELEASES: Mapping[str, str] = {"bookworm": "12", "trixie": "13"}
# The release's own kernel, what the .deb depends on (so dpkg -i needs no network) and the tools
# the checks use inside.
PACKAGES = (
    "adduser",
    "conntrack",
    "dbus",
    "iproute2",
    "kmod",
    "linux-image-amd64",
    "nftables",
    "procps",
    "python3",
    "python3-nftables",
    "python3-systemd",
    "systemd",
    "systemd-sysv",
    "udev",
)
IMAGE_SIZE = "3G"  # sparse: the root takes about 700 MB of it
GUEST_TIMEOUT_S = 900  # TCG on a loaded 2-core machine; a healthy run takes 1-3 minutes
# The one unit the image adds: mount the data disk, run the checks, power off whatever happens.
GUEST_UNIT = """\
[Unit]
Description=vicifast-agent kernel checks (data disk /dev/vdb)
After=multi-user.target
ConditionPathExists=/dev/vdb

[Service]
Type=oneshot
# The checks end in an immediate power-off (sysrq o): an orderly shutdown of a TCG guest only
# costs time, and nothing in it outlives the run.
ExecStart=/bin/sh -c 'mkdir -p /vftest && mount -o ro /dev/vdb /vftest && \
/usr/bin/python3 /vftest/guest.py /vftest /dev/ttyS1; sync; echo o > /proc/sysrq-trigger'
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=850
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Install]
WantedBy=multi-user.target
"""


class VmError(RuntimeError):
    """The VM could not be built or did not run to its end."""


@dataclass(frozen=True, slots=True)
class BaseImage:
    """One release's kernel, initrd and root filesystem image (raw ext4), read-only."""

    release: str
    kernel: Path
    initrd: Path
    disk: Path


def missing_tools() -> str | None:
    """Why a VM cannot be built or booted here, or None."""
    if os.geteuid() != 0:
        return "the VM test needs root (debootstrap)"
    for tool in ("debootstrap", "qemu-system-x86_64", "qemu-img", "mkfs.ext4"):
        if shutil.which(tool) is None:
            return f"the VM test needs {tool!r} (make test-vm installs it)"
    return None


def accelerator() -> str:
    """``kvm`` only where a hardware KVM module is loaded; TCG otherwise (see the module doc)."""
    hardware = any(Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd"))
    return "kvm" if hardware and os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg,thread=multi"


def base_image(release: str) -> BaseImage:
    """The cached image of ``release``; built from the archive on first use (1.5-3 minutes)."""
    if release not in RELEASES:
        raise VmError(f"unknown release {release!r}: one of {sorted(RELEASES)}")
    key = hashlib.sha256(
        "\n".join(["v1", release, MIRROR, IMAGE_SIZE, GUEST_UNIT, *sorted(PACKAGES)]).encode()
    ).hexdigest()[:12]
    home = CACHE / f"vm-{release}-{key}"
    image = BaseImage(release, home / "vmlinuz", home / "initrd.img", home / "root.img")
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f".vm-{release}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once build it once
        if (home / "complete").exists():
            return image
        partial = CACHE / f".partial-vm-{release}-{key}"
        shutil.rmtree(partial, ignore_errors=True)
        root = partial / "root"
        root.mkdir(parents=True)
        _run(
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            release,
            str(root),
            MIRROR,
        )
        _prepare_root(root, release)
        boot = root / "boot"
        (vmlinuz,) = sorted(boot.glob("vmlinuz-*"))
        (initrd,) = sorted(boot.glob("initrd.img-*"))
        shutil.copyfile(vmlinuz, partial / "vmlinuz")
        shutil.copyfile(initrd, partial / "initrd.img")
        disk = str(partial / "root.img")
        _run("mkfs.ext4", "-q", "-L", "vfroot", "-d", str(root), disk, IMAGE_SIZE)
        shutil.rmtree(root)
        (partial / "complete").write_text(release + "\n")
        shutil.rmtree(home, ignore_errors=True)
        partial.rename(home)
    return image


def _prepare_root(root: Path, release: str) -> None:
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    (root / "etc/hostname").write_text(f"vf-{release}\n")
    units = root / "etc/systemd/system"
    (units / "vf-checks.service").write_text(GUEST_UNIT)
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "vf-checks.service").symlink_to("../vf-checks.service")
    # Nothing in the image may wake up and compete with the checks (apt's timers reach out).
    for unit in ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer"):
        (units / unit).unlink(missing_ok=True)
        (units / unit).symlink_to("/dev/null")
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True)


def _run(*argv: str) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise VmError(f"{argv[0]} exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}")


@dataclass(frozen=True, slots=True)
class GuestRun:
    """What one boot reported: each check's JSON line by name, and the console for diagnosis."""

    checks: Mapping[str, Mapping[str, Any]]
    console: str
    seconds: float

    def console_tail(self, lines: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-lines:])


def boot(image: BaseImage, files: Mapping[str, Path | bytes], scratch: Path) -> GuestRun:
    """Boot ``image`` with ``files`` (name -> source path or content) on its data disk.

    Returns when the guest powered off (the checks ran, or crashed: see ``checks``), raises
    ``VmError`` when qemu fails or the guest does not power off within ``GUEST_TIMEOUT_S``.
    """
    data = scratch / "data"
    data.mkdir()
    for name, source in files.items():
        target = data / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copyfile(source, target)
    overlay, data_img = scratch / "root.qcow2", scratch / "data.img"
    base = str(image.disk)
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, str(overlay))
    _run("mkfs.ext4", "-q", "-L", "vfdata", "-d", str(data), str(data_img), "256M")
    console, results = scratch / "console.log", scratch / "results.jsonl"
    argv = _qemu_argv(image, overlay, data_img, console, results)
    started = time.monotonic()
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=GUEST_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise VmError(
            f"the {image.release} VM did not power off within {GUEST_TIMEOUT_S} s; console:\n"
            + _tail(console)
        ) from exc
    if done.returncode != 0:
        raise VmError(f"qemu exited {done.returncode}: {done.stderr[-1000:]}\n{_tail(console)}")
    checks: dict[str, Mapping[str, Any]] = {}
    for raw in results.read_text(errors="replace").splitlines():
        line = raw.strip()  # the guest's tty turns each newline into CR LF
        if line.startswith("{"):
            item = json.loads(line)
            checks[item["check"]] = item
    return GuestRun(checks, console.read_text(errors="replace"), time.monotonic() - started)


def _qemu_argv(
    image: BaseImage, overlay: Path, data_img: Path, console: Path, results: Path
) -> Sequence[str]:
    return [
        "qemu-system-x86_64",
        "-accel",
        accelerator(),
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "1024",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        "root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=-1 systemd.show_status=0",
        "-drive",
        f"file={overlay},if=virtio,format=qcow2",
        "-drive",
        f"file={data_img},if=virtio,format=raw",
        "-serial",
        f"file:{console}",
        "-serial",
        f"file:{results}",
    ]


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no console)"
