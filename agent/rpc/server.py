"""The gRPC listener: mutual TLS, caller check, health, optional reflection, limits, reload.

Owns the transport. TLS material is read from disk and checked (``agent.preflight.verify_tls``)
at start and on ``reload``; grpcio's dynamic
server credentials ask ``_fetch`` on every new handshake, so new connections use new material
while the listener and established connections stay up. gRPC core negotiates TLS 1.2 at least
(1.3 preferred); the minimum is not configurable from Python and not lowered anywhere.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agent.config import AgentConfig, ApiConfig
from agent.errors import AgentError, ConfigError
from agent.preflight import verify_tls
from agent.rpc.gate import (
    ConnectionGate,
    GateLimits,
    NoObserver,
    TransportObserver,
    ensure_descriptors,
)
from agent.rpc.pb import agent_pb2
from agent.rpc.service import TRANSPORT_SLACK_BYTES as SLACK
from agent.rpc.service import CallNotes, Context, FirewallAgentService, add_to_server
from agent.rpc.status import abort
from agent.supervise import HEARTBEAT_S, Supervision

log = logging.getLogger(__name__)
T = TypeVar("T")
# Calls in flight when a connection reaches max_connection_age get this long to finish.
CONNECTION_AGE_GRACE_S = 30
# A keepalive ping unanswered this long closes the connection (a peer that vanished).
KEEPALIVE_TIMEOUT_S = 20


def gate_limits(api: ApiConfig) -> GateLimits:
    return GateLimits(api.max_connections, api.max_connections_per_source, api.handshake_timeout_s)


SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["FirewallAgent"].full_name


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes

    @staticmethod
    def load(cfg: AgentConfig) -> TlsMaterial:
        def read(key: str, path: Path) -> bytes:
            try:
                return path.read_bytes()
            except OSError as exc:
                raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from exc

        material = TlsMaterial(
            cert_chain=read("api.server_cert", cfg.api.server_cert),
            private_key=read("api.server_key", cfg.api.server_key),
            client_ca=read("api.client_ca", cfg.api.client_ca),
        )
        # Parsed and matched here, at start and on reload alike: gRPC core would only fail at
        # the first handshake, long after a reload said it had worked.
        verify_tls(material.cert_chain, material.private_key, material.client_ca)
        return material

    def grpc_config(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.private_key, self.cert_chain)], root_certificates=self.client_ca
        )


class GuardedHealth(health_aio.HealthServicer):  # type: ignore[misc]  # no stubs for grpc_health's asyncio servicer
    """Standard health service behind the same caller check as the agent's own RPCs."""

    def __init__(self, service: FirewallAgentService) -> None:
        super().__init__()
        self._service = service

    async def _identify(self, context: Context) -> None:
        try:
            self._service.settings.callers.identify(context)
        except AgentError as exc:
            self._service.refused("Health", exc, context, CallNotes())
            await abort(context, exc)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        await self._identify(context)
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Context) -> None:
        await self._identify(context)
        # A stream that stays open: it takes a watcher's slot, never another RPC's capacity.
        watchers = self._service.watchers
        try:
            watcher = watchers.enter(0)
        except AgentError as exc:
            await abort(context, exc)
        try:
            await super().Watch(request, context)
        finally:
            watchers.leave(watcher)


