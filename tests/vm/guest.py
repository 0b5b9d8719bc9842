"""The kernel-facing checks, run as root INSIDE a booted Debian VM on that release's own kernel.

Owns only what happens in the guest: it installs the package, starts it under the shipped unit
and checks, with real packets from a "phone" network namespace, what depends on the kernel
(refresh timeouts, conntrack cuts, generation notifications, restarts). It must never need
anything but the Debian guest's own ``/usr/bin/python3`` (stdlib only) and the files on the data
disk; every check's verdict is one JSON line on the results port, read by ``test_kernels.py``.

    python3 guest.py DATA_DIR RESULTS_PATH      (the whole run; the VM's test unit starts it)
    python3 guest.py probe ...                  (inside the phone's namespace; see ``_probe_main``)
"""

from __future__ import annotations

import json
import os
import pty
import queue
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

UNIT = "vicifast-agent.service"
DATA = Path("/vftest")  # the data disk, mounted read-only by the VM's test unit
ETC = Path("/etc/vicifast-agent")
PHONE_NS = "phone"
SERVER4, PHONE4 = "198.18.0.1", "198.18.0.2"
SERVER6, PHONE6 = "2001:db8::1", "2001:db8::2"
SIP = 5060
FLOW_SPORT = 40_000
# TCG emulation is 10-50x slower than hardware: waits are generous, verdicts are not.
ANSWER_WAIT_S = 2.0
BLOCKED_WAIT_S = 1.0
REPAIR_BOUND_S = 1.0
PROBES_PAST_READY = 50  # about a second of the stream after the restart returned


class Results:
    """One JSON line per check on the results port, flushed at once (the VM may die next)."""

    def __init__(self, port: TextIO) -> None:
        self.port = port

    def emit(self, check: str, ok: bool, **detail: Any) -> None:
        line = json.dumps({"check": check, "ok": bool(ok), **detail}, sort_keys=True)
        self.port.write(line + "\n")
        self.port.flush()
        print(line, file=sys.stderr, flush=True)


def run(
    *argv: str, check: bool = False, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, input=stdin, timeout=300, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{argv!r} exited {done.returncode}: {done.stdout}{done.stderr}")
    return done


def wait_until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step_s)


# --- set-up ---------------------------------------------------------------------------------


def install_package(data: Path) -> subprocess.CompletedProcess[str]:
    debs = sorted(data.glob("*.deb"))
    return run("dpkg", "-i", *map(str, debs))


def install_config(data: Path) -> None:
    shutil.copyfile(data / "agent.toml", ETC / "agent.toml")
    tls = ETC / "tls"
    for name, mode in (("server.crt", 0o644), ("client-ca.crt", 0o644), ("server.key", 0o640)):
        shutil.copyfile(data / "tls" / name, tls / name)
        os.chmod(tls / name, mode)
        shutil.chown(tls / name, "root", "vicifast-agent")


def make_phone() -> None:
    """The softphone: a namespace behind veth ``vf0`` <-> its ``eth0``; DAD off (no waiting)."""
    run("ip", "netns", "add", PHONE_NS, check=True)
    batch = "\n".join(
        [
            f"link add vf0 type veth peer name eth0 netns {PHONE_NS}",
            f"addr add {SERVER4}/24 dev vf0",
            f"addr add {SERVER6}/64 dev vf0 nodad",
            "link set vf0 up",
        ]
    )
    run("ip", "-batch", "-", stdin=batch + "\n", check=True)
    inner = "\n".join(
        [
            f"addr add {PHONE4}/24 dev eth0",
            f"addr add {PHONE6}/64 dev eth0 nodad",
            "link set eth0 up",
            "link set lo up",
        ]
    )
    run("ip", "-n", PHONE_NS, "-batch", "-", stdin=inner + "\n", check=True)


def start_responder() -> None:
    """The "VICIdial server": answers every datagram to UDP 5060, both families (daemon thread)."""
    # Every address of the guest: the server side of the phone's veth (the VM has no other link).
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):  # noqa: S104
        sock = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, SIP))

        def serve(s: socket.socket = sock) -> None:
            while True:
                payload, peer = s.recvfrom(2048)
                s.sendto(b"OK " + payload, peer)

        threading.Thread(target=serve, daemon=True).start()


# --- probes from the phone's namespace ----------------------------------------------------


