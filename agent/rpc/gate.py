"""The accept gate on the public API port: caps connections in total and per source.

Owns the listening TCP socket of ``[api] listen`` and the count of connections through it. It
must never read, parse or log what passes (TLS is end to end between the caller and gRPC; the
gate sees ciphertext only) and never log a source address.

Why a gate: grpcio accepts and handshakes connections itself, and the only cap gRPC core offers
(``grpc.max_allowed_incoming_connections``) counts connections in total, ignoring the peer; one
source could hold every slot. The kernel could count per source (an nftables ``ct count`` set),
but RULESET.md gives the agent's table no such rule, loopback is exempt there, and the table's
every element is compared against what the agent wrote. So gRPC listens on a Unix socket in a
private directory, and this gate accepts each TCP connection, admits it only under
``[api] max_connections`` and ``[api] max_connections_per_source`` (an IPv4 address, or an IPv6
/64: one host holds a whole /64), and relays its bytes to gRPC. A connection over a cap is
closed at once (a reset): it costs one accept and holds no descriptor. gRPC itself then bounds
how long a connection lives unauthenticated (``handshake_timeout_s``), idle
(``max_connection_idle_s``) or at all (``max_connection_age_s``); when it closes its side, the
gate closes the caller's.

A connection reaches gRPC only once it sends its first byte; until then it costs one descriptor
and a timer of the gate's, which resets it after ``handshake_timeout_s`` as gRPC would (an idle
flood never touches gRPC). A relayed connection takes three descriptors (the caller's socket
and both ends of the Unix pair); the unit's ``LimitNOFILE`` is sized from that. An accept that
fails for want of descriptors is retried by asyncio a moment later: it delays connections, it
kills no loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import resource
import socket
import struct
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Protocol

from agent.errors import ConfigError
from agent.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 1024
ACCEPT_BATCH = 16
ACCEPT_RETRY_S = 0.5
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# Lines about refused connections and failed handshakes: a burst, then this many a minute.
LOG_PER_MINUTE = 30
LOG_BURST = 10
# gRPC's handshake deadline and our clock are read apart: a close this near it is the timeout.
HANDSHAKE_SLACK_S = 0.5
# A loaded loop may see gRPC's close late; still well under max_connection_idle_s (60 s at
# least, handshake_timeout_s 30 s at most), so an idle close never counts as a handshake.
HANDSHAKE_LATE_S = 10.0
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


# Descriptors per admitted connection: the caller's socket and both ends of the Unix pair.
FDS_PER_CONNECTION = 3
# Descriptors kept for everything else: SQLite, netlink, libnftables, the local socket and its
# clients, the metrics listener and its scrapes, gRPC's own (epoll, wakeup pipes, listener).
FDS_RESERVED = 1024


def descriptors_needed(max_connections: int) -> int:
    return FDS_PER_CONNECTION * max_connections + FDS_RESERVED


def ensure_descriptors(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one if the caps need it; return the limit.

    Raises ``ConfigError`` (``api.max_connections``) when even the hard limit is too small:
    caps that do not fit the descriptor limit would let a flood fail other loops' opens.
    """
    need = descriptors_needed(max_connections)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise ConfigError(
                "api.max_connections",
                f"{max_connections} connections need {need} descriptors and the process may "
                f"open {hard} (LimitNOFILE): lower max_connections or raise LimitNOFILE",
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def source_key(peer: str) -> str:
    """What the per-source cap counts: the IPv4 address, or the IPv6 address's /64.

    An IPv4-mapped IPv6 peer (a dual-stack listener's view of an IPv4 caller) is its IPv4
    address.
    """
    try:
        addr = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return peer
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class TransportObserver(Protocol):
    """Who counts what the gate refused and which handshakes failed (the metrics)."""

    def connection_refused(self, reason: str) -> None: ...

    def handshake_failed(self, reason: str) -> None: ...


class NoObserver:
    def connection_refused(self, reason: str) -> None:
        pass

    def handshake_failed(self, reason: str) -> None:
        pass


@dataclass(frozen=True, slots=True)
class GateLimits:
    max_connections: int
    max_connections_per_source: int
    handshake_timeout_s: float


class GateCounts:
    """Open connections, in total and by source key; pure bookkeeping, loop thread only."""

    def __init__(self, limits: GateLimits) -> None:
        self.limits = limits
        self.total = 0
        self.by_source: Counter[str] = Counter()

    def admit(self, key: str) -> str | None:
        """None when admitted (and counted), else the reason word of the refusal."""
        if self.total >= self.limits.max_connections:
            return "too_many_connections"
        if self.by_source[key] >= self.limits.max_connections_per_source:
            return "too_many_connections_from_source"
        self.total += 1
        self.by_source[key] += 1
        return None

    def release(self, key: str) -> None:
        self.total -= 1
        self.by_source[key] -= 1
        if self.by_source[key] <= 0:
            del self.by_source[key]


class _Side(asyncio.Protocol):
    """One socket of a relayed pair; what it reads goes to its partner's transport."""

    def __init__(self, on_lost: Callable[[], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.partner: _Side | None = None
        self._pending: list[bytes] = []
        self._eof = False
        self._on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def pair(self, partner: _Side) -> None:
        self.partner = partner
        assert partner.transport is not None
        for chunk in self._pending:
            partner.transport.write(chunk)
        self._pending.clear()
        if self._eof and partner.transport.can_write_eof():
            partner.transport.write_eof()

    def data_received(self, data: bytes) -> None:
        if self.partner is None or self.partner.transport is None:
            self._pending.append(data)  # a TLS ClientHello before gRPC's side is connected
            return
        self.partner.transport.write(data)

    def eof_received(self) -> bool:
        self._eof = True
        partner = self.partner.transport if self.partner is not None else None
        if partner is not None and not partner.is_closing() and partner.can_write_eof():
            partner.write_eof()
        return True  # half-close: the other direction may still carry the answer

    # Back-pressure: a side whose outgoing buffer is full stops its partner reading.
    def pause_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.close()


@dataclass(slots=True)
class _Waiting:
    """An admitted connection that has sent nothing yet."""

    conn: socket.socket
    key: str
    timer: asyncio.TimerHandle | None = None


class _Backend(_Side):
    """gRPC's side. gRPC ends a connection whole (HTTP/2 GOAWAY, handshake timeout), never
    half: its end of file ends the caller's connection too, once what it sent is flushed."""

    def __init__(self, gate: ConnectionGate) -> None:
        super().__init__(lambda: None)
        self.gate = gate

    def eof_received(self) -> bool:
        partner = self.partner
        if isinstance(partner, _Inbound):
            self.gate.backend_closed(partner)
        if partner is not None and partner.transport is not None:
            partner.transport.close()  # writes what is buffered, then closes
        return False  # and this side closes itself


class ConnectionGate:
    """Accepts on ``listen`` (HOST:PORT), relays admitted connections to ``backend`` (a Unix
    socket path where gRPC listens). Runs on the event loop it is started on."""

    def __init__(
        self,
        listen: str,
        backend: str,
        limits: GateLimits,
        *,
        observer: TransportObserver | None = None,
    ) -> None:
        self.counts = GateCounts(limits)
        self._backend = backend
        self._observer = observer or NoObserver()
        self._log = RateLimitedLog(log, per_minute=LOG_PER_MINUTE, burst=LOG_BURST)
        self._stopping = False
        self._sock = _listening_socket(listen)
        self.port: int = self._sock.getsockname()[1]
        self._accepting = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._open: set[asyncio.Transport] = set()
        self._expiring: deque[_Waiting] = deque()
        self._waiting: dict[int, _Waiting] = {}  # by descriptor: admitted, nothing sent yet

    async def start(self) -> None:
        self._sock.setblocking(False)
        self._accepting = True
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._accept_some)

    def _accept_some(self) -> None:
        """Accept a few connections per turn of the loop (a burst of a thousand in one turn
        would hold every call's answer meanwhile); refuse those over a cap on the bare socket,
        before any transport exists."""
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    # Out of descriptors or memory: the kernel keeps the queue meanwhile, and
                    # this waits a moment instead of spinning on a socket it cannot drain.
                    self._refused("out_of_descriptors")
                    loop.remove_reader(self._sock.fileno())
                    loop.call_later(ACCEPT_RETRY_S, self._resume)
                    return
                continue  # ECONNABORTED and the like: that caller is gone already
            key = source_key(str(peer[0])) if isinstance(peer, tuple) and peer else "?"
            refusal = self.counts.admit(key)
            if refusal is not None:
                self._refused(refusal)
                _reset_socket(conn)
                continue
            # gRPC sets this on the sockets it accepts; asyncio would only on sockets made
            # with proto=IPPROTO_TCP. Without it, Nagle and delayed ACKs add 40 ms to a call
            # now and then.
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Until its first byte a connection is a bare socket, a reader and a timer (an
            # idle flood costs no transport and never reaches gRPC); the timer ends it as
            # gRPC's handshake timeout would.
            conn.setblocking(False)
            fd = conn.fileno()
            waiting = _Waiting(conn, key)
            waiting.timer = loop.call_later(
                self.counts.limits.handshake_timeout_s, self._silent, waiting
            )
            self._waiting[fd] = waiting
            loop.add_reader(fd, self._first_bytes, fd)

    def _first_bytes(self, fd: int) -> None:
        """Readable (its first bytes, or its end): a transport, and gRPC at the first byte."""
        waiting = self._waiting.pop(fd, None)
        asyncio.get_running_loop().remove_reader(fd)
        if waiting is None:
            return
        if waiting.timer is not None:
            waiting.timer.cancel()
        self._spawn(self._admit(_Inbound(self, waiting.key), waiting.conn))

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    def _resume(self) -> None:
        if self._accepting:
            asyncio.get_running_loop().add_reader(self._sock.fileno(), self._accept_some)

    async def _admit(self, side: _Inbound, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: side, conn)
        except OSError:
            conn.close()
            self.counts.release(side.key)

    def admitted(self, side: _Inbound, transport: asyncio.Transport) -> None:
        self._open.add(transport)

    def hand_over(self, side: _Inbound, transport: asyncio.Transport) -> None:
        """The caller sent its first bytes: connect gRPC's side (reading waits for it)."""
        transport.pause_reading()
        self._spawn(self._connect_backend(side, transport))

    def _silent(self, waiting: _Waiting) -> None:
        # A flood's connections come, and so time out, together: they are reset a few per
        # turn of the loop, so that calls in between are still answered promptly.
        self._expiring.append(waiting)
        if len(self._expiring) == 1:
            asyncio.get_running_loop().call_soon(self._expire_some)

    def _expire_some(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(min(ACCEPT_BATCH, len(self._expiring))):
            waiting = self._expiring.popleft()
            fd = waiting.conn.fileno()
            if fd < 0 or self._waiting.get(fd) is not waiting:
                continue  # its first bytes came meanwhile
            del self._waiting[fd]
            loop.remove_reader(fd)
            self._handshake_failed("handshake_timeout")
            _reset_socket(waiting.conn)
            self.counts.release(waiting.key)
        if self._expiring:
            loop.call_soon(self._expire_some)

    async def _connect_backend(self, inbound: _Inbound, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, outbound = await loop.create_unix_connection(lambda: _Backend(self), self._backend)
        except OSError as exc:
            # EMFILE and friends: this one connection fails, the gate goes on.
            level = logging.WARNING if exc.errno in (errno.EMFILE, errno.ENFILE) else logging.ERROR
            word = errno.errorcode.get(exc.errno or 0, "error")
            self._log.emit(
                level,
                "backend_unreachable",
                "api: a connection could not be handed to gRPC (%s)",
                word,
                fields={"REASON": "backend_unreachable"},
            )
            self._observer.connection_refused("backend_unreachable")
            transport.close()
            return
        if transport.is_closing():
            assert outbound.transport is not None
            outbound.transport.close()
            return
        outbound.partner = inbound
        inbound.handed_at = time.monotonic()
        inbound.pair(outbound)
        outbound.pair(inbound)
        transport.resume_reading()

    def _refused(self, reason: str) -> None:
        self._observer.connection_refused(reason)
        self._log.emit(
            logging.WARNING,
            reason,
            "api: connection refused (%s: at most %d in all, %d per source)",
            reason,
            self.counts.limits.max_connections,
            self.counts.limits.max_connections_per_source,
            fields={"REASON": reason},
        )

    def backend_closed(self, inbound: _Inbound) -> None:
        """gRPC ended a connection the caller had not ended: within the handshake timeout,
        that is a handshake gRPC refused or gave up on (gRPC's Python API reports neither;
        gRPC closes an authenticated connection early only on a protocol error, and idle ones
        after ``max_connection_idle_s``, 60 s at least)."""
        if self._stopping or inbound.client_ended or inbound.handed_at is None:
            return
        limit = self.counts.limits.handshake_timeout_s
        lived = time.monotonic() - inbound.handed_at
        if lived > limit + HANDSHAKE_LATE_S:
            return
        self._handshake_failed(
            "handshake_timeout" if lived >= limit - HANDSHAKE_SLACK_S else "handshake_failed"
        )

    def _handshake_failed(self, reason: str) -> None:
        self._observer.handshake_failed(reason)
        self._log.emit(
            logging.INFO,
            # A budget per reason: a flood of refused handshakes does not hide the timeouts.
            f"handshake:{reason}",
            "api: TLS handshake %s",
            "timed out" if reason == "handshake_timeout" else "refused",
            fields={"REASON": reason},
        )

    def reload(self, limits: GateLimits) -> None:
        """New caps for new connections; open ones stay (loop thread)."""
        self.counts.limits = limits

    async def stop_accepting(self) -> None:
        self._stopping = True
        if self._accepting:
            self._accepting = False
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()

    def forget(self, transport: asyncio.BaseTransport) -> None:
        self._open.discard(transport)

    async def stop(self) -> None:
        """Stop accepting and close every relayed connection."""
        loop = asyncio.get_running_loop()
        for fd, waiting in list(self._waiting.items()):
            loop.remove_reader(fd)
            if waiting.timer is not None:
                waiting.timer.cancel()
            waiting.conn.close()
            self.counts.release(waiting.key)
        self._waiting.clear()
        for t in list(self._open):
            t.close()
        self._open.clear()


class _Inbound(_Side):
    """The caller's side."""

    def __init__(self, gate: ConnectionGate, key: str) -> None:
        super().__init__(lambda: gate.counts.release(key))
        self.gate = gate
        self.key = key
        self.connecting = False  # its first bytes came: gRPC's side is (being) connected
        self.handed_at: float | None = None
        self.client_ended = False

    def data_received(self, data: bytes) -> None:
        if not self.connecting and self.transport is not None:
            self.connecting = True
            self._pending.append(data)
            self.gate.hand_over(self, self.transport)
            return
        super().data_received(data)

    def eof_received(self) -> bool:
        self.client_ended = True
        if not self.connecting:
            return False  # nothing was sent, nothing to relay: close
        return super().eof_received()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, asyncio.Transport)
        self.gate.admitted(self, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.gate.forget(self.transport)
        super().connection_lost(exc)


def _reset_socket(conn: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): no FIN_WAIT/TIME_WAIT state kept for a refusal."""
    with contextlib.suppress(OSError):  # the peer is gone already: a close is as good
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    conn.close()


def _reset(transport: asyncio.Transport) -> None:
    """Close with a reset (SO_LINGER 0): no FIN_WAIT/TIME_WAIT state kept for a refusal."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # the peer is gone already: a close is as good
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


def _listening_socket(listen: str) -> socket.socket:
    """The API socket for ``listen``; ``[::]`` takes IPv4 too (dual stack), as gRPC did."""
    host, _, port_text = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    infos = socket.getaddrinfo(
        host or None, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, _, _, _, sockaddr = infos[0]
    dual = family == socket.AF_INET6 and sockaddr[0] == "::" and socket.has_dualstack_ipv6()
    return socket.create_server(
        sockaddr[:2], family=family, dualstack_ipv6=dual, backlog=LISTEN_BACKLOG
    )
