"""Event-driven metrics: gRPC and local-socket requests, and kernel transactions.

Owns the counters and histograms that are moved as things happen, all in the registry handed in.
It observes outcomes and never changes them: the interceptor passes every call, result and
status through untouched (the handler's context only counts an ``abort`` before sending it), and
the kernel and local-socket observers only record what ``NftAdapter`` and the local listener
report.

Every label value the daemon can know in advance (each served RPC and status code, each local
operation, each authentication and kernel failure reason) exists at 0 from the start: a series
that appeared only at its first increment would hide that increment from ``increase()`` and
``rate()``, and an alert on the first failure would never fire.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agent.errors import AgentError, ErrorKind
from agent.local.wire import OPS
from agent.metrics.collectors import PREFIX
from agent.rpc.pb import agent_pb2
from agent.rpc.status import CODES
from agent.rules.nft import FAILURE_REASONS

# Codes whose refusals are authentication failures (PROTOCOL.md "Errors").
AUTH_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
AUTH_KINDS = frozenset({ErrorKind.UNAUTHENTICATED, ErrorKind.PERMISSION_DENIED})
# Every reason word the agent refuses a caller with (UNAUTHENTICATED or PERMISSION_DENIED);
# tests/unit/test_metrics_series.py checks this against the code that raises them.
AUTH_REASONS = (
    # the gRPC API: transport identity (agent.rpc.auth), envelope and header (agent.rpc.envelope)
    "no_client_certificate",
    "caller_not_allowed",
    "malformed_envelope",
    "unknown_key",
    "bad_signature",
    "wrong_agent",
    "invalid_window",
    "window_too_long",
    "request_not_yet_valid",
    "request_expired",
    # the store was recovered from a damaged database (agent.rpc.service)
    "issued_before_recovery",
    # the local socket (agent.local.access)
    "local_peer_not_allowed",
    "local_root_only",
    # a refusal whose message starts with no reason word (grpc's own)
    "other",
)
# The local socket's ``op`` label: its operations, and ``unknown`` for a request that named none
# of them (undecodable, unknown op, or from a peer refused before its request was read).
LOCAL_OPS = (*OPS, "unknown")
# What a local answer can be: OK, or the code of an error kind (agent.rpc.status's one mapping).
LOCAL_CODES = ("OK", *sorted({code.name for code in CODES.values()}))
# Reason words are code constants (agent.errors); anything else becomes "other", so a label can
# never take an unbounded set of values from message text.
_REASON = re.compile(r"[a-z][a-z0-9_]{0,63}")
KERNEL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


def rpc_name(method: str) -> str:
    """``/vicifast.agent.v1.FirewallAgent/Allow`` -> ``Allow``; health -> ``Health.Check``.

    The agent's own RPCs keep their bare names; other services' methods carry the service's
    short name so that the health check's ``Check`` cannot be confused with an agent RPC.
    """
    service, _, name = method.rpartition("/")
    short = service.rpartition(".")[2]
    return name if short == "FirewallAgent" else f"{short}.{name}"


@dataclass(frozen=True, slots=True)
class ServedRpc:
    """One method the gRPC server registers: its ``rpc`` label and whether it is timed."""

    name: str
    timed: bool  # a single answer (unary or client-streaming); streams are counted, not timed


def served_rpcs(*, reflection: bool) -> tuple[ServedRpc, ...]:
    """The methods the daemon's gRPC server serves (agent.rpc.server), from their descriptors:
    the agent's service, the health service, and reflection when ``[api] reflection`` is on."""
    services = [
        agent_pb2.DESCRIPTOR.services_by_name["FirewallAgent"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
    ]
    if reflection:
        services.append(reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"])
    return tuple(
        ServedRpc(rpc_name(f"/{service.full_name}/{method.name}"), not method.server_streaming)
        for service in services
        for method in service.methods
    )


def reason_word(details: str | bytes | None) -> str:
    """The first word of a status message (the agent's reason word), or ``other``."""
    text = details.decode(errors="replace") if isinstance(details, bytes) else details or ""
    first = re.split(r"[:\s]", text.strip(), maxsplit=1)[0]
    return first if _REASON.fullmatch(first) else "other"


class RequestMetrics:
    """Requests by RPC and code, durations by RPC, authentication failures by reason; local
    socket requests by operation and code (the same code names as gRPC's)."""

    def __init__(
        self, registry: CollectorRegistry, rpcs: tuple[ServedRpc, ...] | None = None
    ) -> None:
        self.requests = Counter(
            PREFIX + "requests",
            "gRPC requests answered, by RPC and gRPC status code.",
            ["rpc", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            PREFIX + "request_duration_seconds",
            "Time to answer a unary gRPC request, by RPC (streams are not timed).",
            ["rpc"],
            registry=registry,
        )
        self.auth_failures = Counter(
            PREFIX + "auth_failures",
            "Requests refused as UNAUTHENTICATED or PERMISSION_DENIED, by reason word.",
            ["reason"],
            registry=registry,
        )
        self.local_requests = Counter(
            PREFIX + "local_requests",
            "Local socket requests answered, by operation and outcome (gRPC's code names).",
            ["op", "code"],
            registry=registry,
        )
        for rpc in served_rpcs(reflection=False) if rpcs is None else rpcs:
            for code in grpc.StatusCode:
                self.requests.labels(rpc.name, code.name)
            if rpc.timed:
                self.duration.labels(rpc.name)
        for reason in AUTH_REASONS:
            self.auth_failures.labels(reason)
        for op in LOCAL_OPS:
            for name in LOCAL_CODES:
                self.local_requests.labels(op, name)

    def record(
        self, rpc: str, code: grpc.StatusCode, details: str | bytes | None, seconds: float | None
    ) -> None:
        self.requests.labels(rpc, code.name).inc()
        if seconds is not None:
            self.duration.labels(rpc).observe(seconds)
        if code in AUTH_CODES:
            self.auth_failures.labels(reason_word(details)).inc()

    def record_local(self, op: str, error: AgentError | None) -> None:
        """The local listener's observer: called with each answer before it is sent."""
        code = "OK" if error is None else CODES[error.kind].name
        self.local_requests.labels(op if op in LOCAL_OPS else "unknown", code).inc()
        if error is not None and error.kind in AUTH_KINDS:
            reason = error.reason if error.reason in AUTH_REASONS else "other"
            self.auth_failures.labels(reason).inc()


def _outcome(
    context: grpc.aio.ServicerContext[Any, Any], raised: bool
) -> tuple[grpc.StatusCode, Any]:
    code: grpc.StatusCode | None = context.code()
    details = context.details()
    if code is None:
        code = grpc.StatusCode.UNKNOWN if raised else grpc.StatusCode.OK
    return code, details


Behaviour = Callable[[Any, Any], Any]


class _Call:
    """One call's outcome, recorded once: when ``abort`` is about to send its status, or else
    when the handler ends. grpc's asyncio ``abort`` sends the status before it raises, so a
    count made after the handler could lag behind the answer: a caller that saw its refusal
    and then scraped would not find it counted yet."""

    def __init__(
        self, metrics: RequestMetrics, rpc: str, clock: Callable[[], float], *, timed: bool
    ):
        self.metrics, self.rpc, self.clock, self.timed = metrics, rpc, clock, timed
        self.started = clock()
        self.recorded = False

    def record(self, code: grpc.StatusCode, details: str | bytes | None) -> None:
        if not self.recorded:
            self.recorded = True
            seconds = self.clock() - self.started if self.timed else None
            self.metrics.record(self.rpc, code, details, seconds)

    def ended(self, context: grpc.aio.ServicerContext[Any, Any], ended: str) -> None:
        if ended == "cancelled":
            self.record(grpc.StatusCode.CANCELLED, None)
        else:
            self.record(*_outcome(context, ended == "raised"))


class _ObservedContext:
    """The call's context, passed to the handler: the same in every respect, except that
    ``abort`` records the outcome before the status leaves."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], call: _Call) -> None:
        self._context = context
        self._call = call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", *more: Any) -> None:
        self._call.record(code, details)
        await self._context.abort(code, details, *more)


class RequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Times and counts every call of a registered method; unknown methods are not counted."""

    def __init__(self, metrics: RequestMetrics, clock: Callable[[], float] = time.monotonic):
        self.metrics = metrics
        self.clock = clock

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        rpc = rpc_name(handler_call_details.method)
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(rpc, handler.unary_unary), **codec
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(rpc, handler.unary_stream), **codec
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(rpc, handler.stream_unary), **codec
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(rpc, handler.stream_stream), **codec
            )
        return handler  # pragma: no cover  # grpc always sets one behaviour

    def _unary(self, rpc: str, behaviour: Behaviour) -> Behaviour:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            observed = _Call(self.metrics, rpc, self.clock, timed=True)
            ended = "raised"
            try:
                response = await behaviour(request, _ObservedContext(context, observed))
                ended = "returned"
                return response
            finally:
                observed.ended(context, ended)

        return call

    def _stream(self, rpc: str, behaviour: Behaviour) -> Behaviour:
        # A streaming handler is an async generator, or a coroutine that writes with
        # ``context.write`` (the health service's Watch): the wrapper keeps its kind.
        if inspect.isasyncgenfunction(behaviour):

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                observed = _Call(self.metrics, rpc, self.clock, timed=False)
                ended = "raised"
                try:
                    async for response in behaviour(request, _ObservedContext(context, observed)):
                        yield response
                    ended = "returned"
                except (asyncio.CancelledError, GeneratorExit):  # the client went away
                    ended = "cancelled"
                    raise
                finally:
                    observed.ended(context, ended)

            return stream

        async def write(request: Any, context: Any) -> None:
            observed = _Call(self.metrics, rpc, self.clock, timed=False)
            ended = "raised"
            try:
                await behaviour(request, _ObservedContext(context, observed))
                ended = "returned"
            except asyncio.CancelledError:
                ended = "cancelled"
                raise
            finally:
                observed.ended(context, ended)

        return write


class KernelMetrics:
    """Duration of every libnftables transaction and failures by reason word."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            PREFIX + "kernel_transaction_duration_seconds",
            "Time of one nftables transaction (one libnftables call), failed ones included.",
            buckets=KERNEL_BUCKETS,
            registry=registry,
        )
        self.failures = Counter(
            PREFIX + "kernel_transaction_failures",
            "nftables transactions the kernel refused (nothing changed), by reason word.",
            ["reason"],
            registry=registry,
        )
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)

    def observe(self, seconds: float, error: AgentError | None) -> None:
        """The ``NftAdapter`` observer: called after each transaction."""
        self.duration.observe(seconds)
        if error is not None:
            self.failures.labels(error.reason).inc()


# Reason words of agent.rpc.gate, each exported at 0 from the start so that increase() sees
# the first one.
CONNECTION_REFUSALS = (
    "too_many_connections",
    "too_many_connections_from_source",
    "backend_unreachable",
    "out_of_descriptors",
)
HANDSHAKE_FAILURES = ("handshake_failed", "handshake_timeout")


class TransportMetrics:
    """The API port's connections: open ones, refused ones, failed TLS handshakes.

    The ``agent.rpc.gate.TransportObserver`` of the daemon's gate (its event loop calls it).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.refused = Counter(
            PREFIX + "api_connections_refused",
            "Connections to the API port reset at once, by reason word (over a cap).",
            ["reason"],
            registry=registry,
        )
        self.handshakes = Counter(
            PREFIX + "api_handshake_failures",
            "Connections gRPC closed before their TLS handshake completed, by reason word "
            "(handshake_failed: refused, e.g. no or a wrong client certificate; "
            "handshake_timeout: not completed within [api] handshake_timeout_s).",
            ["reason"],
            registry=registry,
        )
        self.open = Gauge(
            PREFIX + "api_connections_open",
            "Connections to the API port open now (admitted by the gate).",
            registry=registry,
        )
        for reason in CONNECTION_REFUSALS:
            self.refused.labels(reason)
        for reason in HANDSHAKE_FAILURES:
            self.handshakes.labels(reason)

    def connection_refused(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def handshake_failed(self, reason: str) -> None:
        self.handshakes.labels(reason).inc()

    def count_open(self, read: Callable[[], int]) -> None:
        """Read the open connections from ``read`` at every scrape."""
        self.open.set_function(read)
