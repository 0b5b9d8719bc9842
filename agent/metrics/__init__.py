"""Prometheus metrics of the daemon, in its own registry, on their own listener.

Owns the metric names (all ``vicifast_agent_*``, besides the standard ``process_*`` of
prometheus_client's process collector), the registry and the listener. The registry is built by
``AgentMetrics`` when the daemon starts, never at import time, so nothing lands in
prometheus_client's global registry and a test can build as many as it likes. No ``_created``
series are exported: they double every counter and histogram and say only when the process
started, which ``process_start_time_seconds`` already says. The metrics read
the daemon only through ``MetricsSource`` and ``CounterSource`` at scrape time, and are moved by
the gRPC interceptor and the ``NftAdapter`` observer; they never change the daemon's state.

Wiring (agent.daemon)::

    metrics = start_metrics(cfg, daemon, nft=table.nft, nft_version=features.nft_version)
    AgentServer(cfg, service, interceptors=[metrics.interceptor])
    serve_local(daemon, observe=metrics.requests.record_local)
    ...  metrics.reload(cfg)  ...  metrics.stop()
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, disable_created_metrics

from agent import __version__
from agent.config import AgentConfig
from agent.metrics.collectors import (
    BuildInfoCollector,
    CertificateCollector,
    CertificateExpiry,
    DropCollector,
    MemoryLimitCollector,
    ProcessFigures,
    StateCollector,
)
from agent.metrics.http import MetricsListener
from agent.metrics.instruments import (
    KernelMetrics,
    RequestInterceptor,
    RequestMetrics,
    TransportMetrics,
    served_rpcs,
)
from agent.metrics.source import CounterSource, MetricsSource, SourceStatus
from agent.rules.counters import NamedCounterReader
from agent.rules.nft import NftAdapter
from agent.supervise import Supervision

__all__ = ["AgentMetrics", "CounterSource", "MetricsSource", "SourceStatus", "start_metrics"]


def build_registry(
    cfg: AgentConfig, source: MetricsSource, counters: CounterSource, *, nft_version: str
) -> tuple[CollectorRegistry, StateCollector, DropCollector, CertificateCollector]:
    disable_created_metrics()  # type: ignore[no-untyped-call]  # process-wide switch
    registry = CollectorRegistry(auto_describe=False)  # registering never runs a collector
    state = StateCollector(source, cfg.firewall)
    drops = DropCollector(counters, cfg.firewall)
    certificates = CertificateCollector(CertificateExpiry.of_config(cfg))
    for collector in (
        state,
        drops,
        certificates,
        MemoryLimitCollector(),
        BuildInfoCollector(__version__, platform.python_version(), nft_version),
    ):
        registry.register(collector)
    # process_resident_memory_bytes, process_open_fds, process_max_fds, ... of this process
    ProcessFigures(registry=registry)
    return registry, state, drops, certificates


class AgentMetrics:
    """The daemon's registry, its instruments and its listener (bound at construction)."""

    def __init__(
        self,
        cfg: AgentConfig,
        source: MetricsSource,
        counters: CounterSource,
        *,
        nft_version: str,
        supervision: Supervision | None = None,
    ) -> None:
        self.registry, self._state, self._drops, self._certificates = build_registry(
            cfg, source, counters, nft_version=nft_version
        )
        self.counters = counters
        self.requests = RequestMetrics(self.registry, served_rpcs(reflection=cfg.api.reflection))
        self.kernel = KernelMetrics(self.registry)
        self.transport = TransportMetrics(self.registry)
        self.interceptor = RequestInterceptor(self.requests)
        self.listener = MetricsListener(cfg.metrics, self.registry, supervision)

    def start(self) -> None:
        self.listener.start()

    def reload(self, cfg: AgentConfig) -> None:
        """Take a validated new configuration; raise ``ConfigError`` (keeping the old TLS
        material) when the metrics certificate cannot be loaded."""
        self.listener.reload(cfg.metrics)
        self._state.firewall = cfg.firewall
        self._drops.firewall = cfg.firewall
        self._certificates.update(CertificateExpiry.of_config(cfg))

    def stop(self) -> None:
        self.listener.stop()
        self.counters.close()


def start_metrics(
    cfg: AgentConfig,
    source: MetricsSource,
    *,
    nft: NftAdapter,
    nft_version: str,
    supervision: Supervision | None = None,
) -> AgentMetrics:
    """Build the daemon's metrics, observe ``nft``'s transactions and start the listener.

    Call in the daemon's network namespace: the counter reader's netlink socket stays in the
    namespace it was opened in. Raises ``ConfigError`` (metrics.listen, metrics.tls_*) when the
    listener cannot be set up.
    """
    reader = NamedCounterReader(cfg.firewall.table)
    try:
        metrics = AgentMetrics(
            cfg, source, reader, nft_version=nft_version, supervision=supervision
        )
    except BaseException:
        reader.close()
        raise
    nft.observe = metrics.kernel.observe
    metrics.start()
    return metrics