class AgentServer:
    """grpcio's asyncio server on an event loop of its own thread (``grpc``).

    Handlers are coroutines: a call waiting for the engine's writer holds no thread, and the
    loop goes on reading, verifying and answering other calls meanwhile. The daemon's thread
    drives it through ``start``, ``reload`` and ``stop``, which are plain blocking calls.
    """

    def __init__(
        self,
        cfg: AgentConfig,
        service: FirewallAgentService,
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]] = (),
        material: TlsMaterial | None = None,
        observer: TransportObserver | None = None,
    ) -> None:
        self.service = service
        self._observer = observer or NoObserver()
        # The daemon passes what it loaded and checked before it first touched the kernel.
        self._material = material if material is not None else TlsMaterial.load(cfg)
        self._fresh: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc", daemon=True)
        self._thread.start()
        try:
            self.port = self._on_loop(self._build(cfg, interceptors))
        except BaseException:
            self._close_loop()
            raise

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _build(
        self, cfg: AgentConfig, interceptors: Sequence[grpc.aio.ServerInterceptor[Any, Any]]
    ) -> int:
        api = cfg.api
        ensure_descriptors(api.max_connections)
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", api.max_message_bytes + SLACK),
                ("grpc.max_send_message_length", api.max_message_bytes),
                ("grpc.so_reuseport", 0),
                # The lifetime bounds of a connection (the gate bounds their number).
                ("grpc.server_handshake_timeout_ms", api.handshake_timeout_s * 1000),
                ("grpc.max_connection_idle_ms", api.max_connection_idle_s * 1000),
                ("grpc.max_connection_age_ms", api.max_connection_age_s * 1000),
                ("grpc.max_connection_age_grace_ms", CONNECTION_AGE_GRACE_S * 1000),
                ("grpc.keepalive_time_ms", api.keepalive_s * 1000),
                ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
                # Behind the gate, a backstop: never more connections than the gate admits.
                ("grpc.max_allowed_incoming_connections", api.max_connections),
            ],
            # Watch streams have their own cap, enforced by the handlers (too_many_watchers);
            # gRPC's counts every call, so it holds both and watchers cannot eat the rest.
            maximum_concurrent_rpcs=cfg.api.max_concurrent_rpcs + cfg.api.max_watchers,
            interceptors=list(interceptors),  # observers only (metrics); they never change a call
        )
        self.service.bind(asyncio.get_running_loop())
        # Signed RPCs decode malformed and over-size envelopes too, answering with reason words.
        add_to_server(self.service, self._server, cfg.api.max_message_bytes)
        self.health = GuardedHealth(self.service)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if cfg.api.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
            )
        creds = grpc.dynamic_ssl_server_credentials(
            self._material.grpc_config(),
            self._fetch,  # type: ignore[arg-type]  # grpc documents None as "no change"
            require_client_authentication=True,
        )
        # gRPC listens on a Unix socket only this process can reach; the gate owns the port.
        self._private = Path(tempfile.mkdtemp(prefix="vicifast-agent-grpc-"))
        backend = self._private / "grpc.sock"
        try:
            bound = self._server.add_secure_port(f"unix:{backend}", creds)
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise ConfigError("api.listen", f"cannot open gRPC's private socket in {self._private}")
        try:
            self.gate = ConnectionGate(
                api.listen, str(backend), gate_limits(api), observer=self._observer
            )
        except OSError as exc:
            raise ConfigError(
                "api.listen", f"cannot listen on {api.listen}: {exc.strerror}"
            ) from exc
        return self.gate.port

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC core on each new handshake: None keeps the current material.
        with self._lock:
            fresh, self._fresh = self._fresh, None
        return fresh

    def start(self) -> None:
        self._on_loop(self._start())

    def open_connections(self) -> int:
        """Connections the gate holds now (a scrape's read of a counter the loop moves)."""
        return self.gate.counts.total

    async def _start(self) -> None:
        await self._server.start()
        await self.gate.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def supervise(self, supervision: Supervision) -> None:
        """Make the event loop a supervised loop ("grpc"): a callback beats every HEARTBEAT_S
        (a loop blocked by a stuck call stops beating), and exceptions the loop catches in
        callbacks and tasks are counted and logged as its faults."""

        def beat() -> None:
            if self._loop.is_closed():
                return
            self._loop.call_later(HEARTBEAT_S, beat)  # first: a failing checkpoint must not
            try:  # end the heartbeat for good
                supervision.checkpoint("grpc")
            except Exception as exc:  # noqa: BLE001  # counted like any fault of the loop
                supervision.fault("grpc", exc)
                return
            supervision.beat("grpc")

        def caught(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if isinstance(exc, Exception):
                supervision.fault("grpc", exc)
            else:  # a warning without an exception (an unclosed transport): as asyncio would
                loop.default_exception_handler(context)

        supervision.watch("grpc")
        self._loop.call_soon_threadsafe(self._loop.set_exception_handler, caught)
        self._loop.call_soon_threadsafe(beat)

    def reload(self, cfg: AgentConfig, *, material: TlsMaterial | None = None) -> None:
        """Re-read certificate, key and client CA for new handshakes; raise ``ConfigError``
        (keeping the current material) if they cannot be read, parsed or do not match."""
        material = TlsMaterial.load(cfg) if material is None else material
        self._loop.call_soon_threadsafe(self.gate.reload, gate_limits(cfg.api))
        with self._lock:
            if material != self._material:
                self._material = material
                self._fresh = material.grpc_config()

    def stop(self, grace: float) -> None:
        """Refuse new calls, let in-flight ones finish within ``grace`` seconds."""
        if self._loop.is_closed():
            return
        self._on_loop(self._stop(grace))
        self._close_loop()

    async def _stop(self, grace: float) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.service.stop()
        await self.gate.stop_accepting()
        await self._server.stop(grace)
        await self.gate.stop()
        self.service.close()
        shutil.rmtree(self._private, ignore_errors=True)

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
