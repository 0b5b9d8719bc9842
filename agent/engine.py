"""The single writer of the allow state: replay, ordering, group commit, state_version, events.

Owns the order of a change - replay check -> decide -> write intent -> one kernel transaction ->
commit -> answer - and is the only code that changes the store or the table's elements. Requests
that arrive together are folded into one kernel transaction and one SQLite commit; each caller
still gets its own result. Never speaks gRPC: the service hands in validated commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import heapq
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from agent.errors import AgentError, AlreadyExists, Unavailable
from agent.expiry_slices import SliceSizer
from agent.flowcuts import CutFlows, FlowCutter
from agent.gcpause import collector_paused
from agent.group_records import commit_batch
from agent.grouping import MAX_GROUP, linger_left
from agent.model import Address, EntryKey
from agent.outcome import Outcome
from agent.rules.conntrack import forget_flows
from agent.rules.nft import release_free_memory
from agent.rules.table import FirewallTable
from agent.state import (
    HISTORY,
    AllowCmd,
    Command,
    Decision,
    Entry,
    EraseCmd,
    Event,
    EventKind,
    Limits,
    RequestMeta,
    RevokeCmd,
    StateView,
    SyncCmd,
    decide,
    expire,
    newest_numbered,
)
from agent.state_records import (
    element_for,
    entries_from_rows,
    expiry_audit,
    from_stored,
    to_stored,
    to_stored_event,
)
from agent.store import Store
from agent.store_records import (
    CommitBatch,
    Erasure,
    IntentChange,
    PendingIntent,
    RequestRecord,
)
from agent.supervise import Supervision

log = logging.getLogger(__name__)

# A group changing this many entries leaves memory to give back once the writer is idle.
LARGE_BATCH = 10_000
# From this many changes on, a group's kernel transaction runs beside the writing of its rows;
# below, handing it to another thread and back costs more than the overlap gains.
OVERLAP_BATCH = 1_000
# Due entries expired before each request group, whatever else is due (see _expire_for).
PRE_GROUP_SLICE = 100
# How often the idle writer loop turns (checks expiries, proves it is alive to the watchdog).
TICK_S = 1.0
# The supervised loops (agent.supervise) that run on the writer thread.
WRITER_LOOPS = ("writer", "expiry")


Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Outcome]"]
# An event-loop caller's future and the writer's answer to copy into it.
Answer = tuple["asyncio.Future[Outcome]", "Future[Outcome]"]


@dataclass(slots=True)
class _Pending:
    cmd: Command
    future: Future[Outcome] = field(default_factory=Future)
    # Set by the writer before it answers an applied request: how many entries it changed, for
    # the waiting caller's log line.
    changed: int | None = None
    # An event-loop caller's future, answered with the rest of its group (see _hand_over).
    waiter: Waiter | None = None


def _hand_over(group: Iterable[_Pending]) -> None:
    """Pass a group's answers (``Engine._process`` gives every one) to the event-loop callers
    among it: one wake-up per loop, not one per caller (each would be a write to the loop's
    pipe and a tug of war for the GIL)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Answer]] = {}
    for p in group:
        if p.waiter is not None:
            loop, waiter = p.waiter
            by_loop.setdefault(loop, []).append((waiter, p.future))
    for loop, answers in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(_deliver, answers)


def _deliver(answers: list[Answer]) -> None:
    for waiter, answered in answers:
        if waiter.done():  # the call was cancelled meanwhile
            continue
        exc = answered.exception()
        if exc is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(answered.result())


@dataclass(frozen=True, slots=True)
class _Group:
    """One group's decided change, on its way to the kernel and the store.

    ``events``: its newest events (at most the history's length), numbered; ``history_floor``:
    the version through which its older ones are not kept (0: none dropped).
    """

    final: StateView
    accepted: list[tuple[_Pending, Decision, Outcome]]
    events: list[Event]
    history_floor: int
    now: int


# A task gets the current view and returns (the new view, the events it produced, its result).
Task = Callable[[StateView], tuple[StateView, Sequence[Event], Any]]


