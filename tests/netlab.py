"""Network-namespace lab for kernel tests: two fresh namespaces, a veth pair, real packets.

Owns only the namespaces it creates (``vf-srv-<hex>``, ``vf-cli-<hex>``) and removes them on
close; it must never touch the host namespace's links, addresses or ruleset, and it only ever
uses addresses from 198.18.0.0/15 and 2001:db8::/32, sending only between its own namespaces.

Entering a namespace is per thread (``setns(2)`` on the calling thread), so ``Netns.entered()``
moves just the current thread in and back. What is created in there stays there:

* a socket belongs to the namespace it was created in, wherever it is used later;
* a libnftables context (``nftables.Nftables()``) too: verified on nftables 1.0.6 / kernel 6.18,
  ``nft_ctx_new`` opens the context's one netlink socket at creation, and every later command -
  text or JSON, after an error as well - goes to that namespace whatever namespace the calling
  thread is in. A context created in the host keeps talking to the host even when used inside
  ``entered()``. So build the ``Nftables`` object (or the adapter that owns it) inside the
  namespace - ``lab.srv.nftables()`` or ``lab.srv.call(Adapter, ...)`` - and use it from anywhere.
  An adapter that lazily creates a fresh context later would land in whatever namespace its
  thread is in then, i.e. the host: never let an adapter under test do that outside ``entered()``.
  A live context also keeps its namespace alive after ``Lab.close()`` until it is freed.
* pyroute2 0.9 is different: an object keeps one netlink socket per thread, opened by that
  thread (``NFCTSocket`` at its first call, ``IPRoute`` for the creating thread at creation),
  so it follows the namespace of the thread that uses it. Use it inside ``entered()``, or
  construct it with ``netns=<name>`` (its sockets are then opened in that namespace).
* a thread started inside ``entered()`` starts in that namespace; a forked process inherits the
  forking thread's namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, TypeVar

import nftables

Family = Literal[4, 6]
Proto = Literal["udp", "tcp"]

P = ParamSpec("P")
T = TypeVar("T")

# Short enough that a "not received" verdict keeps the suite fast, long enough for a veth hop.
PROBE_TIMEOUT = 0.4
HOST_PORT = 41000  # the client's port for flows the server initiates
READY_TIMEOUT = 5.0

_CLONE_NEWNET = 0x40000000
_NETNS_DIR = "/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)
_TEST_RANGES = (ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("2001:db8::/32"))
# Never set: waiting on it is the pacing between polls of a deadline-bounded condition.
_PACE = threading.Event()


@dataclass(frozen=True, slots=True)
class Addresses:
    """The lab's fixed address plan (the namespaces are fresh, so it never collides).

    The client's ``*_alt`` sources share its subnet (the same /24 or /64), its ``*_far`` sources
    are in another subnet that the server routes back via the client.
    """

    server4: str = "198.18.0.1"
    client4: str = "198.18.0.2"
    client4_alt: str = "198.18.0.3"
    client4_far: str = "198.19.0.2"
    net4: str = "198.18.0.0/24"
    far_net4: str = "198.19.0.0/24"
    server6: str = "2001:db8:0:1::1"
    client6: str = "2001:db8:0:1::2"
    client6_alt: str = "2001:db8:0:1::3"
    client6_far: str = "2001:db8:0:2::2"
    net6: str = "2001:db8:0:1::/64"
    far_net6: str = "2001:db8:0:2::/64"

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            net = ipaddress.ip_network(getattr(self, name))
            ends = (net.network_address, net.broadcast_address)
            if not any(all(end in allowed for end in ends) for allowed in _TEST_RANGES):
                raise ValueError(f"{name}={net} is outside the lab's test ranges")

    def server(self, family: Family) -> str:
        return self.server4 if family == 4 else self.server6

    def client(self, family: Family) -> str:
        return self.client4 if family == 4 else self.client6

    def far(self, family: Family) -> str:
        """The client's source in another subnet."""
        return self.client4_far if family == 4 else self.client6_far


ADDR = Addresses()


@dataclass(frozen=True, slots=True)
class Probe:
    """What the server side saw of one probe: whether it arrived and from which source."""

    arrived: bool
    source: str | None = None


def family_of(address: str) -> Family:
    return 4 if ipaddress.ip_address(address).version == 4 else 6


