"""``make demo``: the real daemon in a throwaway network namespace, driven by ``ctl``.

DEV/DEMO ONLY. Owns two network namespaces it creates (``vf-demo-srv-<hex>``, "the VICIdial
server", and ``vf-demo-phone-<hex>``, "a softphone", joined by a veth pair), a temporary
directory with dev PKI, config and state, and the daemon process it starts; all of it is removed
on the way out, on failure and on Ctrl-C too. It must never touch the host namespace's links,
addresses or ruleset, and it only uses 198.18.0.0/15 and 2001:db8::/32.

The steps are shown with real packets (SIP OPTIONS over UDP 5060 and TCP 5061 from the softphone,
answered by a listener in the server namespace) and real ``vicifast-agent ctl`` commands run as
subprocesses inside the server namespace, where the agent listens on 127.0.0.1:7443.

    python -m agent.demo        (as root; ``make demo`` sets up the machine first)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Literal, TypeVar

from agent.ctl.connection import connection_file_text
from agent.devlab import REPO_ROOT, DevAgent, enter_netns

T = TypeVar("T")
Proto = Literal["udp", "tcp"]

SUBJECT = "alice"
# A blocked probe waits this long for an answer that must not come; an allowed one may take
# longer (first-packet neighbour discovery) and still pass.
BLOCKED_WAIT_S = 0.5
ALLOWED_WAIT_S = 3.0
NETWORK_READY_S = 5.0
UNPROTECTED_PORT = 9999  # in no port profile: shows the path works while SIP is blocked


class DemoFailed(Exception):
    """A step did not show what it should have."""


@dataclass(frozen=True, slots=True)
class Plan:
    """The demo's addresses (fresh namespaces, so they never collide with anything)."""

    server4: str = "198.18.77.1"
    phone4: str = "198.18.77.2"
    server6: str = "2001:db8:77::1"
    phone6: str = "2001:db8:77::2"


PLAN = Plan()


@dataclass(frozen=True, slots=True)
class Probe:
    """One SIP OPTIONS from the softphone to the server, on a protocol, family and port."""

    proto: Proto
    family: int
    port: int

    @property
    def source(self) -> str:
        return PLAN.phone4 if self.family == 4 else PLAN.phone6

    @property
    def destination(self) -> str:
        return PLAN.server4 if self.family == 4 else PLAN.server6

    def label(self) -> str:
        dst = self.destination if self.family == 4 else f"[{self.destination}]"
        return f"SIP OPTIONS {self.proto.upper()} {self.source} -> {dst}:{self.port}"


SIP_PROBES = (Probe("udp", 4, 5060), Probe("udp", 6, 5060), Probe("tcp", 4, 5061))


