"""The FirewallAgent servicer: transport -> caller check -> envelope -> replay -> fields -> engine.

Owns the order of checks of PROTOCOL.md for every RPC and the translation of outcomes into
messages. It changes nothing itself (the engine does) and maps errors to codes only through
``agent.rpc.status``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import grpc
from google.protobuf.message import DecodeError

from agent import __version__
from agent.config import AgentConfig
from agent.engine import Engine
from agent.errors import AgentError, InvalidArgument, ResourceExhausted, Unauthenticated
from agent.gcpause import collector_paused
from agent.outcome import Outcome
from agent.ratelog import RateLimitedLog
from agent.rpc import convert
from agent.rpc.auth import CallerPolicy, presented_identity
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


MessageT = TypeVar("MessageT", agent_pb2.GetStateRequest, agent_pb2.WatchEventsRequest)


def request_decoder(message_type: type[MessageT]) -> Callable[[bytes], MessageT | Undecodable]:
    """The transport's request decoder for the unsigned RPCs (GetState, WatchEvents).

    As for envelopes, grpcio turns a raising decoder into ``UNKNOWN: Unexpected <class
    DecodeError>``; the handler answers ``INVALID_ARGUMENT malformed_request`` instead.
    """

    def decode(data: bytes) -> MessageT | Undecodable:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return Undecodable(len(data))

    return decode


def _decoded(request: MessageT | Undecodable) -> MessageT:
    if isinstance(request, Undecodable):
        raise InvalidArgument(
            "malformed_request", f"{request.size} bytes that are not the RPC's request message"
        )
    return request


# A write pending this long means the watcher is not reading (a reading one's writes complete
# in milliseconds, bursts included); the open streams are looked at this often.
WATCH_BLOCKED_S = 1.0


@dataclass(slots=True, eq=False)
class Watcher:
    """One open event stream (loop thread only): how far it got, and whether it is stuck."""

    since: int
    buffer: int = 0  # events that may wait for it while its write is blocked; 0 = no check
    writing_since: float = 0.0  # loop time its pending write began; 0 = none pending
    behind: bool = False


class Watchers:
    """The open event streams, capped apart from the other RPCs (``api.max_watchers``).

    Loop thread only. The health service's Watch streams count here too: any stream that stays
    open is a watcher, and none may take the capacity of the other RPCs. While streams are
    open, every ``WATCH_BLOCKED_S`` a watcher whose write has been pending that long, with more
    than its buffer of events waiting for it, is marked ``behind``.
    """

    def __init__(self, cap: int, version: Callable[[], int]) -> None:
        self.cap = cap  # fixed at start: gRPC's own limit, made at start, counts it in
        self._version = version
        self._open: set[Watcher] = set()
        self._checking: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._open)

    def enter(self, since: int) -> Watcher:
        if len(self._open) >= self.cap:
            raise ResourceExhausted("too_many_watchers", f"{self.cap} event streams are open")
        w = Watcher(since)
        self._open.add(w)
        if self._checking is None:
            self._checking = asyncio.get_running_loop().call_later(WATCH_BLOCKED_S, self._check)
        return w

    def leave(self, w: Watcher) -> None:
        self._open.discard(w)

    def _check(self) -> None:
        self._checking = None
        if not self._open:
            return
        loop = asyncio.get_running_loop()
        blocked_since = loop.time() - WATCH_BLOCKED_S
        version = self._version()
        for w in self._open:
            if 0 < w.writing_since <= blocked_since and w.buffer and version - w.since > w.buffer:
                w.behind = True
        self._checking = loop.call_later(WATCH_BLOCKED_S, self._check)


@dataclass(frozen=True, slots=True)
class Settings:
    """What a reload replaces at once: configuration, trusted keys, allowed callers."""

    config: AgentConfig
    trust: TrustPolicy
    callers: CallerPolicy


@dataclass(slots=True)
class CallNotes:
    """What a call has revealed about itself so far, for the log line of its refusal."""

    request_id: str = "-"


# Refusals are logged at WARNING, at most a burst of 10 and then 30 a minute: a flood of bad
# requests fills the metrics, never the journal.
REFUSAL_LOG_PER_MINUTE = 30
REFUSAL_LOG_BURST = 10
refusal_log = logging.getLogger("agent.rpc.refusals")


@dataclass(frozen=True, slots=True)
class Health:
    """What the daemon knows about the table, for ``GetState``."""

    in_sync: bool = True
    last_verified_at_ms: int = 0
    drift_repairs: int = 0
    recent_drift_repairs: int = 0  # within the last minute (``agent.verify.RepairRate``)
    repair_storm: bool = False  # they keep coming: something fights over the table


Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True, slots=True)
class SignedRpc(Generic[SignedRequestT]):
    """A signed RPC: its name, the request its envelope carries, the command it becomes."""

    name: str
    message_type: type[SignedRequestT]
    build: Callable[[SignedRequestT, RequestMeta, AgentConfig], Command]


ALLOW = SignedRpc("Allow", agent_pb2.AllowRequest, convert.allow_command)
REVOKE = SignedRpc("Revoke", agent_pb2.RevokeRequest, convert.revoke_command)
SYNC = SignedRpc("Sync", agent_pb2.SyncRequest, convert.sync_command)
ERASE = SignedRpc("Erase", agent_pb2.EraseRequest, convert.erase_command)
# Requests and answers up to this size are handled on the event loop itself; bigger ones (a
# Sync of thousands of entries: verification, parsing and validation take a second at 100,000)
# on a worker thread, so one big call never stalls every other call.
INLINE_PAYLOAD_BYTES = 64 * 1024
INLINE_RESULTS = 256


class FirewallAgentService(agent_pb2_grpc.FirewallAgentServicer):
    """The agent's RPCs as coroutines on the listener's event loop (``agent.rpc.server``).

    A signed request is checked on the loop (small ones) or a worker thread (big ones), then
    waits for the engine's writer without holding a thread: 64 concurrent callers cost 64
    suspended coroutines, not 64 threads taking turns with the GIL.
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        health: Callable[[], Health] = Health,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.health = health
        self.clock = clock
        self.started_at_ms = int(clock() * 1000)
        self.stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()  # replaced after each change: set means "look again"
        self._workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rpc-big")
        self.watchers = Watchers(settings.config.api.max_watchers, lambda: engine.state_version)
        self.refusals = RateLimitedLog(
            refusal_log, per_minute=REFUSAL_LOG_PER_MINUTE, burst=REFUSAL_LOG_BURST
        )
        engine.add_listener(self._engine_changed)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the handlers run on (the listener's); engine changes wake it."""
        self._loop = loop

    def reload(self, settings: Settings) -> None:
        self.settings = settings  # one reference swap: a call sees the old or the new, whole

    def stop(self) -> None:
        """Loop thread: end the event streams (their callers resume from their last version)."""
        self.stopping = True
        self._wake_watchers()

    def close(self) -> None:
        """Once no call is left: the worker threads go."""
        self._workers.shutdown(wait=False)

    def _engine_changed(self) -> None:
        # The writer thread: hand over to the loop, never wait on it.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake_watchers)

    def _wake_watchers(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _large(self, fn: Callable[[], T]) -> T:
        """``fn`` for a large request or answer: off the loop, and without cyclic collections
        (see ``agent.gcpause``)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._workers, functools.partial(_paused, fn))

    def refused(self, rpc: str, exc: AgentError, context: Context, notes: CallNotes) -> None:
        """One WARNING per refusal (rate-limited): reason word, caller, request id and RPC.

        Never the detail: it may name an address or a subject.
        """
        caller = presented_identity(context)
        self.refusals.emit(
            logging.WARNING,
            "refused",
            "refused %s: %s (caller %s, request %s)",
            rpc,
            exc.reason,
            caller,
            notes.request_id,
            fields={
                "REASON": exc.reason,
                "CALLER": caller,
                "REQUEST_ID": notes.request_id,
                "RPC": rpc,
            },
        )

    # --- signed RPCs -------------------------------------------------------------------------

    async def _signed(
        self, rpc: SignedRpc[Any], envelope: Envelope, context: Context
    ) -> agent_pb2.ApplyResult:
        notes = CallNotes()
        big = isinstance(envelope, agent_pb2.SignedEnvelope) and (
            len(envelope.payload) > INLINE_PAYLOAD_BYTES
        )
        try:
            s = self.settings
            caller = s.callers.identify(context)
            check = functools.partial(self._checked, rpc, envelope, caller, s, notes)
            checked = await self._large(check) if big else check()
            if isinstance(checked, Outcome):
                outcome = checked
            else:
                outcome = await self.engine.submit_async(checked)
            if len(outcome.results) > INLINE_RESULTS:
                return await self._large(functools.partial(_result, outcome))
            return _result(outcome)
        except AgentError as exc:
            if big:  # a large refused request leaves memory for the writer's next idle turn
                self.engine.release_memory_soon()
            self.refused(rpc.name, exc, context, notes)
            await abort(context, exc)

    def _checked(
        self,
        rpc: SignedRpc[SignedRequestT],
        envelope: Envelope,
        caller: str,
        s: Settings,
        notes: CallNotes,
    ) -> Command | Outcome:
        """The request's command, or the original outcome of a replay it turned out to be."""
        if isinstance(envelope, Oversized):
            raise ResourceExhausted(
                "request_too_large", f"{envelope.size} bytes, at most {envelope.limit}"
            )
        if isinstance(envelope, Undecodable):
            raise Unauthenticated(
                "malformed_envelope", f"{envelope.size} bytes that are not a SignedEnvelope"
            )
        opened: OpenedRequest[SignedRequestT] = open_envelope(
            envelope, rpc.message_type, s.trust, int(self.clock() * 1000)
        )
        notes.request_id = opened.header.request_id  # checked by open_envelope
        if opened.header.issued_at_ms < self.engine.replay_floor_ms:
            # The request log was lost with a damaged database: a request from before the
            # recovery may have been applied already (a replay cannot be told apart).
            raise Unauthenticated(
                "issued_before_recovery",
                f"issued_at {opened.header.issued_at_ms} is before the state was recovered "
                f"({self.engine.replay_floor_ms}); sign it again",
            )
        meta = RequestMeta(
            request_id=opened.header.request_id,
            rpc=rpc.name,
            issued_at_ms=opened.header.issued_at_ms,
            expires_at_ms=opened.header.expires_at_ms,
            payload_digest=opened.payload_sha256,
            caller=caller,
            keyid=opened.keyid,
        )
        try:
            return rpc.build(opened.message, meta, s.config)
        except AgentError:
            # PROTOCOL.md checks replay before field validation: a request accepted once gets
            # its original answer even if it would not validate now. Only a refused one needs
            # the lookup here; the writer checks every valid one in its group, which spares
            # each call a read on the way in.
            replay = self.engine.replayed(meta)
            if replay is None:
                raise
            return replay

    async def Allow(self, request: Envelope, context: Context) -> agent_pb2.ApplyResult:
        return await self._signed(ALLOW, request, context)

    async def Revoke(self, request: Envelope, context: Context) -> agent_pb2.ApplyResult:
        return await self._signed(REVOKE, request, context)

    async def Sync(self, request: Envelope, context: Context) -> agent_pb2.ApplyResult:
        return await self._signed(SYNC, request, context)

    async def Erase(self, request: Envelope, context: Context) -> agent_pb2.ApplyResult:
        return await self._signed(ERASE, request, context)

    # --- unsigned RPCs (mTLS only) -----------------------------------------------------------

    async def GetState(
        self, request: agent_pb2.GetStateRequest | Undecodable, context: Context
    ) -> agent_pb2.AgentState:
        try:
            s = self.settings
            s.callers.identify(context)
            _decoded(request)
        except AgentError as exc:
            self.refused("GetState", exc, context, CallNotes())
            await abort(context, exc)
        # 100,000 entries take a while to turn into messages: not on the loop.
        return await self._large(functools.partial(self._state, s))

    def _state(self, s: Settings) -> agent_pb2.AgentState:
        entries, version = self.engine.snapshot()
        h = self.health()
        state = agent_pb2.AgentState(
            agent_id=s.config.agent_id,
            version=__version__,
            started_at_unix_ms=self.started_at_ms,
            now_unix_ms=int(self.clock() * 1000),
            state_version=version,
            ruleset_in_sync=h.in_sync,
            last_verified_at_unix_ms=h.last_verified_at_ms,
            drift_repairs=h.drift_repairs,
            trusted_keyids=sorted(s.trust.trusted_keys),
            profiles=list(s.config.profile_names),
        )
        convert.add_entries(sorted(entries, key=lambda e: e.key), state.entries)
        return state

    async def WatchEvents(  # type: ignore[override]  # writes with context.write, returns None
        self, request: agent_pb2.WatchEventsRequest | Undecodable, context: Context
    ) -> None:
        try:
            s = self.settings
            s.callers.identify(context)
            since = _decoded(request).since_state_version
            watcher = self.watchers.enter(since)
        except AgentError as exc:
            self.refused("WatchEvents", exc, context, CallNotes())
            await abort(context, exc)
        try:
            await self._stream(watcher, context, s.config)
        finally:
            self.watchers.leave(watcher)

    async def _stream(self, w: Watcher, context: Context, cfg: AgentConfig) -> None:
        """Retained events after ``w.since``, then live ones, until the daemon stops or the
        watcher falls behind (PROTOCOL.md, WatchEvents).

        Each message is one awaited write, so what waits for a watcher that does not read is
        gRPC's flow-controlled stream window, never a queue of ours. A watcher whose write has
        been pending ``WATCH_BLOCKED_S`` while more than ``api.watch_buffer_events`` events wait
        for it is marked ``behind`` (``Watchers``); its next message is then
        ``RESYNC_REQUIRED`` and the stream ends. A write blocked ``api.watch_stall_timeout_s``
        ends the stream at once: the message it was writing and those before it are still
        delivered, then ``RESOURCE_EXHAUSTED watcher_stalled``.
        """
        stall_s = cfg.api.watch_stall_timeout_s
        w.buffer = cfg.api.watch_buffer_events

        loop = asyncio.get_running_loop()

        async def send(msg: agent_pb2.AgentEvent) -> None:
            w.writing_since = loop.time()
            try:
                await asyncio.wait_for(context.write(msg), stall_s)
            except TimeoutError:
                # The cancelled write's message stays queued; only a status can follow it.
                await abort(
                    context,
                    ResourceExhausted("watcher_stalled", f"no message read for {stall_s} s"),
                )
            finally:
                w.writing_since = 0.0

        complete, events = self.engine.events_after(w.since)
        if not complete:
            await send(self._resync(w.since, f"history does not reach back to {w.since}"))
        while True:
            for e in events:
                if w.behind:
                    await send(
                        self._resync(
                            w.since,
                            "this watcher stopped reading and fell "
                            f"more than {w.buffer} events behind",
                        )
                    )
                    return
                await send(convert.event_message(e))
                w.since = max(w.since, e.state_version)
            # No await between the check and the wait: a change announced meanwhile reaches
            # the loop after this coroutine is waiting on the event it sets.
            while self.engine.state_version <= w.since and not self.stopping:
                await self._changed.wait()
            if self.stopping:
                return
            complete, events = self.engine.events_after(w.since)
            if not complete:
                await send(self._resync(w.since, "this watcher fell behind the retained history"))
                return

    def _resync(self, since: int, why: str) -> agent_pb2.AgentEvent:
        now = int(self.clock() * 1000)
        return convert.event_message(Event(EventKind.RESYNC_REQUIRED, now, None, why, since))


def add_to_server(service: FirewallAgentService, server: grpc.aio.Server, max_bytes: int) -> None:
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
        request_deserializer=request_decoder(agent_pb2.GetStateRequest),
        response_serializer=agent_pb2.AgentState.SerializeToString,
    )
    handlers["WatchEvents"] = grpc.unary_stream_rpc_method_handler(
        service.WatchEvents,
        request_deserializer=request_decoder(agent_pb2.WatchEventsRequest),
        response_serializer=agent_pb2.AgentEvent.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def _result(o: Outcome) -> agent_pb2.ApplyResult:
    return convert.apply_result(o.request_id, o.results, o.state_version, o.erased_records)


def _paused(fn: Callable[[], T]) -> T:
    with collector_paused():
        return fn()