@dataclass(slots=True)
class _Task:
    fn: Task
    future: Future[Any] = field(default_factory=Future)


# An entry's expiry time, address and profile: plain values, so that the heap compares them in
# C (100,000 entries of one Sync share their expiry time; comparing EntryKeys to break those
# ties took 70 ms per Sync and 85 ms per rebuild).
_Deadline = tuple[int, str, str]


def _deadline(e: Entry) -> _Deadline:
    return (e.expires_at_ms, e.key.address.text, e.key.profile)


def _add_deadlines(heap: list[_Deadline], entries: Sequence[Entry]) -> None:
    if len(entries) > len(heap) // 8:
        # Many at once: one heapify, O(n), instead of a push each, O(n log n).
        heap.extend(map(_deadline, entries))
        heapq.heapify(heap)
    else:
        for e in entries:
            heapq.heappush(heap, _deadline(e))


def _partition(
    touched: Iterable[EntryKey], before: Mapping[EntryKey, Entry], after: Mapping[EntryKey, Entry]
) -> tuple[list[Entry], list[Entry], set[EntryKey]]:
    """The touched entries that are there after (upserts) and the ones that are gone
    (removals, as they were), and which upserts replace an entry (refreshed): in one pass, as
    a Sync touches 100,000 keys."""
    upserts: list[Entry] = []
    removals: list[Entry] = []
    refreshed: set[EntryKey] = set()
    for k in touched:
        new, old = after.get(k), before.get(k)
        if new is not None:
            upserts.append(new)
            if old is not None:
                refreshed.add(k)
        elif old is not None:
            removals.append(old)
    return upserts, removals, refreshed


def _names_whole_state(cmd: Command) -> bool:
    """Whether ``cmd`` may change any entry, not only the ones it names (Sync, Erase, a
    Revoke by subject)."""
    return isinstance(cmd, SyncCmd | EraseCmd) or (isinstance(cmd, RevokeCmd) and bool(cmd.subject))


def _log_accepted(cmd: Command, changed: int, state_version: int) -> None:
    meta = cmd.meta
    # No subject and no address: the journal is kept (and often shipped elsewhere) on the
    # host's terms, out of reach of the audit retention and of Erase. The request id leads to
    # them in the audit rows (`vicifast-agent audit --request-id`) while the policy keeps them.
    fields = {"REQUEST_ID": meta.request_id, "CALLER": meta.caller, "RPC": meta.rpc}
    log.info(
        "%s %s: %d changed, state_version %d",
        meta.rpc,
        meta.request_id,
        changed,
        state_version,
        extra=fields,
    )


def _failure(applying: Future[object]) -> AgentError | None:
    """The kernel transaction's refusal, once it has finished; None if it succeeded."""
    wait([applying])
    exc = applying.exception()
    return exc if isinstance(exc, AgentError) else None