# --- namespaces -------------------------------------------------------------------------------


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a short-lived thread inside ``netns``; sockets it makes stay there."""
    box: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            enter_netns(netns)
            box.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
            errors.append(exc)

    thread = threading.Thread(target=target, name=f"in-{netns}")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return box[0]


def _ip(*args: str, stdin: str | None = None) -> None:
    done = subprocess.run(
        ["ip", *args], input=stdin, capture_output=True, text=True, check=False, timeout=30
    )
    if done.returncode != 0:
        raise DemoFailed(f"ip {' '.join(args)}: {done.stderr.strip()}")


@contextlib.contextmanager
def demo_network() -> Iterator[tuple[str, str]]:
    """(server, softphone) namespaces joined by veth ``eth0``<->``eth0``; deleted on exit."""
    tag = os.urandom(3).hex()
    server, phone = f"vf-demo-srv-{tag}", f"vf-demo-phone-{tag}"
    created: list[str] = []
    try:
        for ns in (server, phone):
            _ip("netns", "add", ns)
            created.append(ns)
        # Made inside the server namespace with its peer moved straight into the softphone's:
        # no link ever exists in the host namespace, not even for a moment.
        _ip(
            "-n",
            server,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            phone,
        )
        for ns, own4, own6 in (
            (server, PLAN.server4, PLAN.server6),
            (phone, PLAN.phone4, PLAN.phone6),
        ):
            batch = [
                "link set lo up",
                "link set eth0 up",
                f"addr add {own4}/24 dev eth0",
                f"addr add {own6}/64 dev eth0 nodad",
            ]
            _ip("-n", ns, "-batch", "-", stdin="\n".join(batch) + "\n")
        yield server, phone
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)


# --- packets ----------------------------------------------------------------------------------


def _af(family: int) -> socket.AddressFamily:
    return socket.AF_INET if family == 4 else socket.AF_INET6


def _options(probe: Probe, call_id: str) -> bytes:
    return (
        f"OPTIONS sip:demo@{probe.destination} SIP/2.0\r\n"
        f"Via: SIP/2.0/{probe.proto.upper()} {probe.source};branch=z9hG4bK{call_id[:10]}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{SUBJECT}@{probe.source}>;tag={call_id[:8]}\r\n"
        f"To: <sip:demo@{probe.destination}>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def _ok(call_id: str) -> bytes:
    return f"SIP/2.0 200 OK\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\n\r\n".encode()


def sip_answered(server_ns: str, phone_ns: str, probe: Probe, wait_s: float) -> bool:
    """Send one OPTIONS from the softphone; True when the server got it and its 200 OK came back.

    The server side is a listener opened in the server namespace for this one probe, and a
    fresh source port each time, so no earlier flow (or its conntrack entry) is reused.
    """
    call_id = os.urandom(8).hex()
    request, reply = _options(probe, call_id), _ok(call_id)
    kind = socket.SOCK_DGRAM if probe.proto == "udp" else socket.SOCK_STREAM
    fam = _af(probe.family)
    listener = in_netns(server_ns, lambda: socket.socket(fam, kind))
    client = in_netns(phone_ns, lambda: socket.socket(fam, kind))
    with listener, client:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((probe.destination, probe.port))
        client.bind((probe.source, 0))
        deadline = time.monotonic() + wait_s
        if probe.proto == "udp":
            return _udp_exchange(
                listener, client, probe, request=request, reply=reply, deadline=deadline
            )
        return _tcp_exchange(
            listener, client, probe, request=request, reply=reply, deadline=deadline
        )


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _udp_exchange(
    listener: socket.socket,
    client: socket.socket,
    probe: Probe,
    *,
    request: bytes,
    reply: bytes,
    deadline: float,
) -> bool:
    client.sendto(request, (probe.destination, probe.port))
    try:
        while True:  # skip anything else that arrives (a late datagram of an earlier probe)
            listener.settimeout(_left(deadline))
            data, peer = listener.recvfrom(4096)
            if data == request:
                break
        listener.sendto(reply, peer)
        while True:
            client.settimeout(_left(deadline))
            if client.recv(4096) == reply:
                return True
    except TimeoutError:
        return False


def _tcp_exchange(
    listener: socket.socket,
    client: socket.socket,
    probe: Probe,
    *,
    request: bytes,
    reply: bytes,
    deadline: float,
) -> bool:
    listener.listen(1)
    try:
        client.settimeout(_left(deadline))
        client.connect((probe.destination, probe.port))
        client.sendall(request)
        listener.settimeout(_left(deadline))
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(_left(deadline))
            if _read_exactly(conn, len(request)) != request:
                return False
            conn.sendall(reply)
            client.settimeout(_left(deadline))
            return _read_exactly(client, len(reply)) == reply
    except (TimeoutError, ConnectionError):
        return False


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size and (chunk := sock.recv(size - len(data))):
        data += chunk
    return data


def wait_for_network(server_ns: str, phone_ns: str) -> None:
    """Poll (bounded) until both families pass on an unprotected port: the veth is up."""
    deadline = time.monotonic() + NETWORK_READY_S
    for family in (4, 6):
        probe = Probe("udp", family, UNPROTECTED_PORT)
        while not sip_answered(server_ns, phone_ns, probe, 0.2):
            if time.monotonic() > deadline:
                raise DemoFailed(f"IPv{family} between the namespaces never came up")


# --- the story --------------------------------------------------------------------------------


class Demo:
    """The steps, printed as they happen; each one checks what it shows."""

    def __init__(
        self, server_ns: str, phone_ns: str, agent: DevAgent, out: Callable[[str], None]
    ) -> None:
        self.server_ns = server_ns
        self.phone_ns = phone_ns
        self.agent = agent
        self.out = out
        self.connection = agent.directory / "ctl.toml"
        self.step = 0
        self.shown_netns = False

    def heading(self, text: str) -> None:
        self.step += 1
        self.out(f"\n==> {self.step}. {text}")

    def expect(self, probes: Sequence[Probe], *, answered: bool) -> None:
        for probe in probes:
            got = sip_answered(
                self.server_ns, self.phone_ns, probe, ALLOWED_WAIT_S if answered else BLOCKED_WAIT_S
            )
            verdict = (
                "PASSES (200 OK came back)" if got else f"BLOCKED (no answer in {BLOCKED_WAIT_S} s)"
            )
            self.out(f"    {probe.label():58} {verdict}")
            if got != answered:
                want = "answered" if answered else "blocked"
                raise DemoFailed(f"{probe.label()} should have been {want}")

    def ctl(self, *args: str) -> str:
        """Run ``vicifast-agent ctl`` for real, in the server namespace; show and return stdout."""
        shown = ["vicifast-agent", "ctl", "--connection", str(self.connection), *args]
        if not self.shown_netns:
            self.out(f"    # run in the server's namespace: ip netns exec {self.server_ns} ...")
            self.shown_netns = True
        self.out(f"    $ {shlex.join(shown)}")
        argv = ["ip", "netns", "exec", self.server_ns, *_vicifast_agent(), *shown[1:]]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        done = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=60, check=False
        )
        for line in (done.stdout + done.stderr).splitlines():
            self.out(f"    {line}")
        if done.returncode != 0:
            raise DemoFailed(f"ctl {args[0]} exited with {done.returncode}")
        return done.stdout

    def run(self) -> None:
        phone = (PLAN.phone4, PLAN.phone6)
        self.heading("Before any grant: the softphone's SIP is blocked")
        self.out(
            f"    (control: UDP {UNPROTECTED_PORT}, in no port profile, passes; the path works)"
        )
        self.expect([Probe("udp", 4, UNPROTECTED_PORT)], answered=True)
        self.expect(SIP_PROBES, answered=False)

        self.heading(f"The control plane admits the softphone ({SUBJECT} signed in): ctl allow")
        self.ctl("allow", *phone, "--subject", SUBJECT, "--ttl", "600")

        self.heading("SIP now reaches the server, and the answer comes back")
        self.expect(SIP_PROBES, answered=True)

        self.heading("What the agent enforces: ctl state")
        state = self.ctl("state")
        if PLAN.phone4 not in state:
            raise DemoFailed(f"ctl state does not list {PLAN.phone4}")

        self.heading(f"The employer removes {SUBJECT}: ctl revoke")
        self.ctl("revoke", *phone)

        self.heading("Blocked again")
        self.expect(SIP_PROBES, answered=False)


def _vicifast_agent() -> list[str]:
    # The installed entry point when this Python has one (the venv), else the module.
    script = Path(sys.executable).parent / "vicifast-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent"]


def _write_connection(agent: DevAgent, path: Path) -> None:
    pki = agent.pki
    settings = {
        "target": agent.api_listen,
        "agent_id": agent.agent_id,
        "ca": str(pki.ca_cert),
        "cert": str(pki.client.cert),
        "key": str(pki.client.key),
        "signing_key": str(pki.signing.key),
        "keyid": pki.signing.keyid,
    }
    path.write_text(connection_file_text(settings, comment="DEV/DEMO ONLY: make demo"))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up exactly like Ctrl-C


def run_demo(out: Callable[[str], None]) -> None:
    """The whole demo; everything it made is gone when it returns or raises."""
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vicifast-demo-")))
        out("==> Setting up: two throwaway network namespaces joined by a veth pair")
        server_ns, phone_ns = stack.enter_context(demo_network())
        out(f"    the VICIdial server: {server_ns}  {PLAN.server4}  {PLAN.server6}")
        out(f"    a softphone:         {phone_ns}  {PLAN.phone4}  {PLAN.phone6}")
        wait_for_network(server_ns, phone_ns)

        out("==> Starting the real daemon in the server's namespace (DEV/TEST ONLY dev PKI)")
        agent = stack.enter_context(DevAgent(tmp / "agent", server_ns, agent_id="demo-dialer"))
        started = time.monotonic()
        agent.start()
        _write_connection(agent, agent.directory / "ctl.toml")
        out(f"    vicifast-agent run --config {agent.config_path}")
        out(
            f"    pid {agent.pid}, READY=1 after {time.monotonic() - started:.1f} s,"
            f" gRPC over mTLS on {agent.api_listen} (inside {server_ns})"
        )
        Demo(server_ns, phone_ns, agent, out).run()
        out("\n==> Cleaning up: daemon, namespaces, temporary files")


def main(argv: Sequence[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m agent.demo",
        description="Run the daemon in throwaway network namespaces and drive it with ctl"
        " (needs root; touches nothing outside the namespaces it creates).",
    ).parse_args(argv)
    if os.geteuid() != 0:
        print(
            "demo: needs root (network namespaces and nftables); try: sudo make demo",
            file=sys.stderr,
        )
        return 2
    previous = signal.signal(signal.SIGTERM, _interrupt)
    began = time.monotonic()

    def out(line: str) -> None:
        print(line, flush=True)

    try:
        run_demo(out)
    except KeyboardInterrupt:
        print("\ndemo interrupted; cleaned up", file=sys.stderr)
        return 130
    except (DemoFailed, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        # DevAgent raises RuntimeError/TimeoutError (an OSError) with the daemon's log tail.
        print(f"\ndemo FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"\ndemo OK ({time.monotonic() - began:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
