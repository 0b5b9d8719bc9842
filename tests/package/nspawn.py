"""A booted Debian for the package test: a cached debootstrap root, booted by systemd-nspawn.

Owns the cached roots (``/var/cache/vicifast-agent-test/<release>-<hash>``, one per Debian release
the package is built for: built once per package list, never modified afterwards) and each test
run's container: an overlay of that root (so every run starts from the same clean system and leaves
the cache untouched), booted with ``systemd-nspawn --boot`` inside a network namespace the caller
owns. Commands run in the container through ``nsenter`` into its init's namespaces, so they see the
container's systemd, filesystem and network exactly as a sysadmin's shell would.

It never touches the host's own network namespace, ruleset or units: PID 1 of this machine need not
be systemd (``--register=no --keep-unit``: no machined, no transient scope).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

CACHE = Path("/var/cache/vicifast-agent-test")
MIRROR = "http://deb.debian.org/debian"
# Everything the package Depends on (and the tools the test uses inside), so `apt install
# ./vicifast-agent_*.deb` in the container needs no network.
PACKAGES = (
    "adduser",
    "apt",
    "conntrack",
    "dbus",
    "iproute2",
    "nftables",
    "procps",
    "python3",
    "python3-nftables",
    "python3-systemd",
    "systemd",
    "systemd-sysv",
)
_CMD_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "DEBIAN_FRONTEND": "noninteractive",
}


def missing_tools() -> str | None:
    """Why a container cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "the package test needs root"
    for tool in ("debootstrap", "systemd-nspawn", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"the package test needs {tool!r} (make test-package installs it)"
    return None


def cached_root(release: str) -> Path:
    """The root of Debian ``release`` (a codename) for ``PACKAGES``; made with debootstrap on
    first use (about a minute)."""
    key = hashlib.sha256(
        "\n".join(["v1", release, MIRROR, "minbase", *sorted(PACKAGES)]).encode()
    ).hexdigest()[:12]
    root = CACHE / f"{release}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once build it once
        if (root / "etc" / "os-release").exists():
            return root
        partial = CACHE / f".partial-{key}"
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                release,
                str(partial),
                MIRROR,
            ],
            check=True,
            capture_output=True,
        )
        # Smaller and reproducible: no downloaded .debs, no apt lists (the container is offline).
        shutil.rmtree(partial / "var/cache/apt/archives", ignore_errors=True)
        (partial / "var/cache/apt/archives/partial").mkdir(parents=True)
        partial.rename(root)
    return root


