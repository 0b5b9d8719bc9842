"""The local socket's listener: a Unix stream socket, peer credentials, the local policy.

Owns the socket file (created mode 0660, owned by root and the configured group, removed on
stop) and every connection's gate: the kernel's ``SO_PEERCRED``/``SO_PEERGROUPS`` for the peer
are checked against root + the group on every connection (defence in depth behind the file
mode), and changes are rate-limited per peer uid. Requests are then handed to ``LocalService``;
errors become the wire's refusals (``agent.local.wire``). It never answers before the check.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import socket
import socketserver
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from agent.config import AgentConfig, LocalConfig
from agent.engine import Engine
from agent.errors import AgentError, InvalidArgument, Unavailable
from agent.local.access import Peer, RateLimiter, authorize
from agent.local.service import LocalService
from agent.local.wire import (
    CHANGING_OPS,
    MAX_REQUEST_BYTES,
    decode_request,
    encode_error,
    encode_result,
)
from agent.rpc.service import Health
from agent.rules.shadowing import Shadow
from agent.rules.table import FirewallTable
from agent.serving import SupervisedServer, serving_thread
from agent.supervise import Supervision

log = logging.getLogger("vicifast-agent.local")
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python 3.11 lacks the name
_UCRED = struct.Struct("3i")
IDLE_TIMEOUT_S = 60.0
_MAX_GROUPS = 1024


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * _MAX_GROUPS)
        groups = struct.unpack(f"{len(raw) // 4}I", raw)
    except OSError:
        groups = ()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = ""
    return Peer(pid, uid, gid, tuple(groups), user)


def group_gid(name: str) -> int | None:
    """The configured group's gid; None (root only) when unset or unknown on this host."""
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        gate = self.server.gate
        self.connection.settimeout(IDLE_TIMEOUT_S)
        peer = peer_of(self.connection)
        try:
            authorize(peer, gate.gid())
        except AgentError as exc:
            log.warning("local socket: refused pid %d uid %d: %s", peer.pid, peer.uid, exc.reason)
            gate.observe("unknown", exc)  # the request of a refused peer is never parsed
            with contextlib.suppress(OSError):
                # Read the request first: closing with unread data would reset the connection
                # before the refusal could be read.
                self.rfile.readline(MAX_REQUEST_BYTES + 1)
                self._send(encode_error(exc))
            return
        with contextlib.suppress(OSError):
            while line := self.rfile.readline(MAX_REQUEST_BYTES + 1):
                self._send(self._answer(line, peer, gate))

    def _answer(self, line: bytes, peer: Peer, gate: _Gate) -> bytes:
        op = "unknown"
        try:
            if len(line) > MAX_REQUEST_BYTES:
                raise InvalidArgument("request_too_large", f"at most {MAX_REQUEST_BYTES} bytes")
            request = decode_request(line)
            op = request.op
            if request.op in CHANGING_OPS:
                gate.take(peer.uid)
            answer = encode_result(gate.service.handle(request, peer))
            gate.observe(op, None)
            return answer
        except AgentError as exc:
            gate.observe(op, exc)
            return encode_error(exc)
        except Exception as exc:  # a bug must not kill the listener; answer and log it
            log.exception("local request failed")
            failure = Unavailable("internal_error", type(exc).__name__)
            gate.observe(op, failure)
            return encode_error(failure)

    def _send(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()


# Told each answer's operation (``unknown`` when the request named none) and its error (None
# for a result) before the answer is sent: the metrics' ``local_requests``. Must not raise.
LocalObserver = Callable[[str, AgentError | None], None]


def _unobserved(op: str, error: AgentError | None) -> None:
    pass


class _Gate:
    """The local policy as configured now: read on every connection, so a reload applies."""

    def __init__(
        self,
        service: LocalService,
        config: Callable[[], LocalConfig],
        clock: Callable[[], float],
        observe: LocalObserver = _unobserved,
    ) -> None:
        self.service = service
        self.config = config
        self.clock = clock
        self.observe = observe
        self._lock = threading.Lock()
        self._limiter = RateLimiter(1, 1)
        self._limits = (0, 0)
        self._missing_group_logged = ""

    def gid(self) -> int | None:
        name = self.config().group
        gid = group_gid(name)
        if name and gid is None and name != self._missing_group_logged:
            self._missing_group_logged = name
            log.warning("[local] group %r does not exist: only root may use the local socket", name)
        return gid

    def take(self, uid: int) -> None:
        cfg = self.config()
        limits = (cfg.rate_limit_per_minute, cfg.rate_limit_burst)
        with self._lock:
            if limits != self._limits:
                self._limits = limits
                self._limiter = RateLimiter(*limits)
            self._limiter.take(uid, self.clock())


class _Server(socketserver.ThreadingMixIn, SupervisedServer, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, path: str, gate: _Gate) -> None:
        self.gate = gate
        self.path = path
        self.applied: LocalConfig | None = None
        super().__init__(path, _Handler, bind_and_activate=False)

    def service_actions(self) -> None:
        super().service_actions()  # the supervision's heartbeat (agent.serving)
        # Runs every poll interval of serve_forever: after a reload replaced the configuration,
        # give the socket file the new group, or its new members could not even connect.
        cfg = self.gate.config()
        if cfg is self.applied:
            return
        self.applied = cfg
        gid = self.gate.gid()
        with contextlib.suppress(OSError):
            if gid is not None or os.geteuid() == 0:
                os.chown(self.path, -1, gid or 0)

    def server_bind(self) -> None:
        # Created with no access for others from the first instant; chmod/chown follow.
        old = os.umask(0o177)
        try:
            super().server_bind()
        finally:
            os.umask(old)


class LocalServer:
    """The listener; the socket path is fixed at start, group and rate limit follow reloads."""

    def __init__(
        self,
        config: Callable[[], LocalConfig],
        service: LocalService,
        *,
        clock: Callable[[], float] = time.monotonic,
        supervision: Supervision | None = None,
        observe: LocalObserver = _unobserved,
    ) -> None:
        self.path = config().socket
        self.supervision = supervision
        self._gate = _Gate(service, config, clock, observe)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._inode: tuple[int, int] | None = None

    def start(self) -> None:
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        _remove_stale(self.path)
        server = _Server(str(self.path), self._gate)
        gid = self._gate.gid()
        try:
            server.server_bind()
            if gid is not None or os.geteuid() == 0:
                os.chown(self.path, -1, gid or 0)
            os.chmod(self.path, 0o660)
            server.server_activate()
        except OSError as exc:
            server.server_close()
            raise Unavailable("local_socket_failed", f"{self.path}: {exc.strerror}") from exc
        st = self.path.stat()
        self._inode = (st.st_dev, st.st_ino)
        server.applied = self._gate.config()
        self._server = server
        self._thread = serving_thread(server, "local", self.supervision)
        self._thread.start()
        log.info("local socket on %s (mode 0660, group %s)", self.path, gid or 0)

    def stop(self) -> None:
        """Stop accepting, remove the socket file (if it is still ours)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            st = self.path.stat()
            if (st.st_dev, st.st_ino) == self._inode:  # not a successor's socket
                self.path.unlink()
        self._server = None


class DaemonParts(Protocol):
    """What the local socket needs of the running daemon (``agent.daemon.Daemon``)."""

    cfg: AgentConfig
    config_path: Path
    engine: Engine
    table: FirewallTable

    def health(self) -> Health: ...

    def request_reload(self) -> AgentError | None: ...

    @property
    def shadowing(self) -> tuple[Shadow, ...]: ...


def serve_local(
    daemon: DaemonParts,
    supervision: Supervision | None = None,
    *,
    observe: LocalObserver = _unobserved,
) -> LocalServer:
    """Start the local socket of a running daemon (unless disabled); ``stop()`` it at shutdown.

    A socket that cannot be served (path taken by a live daemon, unwritable directory) is logged
    as an error and the daemon runs on without it: the gRPC API must not go down for it.

    Configuration is read from ``daemon.cfg`` on every connection, so a reload that replaces it
    changes the group, TTL cap and rate limit at once; the socket path needs a restart.
    ``observe`` is told every answer (the metrics count local requests like remote ones).
    """
    service = LocalService(
        daemon.engine,
        daemon.table,
        config=lambda: daemon.cfg,
        config_path=daemon.config_path,
        health=daemon.health,
        shadowing=lambda: daemon.shadowing,
        reload=daemon.request_reload,
        loops=lambda: _loops_json(supervision),
    )
    server = LocalServer(
        lambda: daemon.cfg.local, service, supervision=supervision, observe=observe
    )
    if daemon.cfg.local.enabled:
        try:
            server.start()
        except AgentError as exc:
            # The control plane's API matters more: run on without the local socket, loudly.
            log.error("no local socket: %s", exc.message, extra={"REASON": exc.reason})
    return server


def _remove_stale(path: Path) -> None:
    """A socket left by a previous run is removed; a live one or anything else is an error."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise Unavailable("local_socket_failed", f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: left behind by a previous run
            return
    raise Unavailable("local_socket_in_use", f"another process serves {path}")


def _loops_json(supervision: Supervision | None) -> dict[str, object]:
    """The supervised loops for ``status``: which are stalled, faults per loop since start."""
    if supervision is None:
        return {"stalled": [], "faults": {}}
    return {"stalled": list(supervision.stalled()), "faults": supervision.faults()}
