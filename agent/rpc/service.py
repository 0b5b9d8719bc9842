"""The FirewallAgent servicer: transport -> caller check -> envelope -> replay -> fields -> engine.

Owns the order of checks of PROTOCOL.md for every RPC and the translation of outcomes into
messages. It changes nothing itself (the engine does) and maps errors to codes only through
``agent.rpc.status``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, TypeVar

import grpc
from google.protobuf.message import DecodeError

from agent import __version__
from agent.config import AgentConfig
from agent.engine import Engine, Outcome
from agent.errors import AgentError, ResourceExhausted, Unauthenticated
from agent.rpc import convert
from agent.rpc.auth import CallerPolicy
from agent.rpc.envelope import OpenedRequest, SignedRequestT, TrustPolicy, open_envelope
from agent.rpc.pb import agent_pb2, agent_pb2_grpc
from agent.rpc.status import abort
from agent.state import Command, Event, EventKind, RequestMeta

T = TypeVar("T")
SERVICE_NAME: Final = agent_pb2.DESCRIPTOR.services_by_name["FirewallAgent"].full_name


@dataclass(frozen=True, slots=True)
class Undecodable:
    """Request bytes that are not a ``SignedEnvelope`` at all: a malformed envelope."""

    size: int


@dataclass(frozen=True, slots=True)
class Oversized:
    """Request bytes over ``api.max_message_bytes``: refused unparsed."""

    size: int
    limit: int


Envelope = agent_pb2.SignedEnvelope | Undecodable | Oversized
# gRPC core refuses a message over its own limit with its own words and no reason word, so its
# limit sits this far above the configured cap and the decoder refuses the excess itself.
TRANSPORT_SLACK_BYTES = 1024 * 1024


def envelope_decoder(max_bytes: int) -> Callable[[bytes], Envelope]:
    """The transport's request decoder for signed RPCs.

    grpcio answers a request its decoder raises on with a bare ``INTERNAL``; the protocol says a
    malformed envelope is ``UNAUTHENTICATED malformed_envelope`` and an over-size one
    ``RESOURCE_EXHAUSTED request_too_large``, so the decoder returns a value and the handler
    decides.
    """

    def decode(data: bytes) -> Envelope:
        if len(data) > max_bytes:
            return Oversized(len(data), max_bytes)
        try:
            return agent_pb2.SignedEnvelope.FromString(data)
        except DecodeError:
            return Undecodable(len(data))

    return decode


@dataclass(frozen=True, slots=True)
class Settings:
    """What a reload replaces at once: configuration, trusted keys, allowed callers."""

    config: AgentConfig
    trust: TrustPolicy
    callers: CallerPolicy


@dataclass(frozen=True, slots=True)
class Health:
    """What the daemon knows about the table, for ``GetState``."""

    in_sync: bool = True
    last_verified_at_ms: int = 0
    drift_repairs: int = 0


class FirewallAgentService(agent_pb2_grpc.FirewallAgentServicer):
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        health: Callable[[], Health] = Health,
        clock: Callable[[], float] = time.time,
        observe: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.health = health
        self.clock = clock
        self.observe = observe
        self.started_at_ms = int(clock() * 1000)
        self.stopping = threading.Event()

    def reload(self, settings: Settings) -> None:
        self.settings = settings  # one reference swap: a call sees the old or the new, whole

    # --- signed RPCs -------------------------------------------------------------------------

    def _signed(
        self,
        rpc: str,
        envelope: Envelope,
        context: grpc.ServicerContext,
        message_type: type[SignedRequestT],
        build: Callable[[SignedRequestT, RequestMeta, AgentConfig], Command],
    ) -> agent_pb2.ApplyResult:
        started = time.monotonic()
        code = "OK"
        try:
            s = self.settings
            caller = s.callers.identify(context)
            if isinstance(envelope, Oversized):
                raise ResourceExhausted(
                    "request_too_large", f"{envelope.size} bytes, at most {envelope.limit}"
                )
            if isinstance(envelope, Undecodable):
                raise Unauthenticated(
                    "malformed_envelope", f"{envelope.size} bytes that are not a SignedEnvelope"
                )
            opened: OpenedRequest[SignedRequestT] = open_envelope(
                envelope, message_type, s.trust, int(self.clock() * 1000)
            )
            meta = RequestMeta(
                request_id=opened.header.request_id,
                rpc=rpc,
                issued_at_ms=opened.header.issued_at_ms,
                expires_at_ms=opened.header.expires_at_ms,
                payload_digest=opened.payload_sha256,
                caller=caller,
                keyid=opened.keyid,
            )
            try:
                cmd = build(opened.message, meta, s.config)
            except AgentError:
                # PROTOCOL.md checks replay before field validation: a request accepted once
                # gets its original answer even if it would not validate now. Only a refused
                # one needs the lookup here; the writer checks every valid one in its group,
                # which spares each call a read on the way in.
                replay = self.engine.replayed(meta)
                if replay is None:
                    raise
                return _result(replay)
            return _result(self.engine.submit(cmd))
        except AgentError as exc:
            code = exc.kind.name
            abort(context, exc)
        finally:
            if self.observe:
                self.observe(rpc, code, time.monotonic() - started)

    def Allow(self, request: Envelope, context: grpc.ServicerContext) -> agent_pb2.ApplyResult:
        return self._signed(
            "Allow", request, context, agent_pb2.AllowRequest, convert.allow_command
        )

    def Revoke(self, request: Envelope, context: grpc.ServicerContext) -> agent_pb2.ApplyResult:
        return self._signed(
            "Revoke", request, context, agent_pb2.RevokeRequest, convert.revoke_command
        )

    def Sync(self, request: Envelope, context: grpc.ServicerContext) -> agent_pb2.ApplyResult:
        return self._signed("Sync", request, context, agent_pb2.SyncRequest, convert.sync_command)

    def Erase(self, request: Envelope, context: grpc.ServicerContext) -> agent_pb2.ApplyResult:
        return self._signed(
            "Erase", request, context, agent_pb2.EraseRequest, convert.erase_command
        )

    # --- unsigned RPCs (mTLS only) -----------------------------------------------------------

    def GetState(
        self, request: agent_pb2.GetStateRequest, context: grpc.ServicerContext
    ) -> agent_pb2.AgentState:
        started = time.monotonic()
        code = "OK"
        try:
            s = self.settings
            s.callers.identify(context)
            entries, version = self.engine.snapshot()
            h = self.health()
            return agent_pb2.AgentState(
                agent_id=s.config.agent_id,
                version=__version__,
                started_at_unix_ms=self.started_at_ms,
                now_unix_ms=int(self.clock() * 1000),
                state_version=version,
                entries=[convert.entry_message(e) for e in sorted(entries, key=lambda e: e.key)],
                ruleset_in_sync=h.in_sync,
                last_verified_at_unix_ms=h.last_verified_at_ms,
                drift_repairs=h.drift_repairs,
                trusted_keyids=sorted(s.trust.trusted_keys),
                profiles=list(s.config.profile_names),
            )
        except AgentError as exc:
            code = exc.kind.name
            abort(context, exc)
        finally:
            if self.observe:
                self.observe("GetState", code, time.monotonic() - started)

    def WatchEvents(
        self, request: agent_pb2.WatchEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[agent_pb2.AgentEvent]:
        try:
            self.settings.callers.identify(context)
        except AgentError as exc:
            abort(context, exc)
        since = request.since_state_version
        complete, events = self.engine.events_after(since)
        if not complete:
            yield convert.event_message(
                Event(
                    EventKind.RESYNC_REQUIRED,
                    int(self.clock() * 1000),
                    None,
                    f"history does not reach back to {since}; call GetState",
                    since,
                )
            )
        while True:
            for e in events:
                yield convert.event_message(e)
                since = max(since, e.state_version)
            while not self.engine.wait_for_change(since, 0.5):
                if self.stopping.is_set() or not context.is_active():
                    return
            if self.stopping.is_set():
                return
            complete, events = self.engine.events_after(since)
            if not complete:
                yield convert.event_message(
                    Event(
                        EventKind.RESYNC_REQUIRED,
                        int(self.clock() * 1000),
                        None,
                        "this watcher fell behind the retained history; call GetState",
                        since,
                    )
                )


def add_to_server(service: FirewallAgentService, server: grpc.Server, max_bytes: int) -> None:
    """Register ``service`` like the generated ``add_FirewallAgentServicer_to_server``, but with
    ``envelope_decoder(max_bytes)`` as the signed RPCs' request decoder."""
    apply = agent_pb2.ApplyResult.SerializeToString
    decode_envelope = envelope_decoder(max_bytes)
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(service, name), request_deserializer=decode_envelope, response_serializer=apply
        )
        for name in ("Allow", "Revoke", "Sync", "Erase")
    }
    handlers["GetState"] = grpc.unary_unary_rpc_method_handler(
        service.GetState,
        request_deserializer=agent_pb2.GetStateRequest.FromString,
        response_serializer=agent_pb2.AgentState.SerializeToString,
    )
    handlers["WatchEvents"] = grpc.unary_stream_rpc_method_handler(
        service.WatchEvents,
        request_deserializer=agent_pb2.WatchEventsRequest.FromString,
        response_serializer=agent_pb2.AgentEvent.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def _result(o: Outcome) -> agent_pb2.ApplyResult:
    return convert.apply_result(o.request_id, o.results, o.state_version, o.erased_records)