class Engine:
    """Applies commands one group at a time on its own thread."""

    def __init__(
        self,
        *,
        store: Store,
        table: FirewallTable,
        limits: Limits,
        profiles: Sequence[str],
        forget_window_ms: int,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        history: int = HISTORY,
        cut_flows: CutFlows = forget_flows,
        supervision: Supervision | None = None,
    ) -> None:
        self.store = store
        self.table = table
        self.limits = limits
        self.profiles = tuple(profiles)
        self.forget_window_ms = forget_window_ms
        self.clock = clock
        # The writer and expiry are supervised loops (agent.supervise): a fault is counted and
        # backed off from, never the end of the writer thread. The flow cutter's thread is the
        # "conntrack" loop.
        self.supervision = supervision if supervision is not None else Supervision()
        # What the writer's current turn took off the queue: answered with an error if the turn
        # fails unexpectedly, so that no caller waits for an answer that will never come.
        self._in_hand: list[_Pending | _Task | None] = []
        self._monotonic = monotonic  # times expiry slices (see agent.expiry_slices)
        self._slices = SliceSizer()
        # Cuts the flows of removed sources on its own thread (see agent.flowcuts).
        self.cutter = FlowCutter(cut_flows, self.supervision)
        # Sources removed by the groups just processed, whose flows are cut once their callers
        # have their answers (see ``_run``).
        self._flows_to_cut: list[Address] = []
        self.view = StateView()
        self._queue: queue.SimpleQueue[_Pending | _Task | None] = queue.SimpleQueue()
        # Every entry's expiry time, stale ones (refreshed or removed since) included: an
        # expiry looks only at the keys whose time has come, so 100,000 entries cost nothing
        # per tick and an expiry costs its own entries, not a walk over all of them.
        self._deadlines: list[_Deadline] = []
        self._thread: threading.Thread | None = None
        self._keep = history  # events retained: the history's length, and a group's numbering
        self._history: deque[Event] = deque(maxlen=history)
        self._large_batch_done = False
        # Kernel transactions of request groups run here, beside the writer (see _commit).
        self._kernel = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernel")
        # Called on the writer thread after every published change (see ``add_listener``).
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()  # guards view + history for readers on other threads
        self.last_loop_at = time.monotonic()
        self._stop_seen = False
        self._expected = 0  # requests in the last group (see agent.grouping)
        # EXPIRED events published since start (read by the metrics; only the writer adds).
        self.expiries = 0
        self.replay_floor_ms = 0  # see ``load``

    # --- lifecycle ---------------------------------------------------------------------------

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def load(self) -> None:
        """Read the durable state; the caller converges the kernel before ``start``."""
        self.view = StateView(
            entries=entries_from_rows(self.store.entry_rows()),
            last_sync_issued_at_ms=self.store.last_sync_issued_at_ms() or 0,
            state_version=self.store.state_version(),
        )
        # Signed requests issued before this are refused (a recovery lost the request log).
        self.replay_floor_ms = self.store.replay_floor_ms()
        self._reset_deadlines()
        # Many entries loaded: collect and freeze them on the first idle turn, as after a Sync.
        self._large_batch_done = len(self.view.entries) >= LARGE_BATCH
        start = max(0, self.view.state_version - self._keep)
        page = self.store.events_since(start, self._keep)
        self._history.clear()
        self._history.extend(
            Event(
                EventKind[e.kind],
                e.at_ms,
                from_stored(e.entry) if e.entry else None,
                e.detail,
                e.state_version,
            )
            for e in page.events
        )

    @property
    def flows_cut(self) -> int:
        """Conntrack flows of revoked sources cut since start (read by the metrics)."""
        return self.cutter.flows_cut

    @property
    def flow_cut_failures(self) -> int:
        """Cuts that failed since start (likewise)."""
        return self.cutter.failures

    def start(self) -> None:
        self.last_loop_at = time.monotonic()
        for name in WRITER_LOOPS:
            self.supervision.watch(name)
        self.cutter.start()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def run_task(self, fn: Task, timeout: float | None = 120.0) -> Any:
        """Run ``fn`` on the writer thread between request groups and publish what it returns.

        The one way for anything but a request to change the allow state (reconcile, drift
        repair), so it never races a request. Before ``start`` it runs on the calling thread.
        """
        task = _Task(fn)
        if self._thread is None:
            self._run_task(task)
        else:
            self._queue.put(task)
        return task.future.result(timeout)

    def _run_task(self, task: _Task) -> None:
        try:
            with self._lock:
                current = self.view
            view, events, result = task.fn(current)
        except Exception as exc:  # noqa: BLE001  # the caller gets it; the writer must survive
            task.future.set_exception(exc)
            return
        self.publish(view, events)
        task.future.set_result(result)

    def publish(self, view: StateView, events: Sequence[Event]) -> None:
        """Writer thread only: make ``view`` current, record ``events``, wake the watchers."""
        with self._lock:
            self.view = view
            self._history.extend(events)
        self.expiries += sum(1 for e in events if e.kind is EventKind.EXPIRED)
        self._reset_deadlines()
        self._announce()

    def add_listener(self, changed: Callable[[], None]) -> None:
        """Call ``changed`` (on the writer thread, so it must only hand over, never wait) after
        every change of the state version: how watchers learn of new events without polling."""
        self._listeners.append(changed)

    def _announce(self) -> None:
        for changed in self._listeners:
            changed()

    @property
    def state_version(self) -> int:
        return self.view.state_version

    def _reset_deadlines(self) -> None:
        self._deadlines = [_deadline(e) for e in self.view.entries.values()]
        heapq.heapify(self._deadlines)

    @property
    def entry_count(self) -> int:
        """Entries in the state (without the per-call copy of ``snapshot``)."""
        return len(self.view.entries)

    def stop(self) -> None:
        """Finish what is queued, then stop the writer thread."""
        if self._thread:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
            for name in WRITER_LOOPS:
                self.supervision.unwatch(name)
        self.cutter.stop()
        self._kernel.shutdown(wait=True)

    # --- callers -----------------------------------------------------------------------------

    def submit(self, cmd: Command, timeout: float | None = 60.0) -> Outcome:
        """Queue ``cmd`` and wait for its outcome (or its ``AgentError``)."""
        pending = self._enqueue(cmd)
        return self._settled(pending, pending.future.result(timeout))

    async def submit_async(self, cmd: Command) -> Outcome:
        """``submit`` for a caller on an event loop: the loop serves other calls meanwhile."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Outcome] = loop.create_future()
        pending = self._enqueue(cmd, (loop, waiter))
        return self._settled(pending, await waiter)

    def _enqueue(self, cmd: Command, waiter: Waiter | None = None) -> _Pending:
        if self._thread is None:
            raise Unavailable("shutting_down", "the agent is not accepting requests")
        pending = _Pending(cmd, waiter=waiter)
        # Running from here on: a caller that gives up (a cancelled call) cannot cancel it, the
        # request is applied or refused all the same and the writer can always answer it.
        pending.future.set_running_or_notify_cancel()
        self._queue.put(pending)
        return pending

    @staticmethod
    def _settled(pending: _Pending, outcome: Outcome) -> Outcome:
        if pending.changed is not None:
            # Logged by the caller, not the writer: a line per request written by the writer
            # thread would hold up every other request of the group (and the next group).
            _log_accepted(pending.cmd, pending.changed, outcome.state_version)
        return outcome

    def snapshot(self) -> tuple[list[Entry], int]:
        """Entries the kernel still enforces (expired ones excluded) and the state version."""
        now = self.now_ms()
        with self._lock:
            live = [e for e in self.view.entries.values() if e.expires_at_ms > now]
            return live, self.view.state_version

    def events_after(self, version: int) -> tuple[bool, list[Event]]:
        """(history reaches back to ``version``, retained events with state_version > it).

        ``version`` 0 asks for all retained history, which is complete by definition.
        """
        with self._lock:
            current = self.view.state_version
            oldest = self._history[0].state_version if self._history else current + 1
            complete = version == 0 or version >= current or version + 1 >= oldest
            return complete, [e for e in self._history if e.state_version > version]

    # --- the writer --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop_seen:
            pause = self.supervision.guarded("writer", self._turn)
            if pause:
                self._abandon_in_hand()
                time.sleep(pause)

    def _turn(self) -> None:
        """One turn of the writer: an idle tick (side work), or what the queue holds."""
        try:
            # With expiries due (and expiry not backing off from a fault), one slice at a time
            # between whatever is queued.
            first = (
                self._queue.get_nowait()
                if self._expiry_due() and self.supervision.due("expiry")
                else self._queue.get(timeout=TICK_S)
            )
        except queue.Empty:
            self.last_loop_at = time.monotonic()
            self._side_work("expiry", self._expire)
            if self._large_batch_done and not self._expiry_due():
                self._release_memory()
            return
        self.last_loop_at = time.monotonic()
        self._in_hand = [first]  # answered even if the drain itself failed
        self._in_hand = self._drain(first)
        group: list[_Pending] = []
        # Requests are grouped; a task runs in its place in the order of arrival.
        for item in [*self._in_hand, None]:
            if isinstance(item, _Pending):
                group.append(item)
                continue
            if group:
                self._side_work("expiry", functools.partial(self._expire_for, group))
                with collector_paused() if self._large(group) else contextlib.nullcontext():
                    self._process(group)  # answers every request of the group
                _hand_over(group)
                self._cut_flows()
                group = []
            if isinstance(item, _Task):
                self._run_task(item)
        self._in_hand = []

    def _side_work(self, name: str, work: Callable[[], None]) -> None:
        """Expiry on the writer's turns, a supervised loop of its own: a fault is counted and
        backed off from (the work waits), the writer's turn goes on."""
        if self.supervision.due(name):
            self.supervision.guarded(name, work)

    def _abandon_in_hand(self) -> None:
        """After a failed turn: whoever still waits on what it took gets an error now."""
        items, self._in_hand = self._in_hand, []
        failure = Unavailable("internal_error", "the writer failed; retry the request")
        for item in items:
            if item is None:
                self._stop_seen = True
            elif not item.future.done():
                item.future.set_exception(failure)
        _hand_over(p for p in items if isinstance(p, _Pending))

    def _drain(self, first: _Pending | _Task | None) -> list[_Pending | _Task | None]:
        """``first`` and what else is queued, waiting a moment for requests on their way while
        concurrent callers are expected (see ``agent.grouping``)."""
        items: list[_Pending | _Task | None] = []
        item: _Pending | _Task | None = first
        started = time.monotonic()
        gathered = 0
        while True:
            if item is None:
                self._stop_seen = True  # finish what came before, then stop
            else:
                items.append(item)
                gathered += isinstance(item, _Pending)
            if len(items) >= MAX_GROUP or self._stop_seen:
                break
            wait = linger_left(gathered, self._expected, started, time.monotonic())
            try:
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
        if gathered:
            self._expected = gathered
        return items

    def _large(self, group: list[_Pending]) -> bool:
        """Whether ``group`` may change ``LARGE_BATCH`` entries or more."""
        named = 0
        for p in group:
            cmd = p.cmd
            if _names_whole_state(cmd):
                named += len(self.view.entries)  # may remove any of them
            named += len(getattr(cmd, "entries", ())) + len(getattr(cmd, "addresses", ()))
        return named >= LARGE_BATCH

    def _process(self, group: list[_Pending]) -> None:
        """Apply ``group``; on return every one of its requests has its answer."""
        try:
            self._apply_group(group)
        except AgentError as exc:
            if len(group) == 1:
                group[0].future.set_exception(exc)
                return
            # A grouped transaction was refused: apply one by one so only the culprit fails.
            for p in group:
                if not p.future.done():
                    self._process([p])
        except Exception as exc:  # noqa: BLE001  # a bug must not kill the writer: answer, count
            self.supervision.fault("writer", exc)
            for p in group:
                if not p.future.done():
                    p.future.set_exception(Unavailable("internal_error", str(exc)))

    def replayed(self, meta: RequestMeta) -> Outcome | None:
        """The original outcome of an already accepted request, checked before field validation.

        Raises ``AlreadyExists`` when the id was used with another payload.
        """
        return self._replay_of(meta, self.store.lookup_request(meta.request_id))

    def _replay_of(self, meta: RequestMeta, record: RequestRecord | None) -> Outcome | None:
        if record is None:
            return None
        if record.payload_digest != meta.payload_digest:
            raise AlreadyExists(
                "request_id_reused", f"request id {meta.request_id} was used with another payload"
            )
        if record.result is None:  # reduced by an erasure: nothing about the person remains
            return Outcome(meta.request_id, (), self.view.state_version)
        return Outcome.decode(record.result)

    def _apply_group(self, group: list[_Pending]) -> None:
        now = self.now_ms()
        base = self.view.working()
        self._load_ordering(base, group)
        # One query for the group's ids: a lookup per request would cost a read transaction
        # each, on the one thread every request waits for.
        stored = self.store.lookup_requests([p.cmd.meta.request_id for p in group])
        accepted: list[tuple[_Pending, Decision, Outcome]] = []
        seen: dict[str, bytes] = {}
        raised: list[tuple[Sequence[Event], int]] = []  # each decision's events, first version
        for p in group:
            meta = p.cmd.meta
            try:
                if meta.request_id in seen:  # the same id twice in one group
                    if seen[meta.request_id] != meta.payload_digest:
                        raise AlreadyExists(
                            "request_id_reused", f"{meta.request_id} with another payload"
                        )
                    replay = None
                else:
                    replay = self._replay_of(meta, stored.get(meta.request_id))
                if replay is not None:
                    p.future.set_result(replay)
                    continue
                decision = decide(base, p.cmd, now, self.limits, self.profiles)
            except AgentError as exc:
                p.future.set_exception(exc)
                continue
            first_version = base.state_version
            base.fold(decision)
            seen[meta.request_id] = meta.payload_digest
            raised.append((decision.events, first_version))
            accepted.append(
                (p, decision, Outcome(meta.request_id, decision.results, base.state_version))
            )
        if not accepted:
            return
        events, history_floor = newest_numbered(raised, self._keep)
        self._commit(_Group(base, accepted, events, history_floor, now))

    def _load_ordering(self, view: StateView, group: list[_Pending]) -> None:
        """The ordering marks the group's decisions can be STALE against: those of the keys
        its requests name or revoke by subject and, for a Sync (which names the whole state),
        the marks newer than the Sync: an older one cannot make it STALE."""
        keys: set[tuple[str, str]] = set()
        newer_than: int | None = None
        for p in group:
            cmd = p.cmd
            if isinstance(cmd, SyncCmd):
                issued = cmd.meta.issued_at_ms
                newer_than = issued if newer_than is None else min(newer_than, issued)
            elif isinstance(cmd, AllowCmd):
                keys.update((a.profile, a.address.text) for a in cmd.entries)
            elif isinstance(cmd, RevokeCmd):
                named = view.by_subject(cmd.subject, cmd.profile) if cmd.subject else ()
                keys.update((e.key.profile, e.key.address.text) for e in named)
                keys.update((prof, a.text) for a in cmd.addresses for prof in self.profiles)
        marks = self.store.last_issued_at(keys) if keys else {}
        if newer_than is not None:
            marks.update(self.store.ordering_after(newer_than))
        for (prof, addr), issued in marks.items():
            view.last_issued[EntryKey(prof, Address.trusted(addr))] = issued

    def _commit(self, group: _Group) -> None:
        final, accepted, events, now = group.final, group.accepted, group.events, group.now
        before = self.view.entries
        touched = {e.key for _, d, _ in accepted for e in (*d.upserts, *d.removals)}
        upserts, removals, refreshed = _partition(touched, before, final.entries)
        changes = len(upserts) + len(removals)

        # Before the kernel allows them: no cut still to run may take their fresh flows.
        self.cutter.allowing(e.key.address for e in upserts)
        intent_id = uuid.uuid4().hex
        stored_upserts = tuple(map(to_stored, upserts))  # for the intent and the commit
        self.store.write_intent(
            PendingIntent(
                intent_id,
                now,
                tuple(IntentChange("upsert", e) for e in stored_upserts)
                + tuple(IntentChange("remove", to_stored(e)) for e in removals),
            )
        )
        # A big group's kernel transaction runs on its own thread (libnftables gives up the
        # GIL) while this one writes the rows; COMMIT waits for the kernel's answer, so the
        # order stays intent -> kernel -> commit, and a refused transaction rolls the rows back.
        applying = self._start(
            changes >= OVERLAP_BATCH,
            functools.partial(
                self.table.apply,
                [element_for(e, now) for e in upserts],
                [e.key for e in removals],
                present=refreshed | {e.key for e in removals},
            ),
        )
        try:
            erase = next((d.erase_subject for _, d, _ in accepted if d.erase_subject), None)
            erasure = self._erasure(erase, removals, now) if erase else None
            erased_stored = (
                self.store.count_subject_records(erasure.subject, set(erasure.addresses))
                if erasure
                else 0
            )
            batch = commit_batch(
                final,
                [(p.cmd, d, o) for p, d, o in accepted],
                now=now,
                events=events,
                history_floor=group.history_floor,
                upserts=stored_upserts,
                removals=removals,
                forget_window_ms=self.forget_window_ms,
                intent_id=intent_id,
                erasure=erasure,
                erased_stored=erased_stored,
            )
            erased = self.store.commit(batch, ready=applying.result)
        except AgentError:
            refused = _failure(applying)
            if refused is not None:
                self.store.discard_intent(intent_id)
                raise refused from None
            # Nothing was recorded (a full disk, a failing store): take the kernel back to what
            # the store says, so a refused request changes nothing. If even that fails, the
            # pending intent and the next verification converge the kernel to the store.
            self._undo(upserts, removals, refreshed, before, now)
            raise
        finally:
            wait([applying])
        self._large_batch_done |= changes >= LARGE_BATCH
        with self._lock:
            self.view.adopt(final)
            self._history.extend(events)
            if erasure is not None:
                self._forget_history(erasure)
        _add_deadlines(self._deadlines, upserts)
        self._announce()
        for p, d, o in accepted:
            p.changed = len(d.upserts) + len(d.removals)
            answer = (
                Outcome(o.request_id, o.results, o.state_version, erased) if d.erase_subject else o
            )
            p.future.set_result(answer)
        self._flows_to_cut += (e.key.address for e in removals)

    def _cut_flows(self) -> None:
        """Hand the sources the last group removed to the flow cutter, after its callers were
        handed their answers: the sets already drop the sources' original-direction packets,
        and finding the flows walks the conntrack table (tens of milliseconds), which the
        writer must not wait for."""
        if self._flows_to_cut:
            addresses, self._flows_to_cut = self._flows_to_cut, []
            self.cutter.cut(addresses)

    def _start(self, beside: bool, transaction: Callable[[], object]) -> Future[object]:
        """The kernel transaction, on the kernel thread (``beside``) or here and now."""
        if beside:
            return self._kernel.submit(transaction)
        done: Future[object] = Future()
        try:
            done.set_result(transaction())
        except Exception as exc:  # noqa: BLE001  # handed over as the thread's would be
            done.set_exception(exc)
        return done

    def release_memory_soon(self) -> None:
        """Give freed memory back on the writer's next idle turn (any thread: a large request
        was refused before it reached the writer)."""
        self._large_batch_done = True

    def _release_memory(self) -> None:
        """After a large batch, on the first idle turn (its request and answer are gone by
        then): the store's page caches, unreachable cycles, and the C heap's free pages go
        back. A 100,000-entry Sync leaves about 90 MB that would otherwise stay with the
        process.

        What survives is frozen out of the collector's reach (``gc.freeze``): the entries are
        acyclic and freed by reference counting when they go, and a full collection walking
        100,000 of them held every thread 130 to 370 ms on a loaded machine - in the middle of
        a mass expiry, too. Objects made later are collected as usual."""
        self._large_batch_done = False
        self.store.release_memory()
        gc.collect()
        gc.freeze()
        release_free_memory()

    def _undo(
        self,
        upserts: list[Entry],
        removals: list[Entry],
        refreshed: set[EntryKey],
        before: Mapping[EntryKey, Entry],
        now: int,
    ) -> None:
        restore = [before[e.key] for e in removals] + [before[k] for k in refreshed]
        added = [e.key for e in upserts if e.key not in refreshed]
        try:
            self.table.apply(
                [element_for(e, now) for e in restore if e.expires_at_ms > now],
                added,
                present={e.key for e in upserts},
            )
        except AgentError:
            log.exception("could not undo a kernel change the store refused to record")
        else:
            log.warning(
                "the store refused a change; the kernel change was undone",
                extra={"REASON": "store_refused"},
            )

    def _forget_history(self, erasure: Erasure) -> None:
        """Cut the retained events up to the newest naming the erased subject or one of its
        addresses, as the store does (a watcher that had not seen them is told to resync)."""
        names = set(erasure.addresses)
        naming = [
            e.state_version
            for e in self._history
            if e.entry is not None
            and (e.entry.subject == erasure.subject or e.entry.key.address.text in names)
        ]
        while naming and self._history and self._history[0].state_version <= max(naming):
            self._history.popleft()

    def _erasure(self, subject: str, removals: list[Entry], now: int) -> Erasure:
        addresses = {e.key.address.text for e in removals if e.subject == subject}
        addresses |= self.store.addresses_of_subject(subject)
        return Erasure(subject, tuple(sorted(addresses)), now)

    # --- expiry ------------------------------------------------------------------------------

    def _expiry_due(self) -> bool:
        """Whether an entry's time has come (stale deadlines included: they go quickly)."""
        return bool(self._deadlines) and self._deadlines[0][0] <= self.now_ms()

    def _expire(self) -> None:
        """Turn entries the kernel has stopped matching into EXPIRED events and state changes,
        one slice of them (see agent.expiry_slices): the writer takes the next request group
        before the next slice, so a mass expiry never holds it for long."""
        started = self._monotonic()
        expired = self._expire_slice(self._slices.size)
        if expired > 0:
            self._slices.observe(expired, self._monotonic() - started)

    def _expire_slice(self, limit: int) -> int:
        """Expire up to ``limit`` due entries; the number expired, -1 if the store refused."""
        now = self.now_ms()
        due: list[_Deadline] = []
        while self._deadlines and self._deadlines[0][0] <= now and len(due) < limit:
            due.append(heapq.heappop(self._deadlines))
        if not due:
            return 0
        keys = dict.fromkeys(EntryKey(p, Address.trusted(a)) for _, a, p in due)
        expired = self._record_expiries(keys, now)
        if expired < 0:
            for item in due:
                heapq.heappush(self._deadlines, item)
        return expired

    def _expire_for(self, group: list[_Pending]) -> None:
        """Before ``group`` is decided: expire what it may see, so that a decision never meets
        an entry whose time has passed (an Allow of one is ADDED, a Revoke of one NOT_FOUND).
        The entries a group names are few and looked at alone; a group that may change any
        entry (a Sync, an Erase, a Revoke by subject) waits for every due one."""
        if not self._expiry_due():
            return
        # A small slice first: usually all that is due (or only deadlines left stale by
        # refreshes), and it takes a mass expiry on a little while requests keep coming.
        self._expire_slice(PRE_GROUP_SLICE)
        if not self._expiry_due():
            return
        if any(_names_whole_state(p.cmd) for p in group):
            while self._expiry_due() and self._expire_slice(self._slices.size) >= 0:
                pass
            return
        named: dict[EntryKey, None] = {}
        for p in group:
            cmd = p.cmd
            if isinstance(cmd, AllowCmd):
                named.update((EntryKey(a.profile, a.address), None) for a in cmd.entries)
            elif isinstance(cmd, RevokeCmd):
                prof = (cmd.profile,) if cmd.profile else self.profiles
                named.update((EntryKey(pr, a), None) for a in cmd.addresses for pr in prof)
        # Their deadlines stay in the heap and are dropped as stale when their turn comes.
        self._record_expiries(named, self.now_ms())

    def _record_expiries(self, keys: Mapping[EntryKey, None], now: int) -> int:
        """Expire the due ones of ``keys``: the number expired, -1 if the store refused."""
        with self._lock:
            decision = expire(self.view, now, keys)
        if not decision.removals:
            return 0  # every one was stale: refreshed or removed since
        final = self.view.working()
        first = final.state_version
        final.fold(decision)
        events, history_floor = newest_numbered([(decision.events, first)], self._keep)
        try:
            self.store.commit(
                CommitBatch(
                    state_version=final.state_version,
                    removals=tuple((e.key.profile, e.key.address.text) for e in decision.removals),
                    events=tuple(map(to_stored_event, events)),
                    history_floor=history_floor,
                    audit=tuple(expiry_audit(e, now) for e in decision.removals),
                )
            )
        except AgentError:
            log.exception("could not record expiries; will retry")
            return -1
        with self._lock:
            self.view.adopt(final)
            self._history.extend(events)
        self.expiries += len(decision.events)
        self._announce()
        return len(decision.removals)