def _af(family: Family) -> socket.AddressFamily:
    return socket.AF_INET if family == 4 else socket.AF_INET6


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def current_netns_inode() -> int:
    """The inode of the calling thread's network namespace (equal inodes: same namespace)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Return once ``condition()`` is true; raise ``TimeoutError`` naming ``what`` at the deadline.

    The condition is re-checked every 10 ms: this paces a deadline-bounded poll, it is never a
    fixed delay standing in for an event.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        _PACE.wait(0.01)


class CommandFailed(subprocess.CalledProcessError):
    """A command run in a namespace failed; ``str()`` includes its stderr (nft's diagnosis)."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr}"


class Netns:
    """A named network namespace: enter it on this thread, or run commands inside it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = f"{_NETNS_DIR}/{name}"

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    @property
    def inode(self) -> int:
        return os.stat(self.path).st_ino

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Move the calling thread into this namespace for the ``with`` block, then back."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                # A thread stranded in a test namespace would point later tests at the wrong
                # kernel state, so a failed return is an error that must not be swallowed.
                _setns(home)
        finally:
            os.close(home)

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on this thread in the namespace; sockets and nft contexts it makes stay."""
        with self.entered():
            return fn(*args, **kwargs)

    def nftables(self) -> Any:
        """A libnftables context bound to this namespace (usable from any namespace later)."""
        return self.call(nftables.Nftables)

    def socket(self, family: Family, kind: socket.SocketKind = socket.SOCK_DGRAM) -> socket.socket:
        return self.call(socket.socket, _af(family), kind)

    def interfaces(self) -> set[str]:
        return {name for _, name in self.call(socket.if_nameindex)}

    def run(
        self, *argv: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a program in the namespace (``ip netns exec``); ``CommandFailed`` if ``check``."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if check and done.returncode != 0:
            raise CommandFailed(done.returncode, done.args, done.stdout, done.stderr)
        return done

    def nft(self, *args: str, stdin: str | None = None) -> str:
        """``nft ARGS`` in the namespace: its stdout, or ``CommandFailed``."""
        return self.run("nft", *args, stdin=stdin).stdout

    def nft_script(self, script: str) -> None:
        """Apply an nft script (``nft -f -``) as one transaction."""
        self.nft("-f", "-", stdin=script)

    def nft_json(self, *args: str) -> dict[str, Any]:
        """``nft -j ARGS`` parsed, e.g. ``nft_json("list", "table", "inet", "other")``."""
        parsed: dict[str, Any] = json.loads(self.nft("-j", *args))
        return parsed

    def ruleset(self) -> str:
        return self.nft("list", "ruleset")

    def conntrack(self, *args: str) -> list[str]:
        """Conntrack entries matching ``conntrack -L ARGS``, one line each.

        The kernel tracks flows in a namespace only once something there uses conntrack (for
        example an nft rule with a ``ct`` expression).
        """
        out = self.run("conntrack", "-L", *args).stdout
        return [line for line in out.splitlines() if line.strip()]


def _ip_n(ns: Netns, *args: str) -> list[str]:
    return ["ip", "-n", ns.name, *args]


def _ip_batch(ns: Netns, lines: list[str]) -> None:
    subprocess.run(
        _ip_n(ns, "-batch", "-"),
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )


class Lab:
    """A server and a client namespace joined by veth ``eth0`` <-> ``eth0``, addressed by ``ADDR``.

    Use as a context manager (or call ``close()``): both namespaces are removed on the way out,
    whatever happened inside.
    """

    def __init__(self) -> None:
        tag = os.urandom(4).hex()
        self.addr = ADDR
        self.srv = Netns(f"vf-srv-{tag}")
        self.cli = Netns(f"vf-cli-{tag}")
        self._home = current_netns_inode()
        self._created: list[Netns] = []
        try:
            self._build()
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        a = self.addr
        for ns in (self.srv, self.cli):
            subprocess.run(
                ["ip", "netns", "add", ns.name], check=True, capture_output=True, text=True
            )
            self._created.append(ns)
        peer = ("peer", "name", "eth0", "netns", self.cli.name)
        subprocess.run(
            [*_ip_n(self.srv, "link", "add", "eth0", "type", "veth"), *peer],
            check=True,
            capture_output=True,
        )
        # No sysctl is written (a container's /proc/sys is often read-only): every address is
        # added ``nodad``, and ``addrgenmode none`` keeps the kernel from making a link-local
        # address, which would go through duplicate address detection (neighbour discovery
        # works from the global addresses; nothing here uses link-local ones).
        _ip_batch(
            self.srv,
            [
                "link set lo up",
                "link set eth0 addrgenmode none",
                "link set eth0 up",
                f"addr add {a.server4}/24 dev eth0",
                f"addr add {a.server6}/64 dev eth0 nodad",
                f"route add {a.far_net4} via {a.client4}",
                f"route add {a.far_net6} via {a.client6}",
            ],
        )
        _ip_batch(
            self.cli,
            [
                "link set lo up",
                "link set eth0 addrgenmode none",
                "link set eth0 up",
                f"addr add {a.client4}/24 dev eth0",
                f"addr add {a.client4_alt}/24 dev eth0",
                f"addr add {a.client4_far}/24 dev eth0",
                f"addr add {a.client6}/64 dev eth0 nodad",
                f"addr add {a.client6_alt}/64 dev eth0 nodad",
                f"addr add {a.client6_far}/64 dev eth0 nodad",
            ],
        )

    def _wait_ready(self) -> None:
        # The veth carrier (and with it the qdisc) comes up asynchronously after "link set up".
        for family in (4, 6):
            wait_until(
                _ready_check(self, family),
                timeout=READY_TIMEOUT,
                what=f"IPv{family} between {self.cli.name} and {self.srv.name}",
            )

    def close(self) -> None:
        """Delete the namespaces this lab created; raise if this thread was left inside one."""
        errors: list[str] = []
        while self._created:
            ns = self._created.pop()
            done = subprocess.run(
                ["ip", "netns", "del", ns.name], check=False, capture_output=True, text=True
            )
            if done.returncode != 0:
                errors.append(f"{ns.name}: {done.stderr.strip()}")
        if current_netns_inode() != self._home:
            errors.append("the calling thread did not return from a lab namespace")
        if errors:
            raise RuntimeError("lab teardown failed: " + "; ".join(errors))

    # Probes -------------------------------------------------------------------------------

    def _route(self, family: Family | None, src: str | None) -> tuple[Family, str]:
        """The probe's family and client source: ``src``, else the client's main address.

        The source is always bound, because with several addresses on eth0 the kernel's own
        choice of source would be one of the extra ones (IPv6 prefers the newest).
        """
        if src is None:
            fam: Family = family or 4
            return fam, self.addr.client(fam)
        src_family = family_of(src)
        if family is not None and family != src_family:
            raise ValueError(f"source {src} is not IPv{family}")
        return src_family, src

    def probe(
        self,
        proto: Proto,
        port: int,
        *,
        family: Family | None = None,
        src: str | None = None,
        sport: int = 0,
        timeout: float = PROBE_TIMEOUT,
    ) -> Probe:
        """Send one UDP datagram / open one TCP connection from the client to ``server:port``.

        A listener is opened on the server for the duration of the probe, so ``port`` must not
        be held by another server socket. ``src`` picks the client's source address (default
        ``addr.client(family)``; its family is the probe's), ``sport`` its source port (0: any).
        """
        fam, source = self._route(family, src)
        if proto == "udp":
            return self._udp(fam, port, source, sport, timeout)
        if proto == "tcp":
            return self._tcp(fam, port, source, sport, timeout)
        raise ValueError(f"unknown protocol {proto!r}")

    def reaches(
        self,
        proto: Proto,
        port: int,
        *,
        family: Family | None = None,
        src: str | None = None,
        timeout: float = PROBE_TIMEOUT,
    ) -> bool:
        """Whether one probe from the client arrives at ``server:port`` (see ``probe``)."""
        return self.probe(proto, port, family=family, src=src, timeout=timeout).arrived

    def _udp(self, family: Family, port: int, src: str, sport: int, timeout: float) -> Probe:
        token = os.urandom(8)
        server = (self.addr.server(family), port)
        with (
            self.srv.socket(family, socket.SOCK_DGRAM) as listener,
            _client_socket(self.cli, family, socket.SOCK_DGRAM, src, sport) as client,
        ):
            listener.bind(server)
            client.sendto(token, server)
            peer = _receive(listener, token, timeout)
        return Probe(arrived=peer is not None, source=None if peer is None else str(peer[0]))

    def _tcp(self, family: Family, port: int, src: str, sport: int, timeout: float) -> Probe:
        token = os.urandom(8)
        server = (self.addr.server(family), port)
        with (
            self.srv.socket(family, socket.SOCK_STREAM) as listener,
            _client_socket(self.cli, family, socket.SOCK_STREAM, src, sport) as client,
        ):
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(server)
            listener.listen(4)
            client.settimeout(timeout)
            try:
                # The kernel completes the handshake on the listener without an accept().
                client.connect(server)
                client.sendall(token)
            except OSError:
                return Probe(arrived=False)
            listener.settimeout(timeout)
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                return Probe(arrived=False)
            with conn:
                conn.settimeout(timeout)
                try:
                    got = conn.recv(len(token))
                except TimeoutError:
                    return Probe(arrived=False)
        return Probe(arrived=got == token, source=peer[0] if got == token else None)

    def udp_flow(
        self,
        *,
        port: int = 5060,
        family: Family | None = None,
        src: str | None = None,
        sport: int = 41000,
    ) -> UdpFlow:
        """An established-style UDP flow from the client to ``server:port`` (see ``UdpFlow``)."""
        fam, source = self._route(family, src)
        return UdpFlow(self, port=port, family=fam, src=source, sport=sport)


def _ready_check(lab: Lab, family: Family) -> Callable[[], bool]:
    return lambda: lab.probe("udp", 9, family=family, timeout=0.05).arrived


def _client_socket(
    ns: Netns, family: Family, kind: socket.SocketKind, src: str, sport: int
) -> socket.socket:
    sock = ns.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((src, sport))
    except BaseException:
        sock.close()
        raise
    return sock


def _receive(sock: socket.socket, token: bytes, timeout: float) -> tuple[Any, ...] | None:
    """The sender's address once ``token`` arrives on ``sock``, or None at the deadline.

    Anything else arriving meanwhile (a late datagram of an earlier probe) is skipped.
    """
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, peer = sock.recvfrom(2048)
        except TimeoutError:
            return None
        if data == token:
            return tuple(peer)
    return None


class UdpFlow:
    """One client socket on a fixed source port and one server socket that answers it.

    Every ``exchange()`` sends a datagram client -> server and the server replies from
    ``server:port`` to the client's address, so the kernel sees one long-lived bidirectional flow
    (one conntrack entry, once conntrack is active in the server namespace): what a softphone's
    SIP registration looks like. Close it (or use it as a context manager) when done.
    """

    def __init__(self, lab: Lab, *, port: int, family: Family, src: str, sport: int) -> None:
        self.family = family
        self.port = port
        self.sport = sport
        self.server_address = lab.addr.server(family)
        self.client_address = src
        self._server = lab.srv.socket(family, socket.SOCK_DGRAM)
        try:
            self._server.bind((self.server_address, port))
            self._client = _client_socket(
                lab.cli, family, socket.SOCK_DGRAM, self.client_address, sport
            )
        except BaseException:
            self._server.close()
            raise

    def __enter__(self) -> UdpFlow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()
        self._server.close()

    def exchange(self, timeout: float = PROBE_TIMEOUT) -> bool:
        """One request and its reply; True only if both legs arrived within ``timeout`` each."""
        request, reply = os.urandom(8), os.urandom(8)
        self._client.sendto(request, (self.server_address, self.port))
        peer = _receive(self._server, request, timeout)
        if peer is None:
            return False
        self._server.sendto(reply, peer)
        return _receive(self._client, reply, timeout) is not None

    def conntrack_args(self) -> tuple[str, ...]:
        """``conntrack -L`` filter arguments selecting this flow's entry in the server namespace."""
        return (
            "-f",
            "ipv4" if self.family == 4 else "ipv6",
            "-p",
            "udp",
            "--src",
            self.client_address,
            "--sport",
            str(self.sport),
            "--dport",
            str(self.port),
        )


class HostUdpFlow:
    """A UDP flow the *server* starts from ``server:port`` to ``client:HOST_PORT``.

    What Asterisk qualifying a registered phone looks like: the server's datagram makes the
    conntrack entry, so the client's answers to ``server:port`` travel in the reply direction.
    """

    def __init__(self, lab: Lab, family: Family, src: str, port: int = 5060) -> None:
        self.server = (lab.addr.server(family), port)
        self.client = (src, HOST_PORT)
        self._srv = lab.srv.socket(family, socket.SOCK_DGRAM)
        self._cli = lab.cli.socket(family, socket.SOCK_DGRAM)
        self._srv.bind(self.server)
        self._cli.bind(self.client)

    def __enter__(self) -> HostUdpFlow:
        return self

    def __exit__(self, *exc: object) -> None:
        self._srv.close()
        self._cli.close()

    def server_sends(self) -> bool:
        token = os.urandom(8)
        self._srv.sendto(token, self.client)
        return _receive(self._cli, token, PROBE_TIMEOUT) is not None

    def client_answers(self) -> bool:
        token = os.urandom(8)
        self._cli.sendto(token, self.server)
        return _receive(self._srv, token, PROBE_TIMEOUT) is not None


__all__ = [
    "ADDR",
    "HOST_PORT",
    "PROBE_TIMEOUT",
    "Addresses",
    "CommandFailed",
    "Family",
    "HostUdpFlow",
    "Lab",
    "Netns",
    "Probe",
    "Proto",
    "UdpFlow",
    "current_netns_inode",
    "family_of",
    "wait_until",
]