def _probe_main(argv: list[str]) -> int:
    """``probe ADDR [--sport N] [--stream]``: one datagram (or a stream until stdin closes).

    Prints JSON: ``{"sent": n, "answered": m}``. A stream sends one probe every 20 ms, each
    waiting up to 0.5 s for its own answer (so a gap of any length is counted), and prints one
    line per probe as it goes, ``+`` answered or ``-`` lost, for the caller to count.
    """
    address = argv[0]
    sport = int(argv[argv.index("--sport") + 1]) if "--sport" in argv else 0
    stream = "--stream" in argv
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", sport))  # noqa: S104
    sent = answered = 0

    def one(wait_s: float) -> None:
        nonlocal sent, answered
        token = f"probe-{sent}".encode()
        sent += 1
        sock.sendto(token, (address, SIP))
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            if sock.recv(2048) == b"OK " + token:
                answered += 1
                return

    if not stream:
        one(float(argv[argv.index("--wait") + 1]) if "--wait" in argv else ANSWER_WAIT_S)
    else:
        print("streaming", flush=True)
        while not select.select([sys.stdin], [], [], 0.02)[0]:
            before = answered
            one(0.5)
            print("+" if answered > before else "-", flush=True)
    print(json.dumps({"sent": sent, "answered": answered}), flush=True)
    return 0


def _phone(*args: str) -> list[str]:
    return ["ip", "netns", "exec", PHONE_NS, sys.executable, __file__, "probe", *args]


def answered(address: str, *, wait_s: float, sport: int = 0) -> bool:
    done = run(*_phone(address, "--wait", str(wait_s), "--sport", str(sport)), check=True)
    return bool(json.loads(done.stdout.splitlines()[-1])["answered"])


# --- what the kernel holds --------------------------------------------------------------------


def table_json() -> list[dict[str, Any]]:
    done = run("nft", "-j", "list", "table", "inet", "vicifast")
    if done.returncode != 0:
        return []
    items: list[dict[str, Any]] = json.loads(done.stdout)["nftables"]
    return items


def elements(address: str) -> Iterator[dict[str, Any]]:
    """The timed elements of ``address`` in the agent's sets (``{"val", "timeout", "expires"}``)."""
    for item in table_json():
        for elem in item.get("set", {}).get("elem", []):
            inner = elem.get("elem") if isinstance(elem, dict) else None
            if isinstance(inner, dict) and inner.get("val") == address:
                yield inner


def expires_s(address: str) -> int | None:
    found = [e.get("expires", e.get("timeout")) for e in elements(address)]
    return max(found) if found else None


def flow_count(address: str) -> int:
    done = run("conntrack", "-L", "-p", "udp", "--orig-src", address, "--dport", str(SIP))
    return sum(1 for line in done.stdout.splitlines() if line.startswith("udp"))


def _adds_phone4(line: str) -> bool:
    # The agent adds with "create" (an element already there is an error, never a silent keep).
    verbs = ("add element inet vicifast allow4_agent", "create element inet vicifast allow4_agent")
    return line.startswith(verbs) and f" {PHONE4} " in line


class RulesetMonitor:
    """``nft monitor`` in the background: the kernel's own account of each change, timed as read.

    Timing a repair by polling ``nft list`` would count the poller's process start-ups (slow under
    emulation) as the agent's delay; the monitor's events arrive as the kernel commits.
    """

    def __init__(self) -> None:
        # On a pipe nft's stdio buffers whole blocks; on a terminal it writes each line at once.
        reader, writer = pty.openpty()
        self.process = subprocess.Popen(["nft", "monitor"], stdout=writer)
        os.close(writer)
        self.events: queue.Queue[tuple[float, str]] = queue.Queue()
        self.seen: list[str] = []  # every event looked at, for the verdict's detail
        threading.Thread(target=self._read, args=(reader,), daemon=True).start()

    def _read(self, reader: int) -> None:
        with open(reader, encoding="utf-8", errors="replace") as lines:
            try:
                for line in lines:
                    self.events.put((time.monotonic(), line.strip()))
            except OSError:  # EIO: nft exited and the terminal closed
                return

    def first(self, matches: Callable[[str], bool], timeout_s: float) -> float | None:
        """When the next event ``matches`` was read (monotonic s), or None within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                at, line = self.events.get(timeout=left)
            except queue.Empty:
                return None
            self.seen.append(line[:160])
            if matches(line):
                return at
        return None

    def __enter__(self) -> RulesetMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def ctl(*args: str) -> subprocess.CompletedProcess[str]:
    """``vicifast-agent ctl`` with the data disk's settings (its paths are relative to it)."""
    return run("vicifast-agent", "ctl", "--connection", str(DATA / "ctl.toml"), *args)


# --- the checks -------------------------------------------------------------------------------