class CommandFailed(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"


class Container:
    """A booted container over ``lower`` (read-only), in network namespace ``netns``.

    Use as a context manager: on the way out the container is powered off (killed if it does
    not stop in time), the overlay unmounted and its scratch directory removed.
    """

    def __init__(self, lower: Path, netns: str, scratch: Path, name: str = "pkgtest") -> None:
        self.netns = netns
        self.name = name
        self.scratch = scratch
        self.root = scratch / "merged"
        self.console_log = scratch / "console.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._mounted = False
        for d in ("upper", "work", "merged"):
            (scratch / d).mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={lower},upperdir={scratch / 'upper'},workdir={scratch / 'work'}",
                str(self.root),
            ],
            check=True,
            capture_output=True,
        )
        self._mounted = True

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- lifecycle ----------------------------------------------------------------------------

    def boot(self, *, timeout: float = 60.0) -> None:
        """Boot and return once the container's systemd says it is up.

        nspawn relays init's READY=1 (``--notify-ready``) to the notify socket it is given, so
        boot is awaited, not polled; a pidfd tells an nspawn that died on the way.
        """
        argv = [
            "systemd-nspawn",
            f"--directory={self.root}",
            f"--machine={self.name}",
            "--boot",
            "--notify-ready=yes",
            # This host's PID 1 is not necessarily systemd: no machined registration and no
            # transient scope; the container lives in this process's cgroup.
            "--register=no",
            "--keep-unit",
            f"--network-namespace-path=/run/netns/{self.netns}",
            # nspawn drops CAP_NET_ADMIN unless it made the network itself; the agent needs it
            # (only inside this namespace, which the test owns).
            "--capability=CAP_NET_ADMIN",
            "--console=pipe",
        ]
        notify_path = self.scratch / "notify.sock"
        with contextlib.ExitStack() as stack:
            notify = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
            notify.bind(str(notify_path))
            log = stack.enter_context(self.console_log.open("ab"))
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            )
            exited = os.pidfd_open(self.process.pid)
            stack.callback(os.close, exited)
            _await_ready(notify, exited, time.monotonic() + timeout, self.console_tail)
        # Ready: init has finished its start-up job, so this answers at once.
        state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
        if state not in ("running", "degraded"):
            failed = self.run("systemctl", "--failed", "--no-pager", check=False).stdout
            raise RuntimeError(f"container boot ended {state!r}:\n{failed}")

    def leader(self) -> int | None:
        """PID (host view) of the container's init, once nspawn has forked it."""
        if self.process is None:
            return None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            pids = children.read_text().split()
        except OSError:
            return None
        for pid in pids:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
        return None

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"systemd-nspawn exited with {self.process.returncode}:\n{self.console_tail()}"
            )

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        try:
            self._power_off()
        finally:
            if self._mounted:
                subprocess.run(["umount", str(self.root)], check=False, capture_output=True)
                self._mounted = False
            shutil.rmtree(self.scratch, ignore_errors=True)

    def _power_off(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        leader = self.leader()
        if leader is not None:
            self.run("systemctl", "poweroff", "--no-block", check=False, timeout=10)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            if leader is not None:  # SIGKILL to the init of a PID namespace ends all of it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(leader, signal.SIGKILL)
            self.process.kill()
            self.process.wait(timeout=30)

    # --- inside the container -----------------------------------------------------------------

    def _inside(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as run as root inside the container (its mount, PID, net, IPC, UTS
        namespaces)."""
        self._check_alive()
        leader = self.leader()
        if leader is None:
            raise RuntimeError("the container is not running")
        env = [f"{k}={v}" for k, v in _CMD_ENV.items()]
        return ["nsenter", f"--target={leader}", "--all", "env", "-i", *env, *argv]

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 120.0,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as root inside the container."""
        done = subprocess.run(
            self._inside(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise CommandFailed(done.returncode, list(argv), done.stdout, done.stderr)
        return done

    def sh(self, script: str, *, check: bool = True, timeout: float = 120.0) -> str:
        return self.run("sh", "-ec", script, check=check, timeout=timeout).stdout

    def path(self, inside: str) -> Path:
        """The host path of ``inside`` (an absolute path in the container)."""
        return self.root / inside.lstrip("/")

    def put(self, inside: str, data: bytes, *, mode: int = 0o644, owner: str = "root:root") -> None:
        """Write a file into the container; ``owner`` is resolved by the container's users."""
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        self.run("chown", owner, inside)
        self.run("chmod", f"{mode:o}", inside)

    def copy_in(self, source: Path, inside: str) -> None:
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)

    def unit_property(self, unit: str, name: str) -> str:
        return self.run("systemctl", "show", "--value", "-p", name, unit).stdout.strip()

    def journal(self, unit: str, since_cursor: str | None = None) -> str:
        argv = ["journalctl", "--no-pager", "-o", "cat", "-u", unit]
        if since_cursor:
            argv += ["--after-cursor", since_cursor]
        return self.run(*argv, check=False).stdout

    def journal_cursor(self) -> str:
        """Where the journal ends now: ``await_journal`` looks at what is logged after it."""
        shown = self.run("journalctl", "--no-pager", "-n", "1", "-o", "cat", "--show-cursor")
        return shown.stdout.rsplit("-- cursor: ", 1)[1].strip()

    def await_journal(
        self, unit: str, patterns: Sequence[str], *, after: str, timeout: float
    ) -> None:
        """Return once ``unit`` logged, after the cursor ``after``, lines matching each of
        ``patterns`` (regular expressions) in that order. ``journalctl --follow`` is woken by
        journald as lines arrive: nothing is polled, and nothing logged before the follower
        started is missed."""
        argv = ["journalctl", "--follow", "--no-pager", "-o", "cat", "-u", unit]
        # A session of its own: nsenter forks journalctl into the container's PID namespace,
        # and the whole group is killed at the end, not only nsenter.
        follower = subprocess.Popen(
            self._inside([*argv, "--after-cursor", after]),
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert follower.stdout is not None
        deadline = time.monotonic() + timeout
        waiting, seen, pending = list(patterns), [], b""
        try:
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([follower.stdout], [], [], left)[0]:
                    raise TimeoutError(f"{unit}: no {waiting[0]!r} within {timeout} s: {seen}")
                chunk = os.read(follower.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"journalctl --follow ended: {seen}")
                *lines, pending = (pending + chunk).split(b"\n")
                for line in (raw.decode(errors="replace") for raw in lines):
                    seen.append(line)
                    if waiting and re.search(waiting[0], line):
                        waiting.pop(0)
        finally:
            os.killpg(follower.pid, signal.SIGKILL)
            follower.wait()
            follower.stdout.close()

    def apt(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return self.run("apt-get", "-y", "-q", "--no-install-recommends", *args, timeout=timeout)


def _await_ready(
    notify: socket.socket, exited: int, deadline: float, console: Callable[[], str]
) -> None:
    """Read ``notify`` until a READY=1 arrives; fail if ``exited`` (a pidfd) fires first."""
    while True:
        left = deadline - time.monotonic()
        readable = select.select([notify, exited], [], [], max(left, 0))[0] if left > 0 else []
        if not readable:
            raise TimeoutError(f"container did not boot:\n{console()}")
        if notify in readable and b"READY=1" in notify.recv(4096).split(b"\n"):
            return
        if exited in readable:
            raise RuntimeError(f"systemd-nspawn exited before the container was up:\n{console()}")


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    path = Path(
        subprocess.run(
            ["mktemp", "-d", f"/var/tmp/{prefix}-XXXXXX"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
