"""The gRPC listener: mutual TLS, caller check, health, optional reflection, limits, reload.

Owns the transport. TLS material is read from disk at start and on ``reload``; grpcio's dynamic
server credentials ask ``_fetch`` on every new handshake, so new connections use new material
while the listener and established connections stay up. gRPC core negotiates TLS 1.2 at least
(1.3 preferred); the minimum is not configurable from Python and not lowered anywhere.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agent.config import AgentConfig
from agent.errors import AgentError, ConfigError
from agent.rpc.pb import agent_pb2
from agent.rpc.service import TRANSPORT_SLACK_BYTES as SLACK
from agent.rpc.service import FirewallAgentService, add_to_server
from agent.rpc.status import abort

log = logging.getLogger(__name__)

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


class GuardedHealth(health.HealthServicer):
    """Standard health service behind the same caller check as the agent's own RPCs."""

    def __init__(self, service: FirewallAgentService) -> None:
        super().__init__()
        self._service = service

    def _identify(self, context: grpc.ServicerContext) -> None:
        try:
            self._service.settings.callers.identify(context)
        except AgentError as exc:
            abort(context, exc)

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self._identify(context)
        return super().Check(request, context)

    def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: Callable[..., Any] | None = None,
    ) -> Iterator[health_pb2.HealthCheckResponse]:
        self._identify(context)
        return super().Watch(request, context, send_response_callback)  # type: ignore[no-any-return]


class AgentServer:
    def __init__(
        self,
        cfg: AgentConfig,
        service: FirewallAgentService,
        *,
        interceptors: Sequence[grpc.ServerInterceptor[Any, Any]] = (),
    ) -> None:
        self.service = service
        self._material = TlsMaterial.load(cfg)
        self._fresh: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=64, thread_name_prefix="rpc"),
            options=[
                ("grpc.max_receive_message_length", cfg.api.max_message_bytes + SLACK),
                ("grpc.max_send_message_length", cfg.api.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=cfg.api.max_concurrent_rpcs,
            interceptors=list(interceptors),  # observers only (metrics); they never change a call
        )
        # Signed RPCs decode malformed and over-size envelopes too, answering with reason words.
        add_to_server(service, self._server, cfg.api.max_message_bytes)
        self.health = GuardedHealth(service)
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
        self.port = self._server.add_secure_port(cfg.api.listen, creds)
        if self.port == 0:
            raise ConfigError("api.listen", f"cannot listen on {cfg.api.listen}")

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC core on each new handshake: None keeps the current material.
        with self._lock:
            fresh, self._fresh = self._fresh, None
        return fresh

    def start(self) -> None:
        self._server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def reload(self, cfg: AgentConfig) -> None:
        """Re-read certificate, key and client CA for new handshakes; raise if unreadable."""
        material = TlsMaterial.load(cfg)
        with self._lock:
            if material != self._material:
                self._material = material
                self._fresh = material.grpc_config()

    def stop(self, grace: float) -> None:
        """Refuse new calls, let in-flight ones finish within ``grace`` seconds."""
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.service.stopping.set()
        self._server.stop(grace).wait()