def checks(data: Path, results: Results) -> None:
    results.emit("kernel", True, release=os.uname().release)
    done = install_package(data)
    results.emit("package_installs", done.returncode == 0, tail=(done.stdout + done.stderr)[-800:])
    if done.returncode != 0:
        return
    install_config(data)
    make_phone()
    start_responder()
    # The baseline: with no agent table yet the path and the responder work.
    results.emit("sip_answered_before_the_agent_starts", answered(SERVER4, wait_s=ANSWER_WAIT_S))

    started = time.monotonic()
    done = run("systemctl", "start", UNIT)
    active = run("systemctl", "is-active", UNIT).stdout.strip()
    results.emit(
        "starts_under_the_shipped_unit",
        done.returncode == 0 and active == "active",
        seconds=round(time.monotonic() - started, 2),
        active=active,
        stderr=done.stderr[-400:],
    )
    if active != "active":
        results.emit("journal", False, tail=run("journalctl", "-u", UNIT, "-n", "40").stdout)
        return

    blocked = [not answered(a, wait_s=BLOCKED_WAIT_S) for a in (SERVER4, SERVER6)]
    results.emit("sip_blocked_before_allow", all(blocked), per_family=blocked)

    done = ctl("allow", PHONE4, PHONE6, "--subject", "vm-check", "--ttl", "120")
    opened = [answered(a, wait_s=ANSWER_WAIT_S) for a in (SERVER4, SERVER6)]
    results.emit("allow_opens_sip", done.returncode == 0 and all(opened), per_family=opened)

    before = expires_s(PHONE4)
    done = ctl("allow", PHONE4, "--subject", "vm-check", "--ttl", "7200")
    after = expires_s(PHONE4)
    results.emit(
        "refresh_extends_the_element_timeout",
        done.returncode == 0 and before is not None and after is not None and after > 6000,
        expires_before_s=before,
        expires_after_s=after,
    )

    flow_ok = answered(SERVER4, wait_s=ANSWER_WAIT_S, sport=FLOW_SPORT)
    flows_before = flow_count(PHONE4)
    done = ctl("revoke", PHONE4, PHONE6)
    cut = wait_until(lambda: flow_count(PHONE4) == 0, timeout_s=5.0)
    results.emit(
        "revoke_cuts_the_established_flow",
        done.returncode == 0 and flow_ok and flows_before >= 1 and cut,
        flows_before=flows_before,
        journal=_agent_journal_tail(),
    )
    still = answered(SERVER4, wait_s=BLOCKED_WAIT_S, sport=FLOW_SPORT)
    results.emit("revoked_flow_is_dropped", not still)

    with RulesetMonitor() as monitor:
        # A grant's own event proves the monitor listens before the flush (under emulation
        # `nft monitor` takes a while to subscribe: a grant before that is not seen; grant again).
        granted = None
        for _ in range(5):
            ctl("allow", PHONE4, PHONE6, "--subject", "vm-check", "--ttl", "3600")
            granted = monitor.first(_adds_phone4, timeout_s=10.0)
            if granted is not None:
                break
        run("nft", "flush", "ruleset", check=True)
        flushed = monitor.first(lambda line: line.startswith("delete table inet vicifast"), 30.0)
        restored = monitor.first(_adds_phone4, timeout_s=30.0)
    took = None if flushed is None or restored is None else restored - flushed
    results.emit(
        "flush_ruleset_is_repaired_within_1s",
        granted is not None and took is not None and took <= REPAIR_BOUND_S,
        seconds=None if took is None else round(took, 3),
        seen={"granted": granted, "flushed": flushed, "restored": restored},
        still_listed=expires_s(PHONE4) is not None,
        monitor_tail=monitor.seen[-12:],
    )

    stream = subprocess.Popen(
        _phone(SERVER4, "--stream"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert stream.stdout is not None
    assert stream.stdin is not None
    stream.stdout.readline()  # "streaming": the probes are flowing
    old_pid = run("systemctl", "show", "-P", "MainPID", UNIT).stdout.strip()
    done = run("systemctl", "restart", UNIT)
    new_pid = run("systemctl", "show", "-P", "MainPID", UNIT).stdout.strip()
    for _ in range(PROBES_PAST_READY):  # probes keep flowing past READY=1
        stream.stdout.readline()
    stream.stdin.close()
    counts = json.loads(stream.stdout.read().splitlines()[-1])
    stream.wait(timeout=30)
    results.emit(
        "restart_loses_no_probe",
        done.returncode == 0
        and old_pid != new_pid
        and counts["sent"] >= 20
        and counts["sent"] == counts["answered"],
        **counts,
    )
    warnings = run("journalctl", "-u", UNIT, "-p", "warning", "-o", "cat", "--no-pager").stdout
    results.emit("journal_warnings", True, lines=warnings.splitlines()[-20:])


def _agent_journal_tail() -> list[str]:
    return run("journalctl", "-u", UNIT, "-n", "8", "-o", "cat").stdout.splitlines()


def main(argv: list[str]) -> int:
    if argv and argv[0] == "probe":
        return _probe_main(argv[1:])
    data, port_path = Path(argv[0]), argv[1]
    with open(port_path, "w") as port:
        results = Results(port)
        try:
            checks(data, results)
        except Exception as exc:  # noqa: BLE001 - the host must learn of any: the VM powers off next
            results.emit("guest_crashed", False, error=f"{type(exc).__name__}: {exc}")
        results.emit("done", True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
