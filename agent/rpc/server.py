"""The gRPC listener: mutual TLS, caller check, health, optional reflection, limits, reload.

Owns the transport. TLS material is read from disk at start and on ``reload``; grpcio's dynamic
server credentials ask ``_fetch`` on every new handshake, so new connections use new material
while the listener and established connections stay up. gRPC core negotiates TLS 1.2 at least
(1.3 preferred); the minimum is not configurable from Python and not lowered anywhere.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agent.config import AgentConfig
from agent.errors import AgentError, ConfigError
from agent.rpc.pb import agent_pb2
from agent.rpc.service import TRANSPORT_SLACK_BYTES as SLACK
from agent.rpc.service import Context, FirewallAgentService, add_to_server
from agent.rpc.status import abort
from agent.supervise import HEARTBEAT_S, Supervision

log = logging.getLogger(__name__)
T = TypeVar("T")

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

        return TlsMaterial(
            cert_chain=read("api.server_cert", cfg.api.server_cert),
            private_key=read("api.server_key", cfg.api.server_key),
            client_ca=read("api.client_ca", cfg.api.client_ca),
        )

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
            await abort(context, exc)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        await self._identify(context)
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Context) -> None:
        await self._identify(context)
        await super().Watch(request, context)


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
    ) -> None:
        self.service = service
        self._material = TlsMaterial.load(cfg)
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
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.api.max_message_bytes + SLACK),
                ("grpc.max_send_message_length", cfg.api.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=cfg.api.max_concurrent_rpcs,
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
        try:
            port = self._server.add_secure_port(cfg.api.listen, creds)
        except RuntimeError:
            port = 0
        if port == 0:
            raise ConfigError("api.listen", f"cannot listen on {cfg.api.listen}")
        return port

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC core on each new handshake: None keeps the current material.
        with self._lock:
            fresh, self._fresh = self._fresh, None
        return fresh

    def start(self) -> None:
        self._on_loop(self._start())

    async def _start(self) -> None:
        await self._server.start()
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

    def reload(self, cfg: AgentConfig) -> None:
        """Re-read certificate, key and client CA for new handshakes; raise if unreadable."""
        material = TlsMaterial.load(cfg)
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
        await self._server.stop(grace)
        self.service.close()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
