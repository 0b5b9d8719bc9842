"""The metrics HTTP(S) listener: ``GET /metrics`` from the daemon's own registry, nothing else.

Owns one listening socket (``[metrics] listen``) and its optional TLS. prometheus_client's
``start_http_server`` is not used as is because it wraps the listening socket, so one client
that stalls in the handshake blocks every other scrape, and its TLS context cannot be replaced
on reload. Here each connection is accepted, given a timeout and handshaken in its own thread,
and a reload swaps in a new context for new connections. It never serves anything but the
exposition of the registry it was given.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

from agent.config import MetricsConfig
from agent.errors import ConfigError
from agent.serving import SupervisedServer, serving_thread
from agent.supervise import Supervision

log = logging.getLogger(__name__)
CONNECTION_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path
    key: Path

    @staticmethod
    def of(cfg: MetricsConfig) -> TlsFiles | None:
        if cfg.tls_cert is None or cfg.tls_key is None:
            return None
        return TlsFiles(cfg.tls_cert, cfg.tls_key)

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        for key, path in (("metrics.tls_cert", self.cert), ("metrics.tls_key", self.key)):
            try:  # ssl's own errors do not say which file it could not open
                path.open("rb").close()
            except OSError as exc:
                raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from exc
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                "metrics.tls_cert",
                f"{self.cert} and {self.key} are not a PEM certificate and its private key "
                f"({getattr(exc, 'reason', None) or exc})",
            ) from exc
        return ctx


class _Handler(WSGIRequestHandler):
    timeout = CONNECTION_TIMEOUT_S

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # the base class's names
        pass  # scrapes are routine; failures are visible to the scraper


class _Server(socketserver.ThreadingMixIn, SupervisedServer, WSGIServer):
    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host's FQDN (a DNS lookup that can hang in
        # a namespace without a resolver); the name is only used in WSGI's SERVER_NAME.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = self.socket.accept()
        conn.settimeout(CONNECTION_TIMEOUT_S)
        tls = self.tls
        if tls is not None:
            # The handshake happens in the request's thread (``_Handler.setup``).
            conn = tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Not the peer's address: no log line names an address (the privacy policy).
        log.debug("metrics: a scrape connection failed", exc_info=True)


def _address(listen: str) -> tuple[socket.AddressFamily, str, int]:
    host, _, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        infos = socket.getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError("metrics.listen", f"cannot resolve {host!r}: {exc.strerror}") from exc
    family, _, _, _, sockaddr = infos[0]
    return family, str(sockaddr[0]), int(sockaddr[1])


class MetricsListener:
    """Serves ``registry`` on ``cfg.listen`` (HTTPS when ``tls_cert``/``tls_key`` are set)."""

    def __init__(
        self,
        cfg: MetricsConfig,
        registry: CollectorRegistry,
        supervision: Supervision | None = None,
    ) -> None:
        self.listen = cfg.listen
        tls = TlsFiles.of(cfg)
        context = tls.context() if tls else None
        family, host, port = _address(cfg.listen)

        class Server(_Server):
            address_family = family

        try:
            self._server = Server((host, port), _Handler, bind_and_activate=True)
        except OSError as exc:
            raise ConfigError(
                "metrics.listen", f"cannot listen on {cfg.listen}: {exc.strerror}"
            ) from exc
        self._server.tls = context
        self._server.set_app(make_wsgi_app(registry))
        self.port = int(self._server.server_address[1])
        self._thread = serving_thread(self._server, "metrics", supervision)

    @property
    def tls(self) -> bool:
        return self._server.tls is not None

    def start(self) -> None:
        self._thread.start()

    def reload(self, cfg: MetricsConfig) -> None:
        """New TLS material for new connections; raise ``ConfigError`` and keep the old if it
        is unusable. The address and whether TLS is on are fixed until restart."""
        tls = TlsFiles.of(cfg)
        if cfg.listen != self.listen or (tls is not None) != self.tls:
            log.warning("metrics.listen and metrics TLS on/off take effect at the next restart")
        if tls is not None and self.tls:
            self._server.tls = tls.context()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
