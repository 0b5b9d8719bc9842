"""Pure state transitions of the allow state: commands in, entry changes, results and events out.

Owns the protocol's semantics of Allow, Revoke, Sync and Erase (refresh, STALE ordering,
NOT_FOUND, Sync removals, state_version counting). Performs no I/O and reads no clock: the
engine passes ``now_ms`` and persists and applies what ``decide`` returns.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace

from agent.entry_changes import EntryChanges
from agent.errors import FailedPrecondition, ResourceExhausted
from agent.model import Address, AllowEntry, EntryKey


class Status(enum.IntEnum):
    """Per-entry outcome; values equal the protocol's ``Status`` enum."""

    ADDED = 1
    REFRESHED = 2
    REMOVED = 3
    NOT_FOUND = 4
    STALE = 5


class EventKind(enum.IntEnum):
    """Values equal the protocol's ``AgentEvent.Kind``."""

    ADDED = 1
    REFRESHED = 2
    REMOVED = 3
    EXPIRED = 4
    DRIFT_REPAIRED = 5
    RELOADED = 6
    RESYNC_REQUIRED = 7


# Events retained, in memory for WatchEvents and in the store across restarts.
HISTORY = 10_000

LOCAL_PREFIX = "local-"


def is_local(request_id: str) -> bool:
    """Whether ``request_id`` is an on-host grant's (the local socket's), not the control
    plane's."""
    return request_id.startswith(LOCAL_PREFIX)


@dataclass(frozen=True, slots=True)
class Entry:
    """An entry of the allow state, as stored and reported."""

    key: EntryKey
    subject: str
    created_at_ms: int
    expires_at_ms: int
    request_id: str

    @property
    def local(self) -> bool:
        return is_local(self.request_id)


@dataclass(frozen=True, slots=True)
class RequestMeta:
    """What the authenticated header and transport say about a request."""

    request_id: str
    rpc: str
    issued_at_ms: int
    expires_at_ms: int
    payload_digest: bytes
    caller: str = ""
    keyid: str = ""


@dataclass(frozen=True, slots=True)
class AllowCmd:
    meta: RequestMeta
    entries: tuple[AllowEntry, ...]


@dataclass(frozen=True, slots=True)
class RevokeCmd:
    """Revoke ``addresses`` (in ``profile``, or every profile when empty), or all of ``subject``."""

    meta: RequestMeta
    addresses: tuple[Address, ...] = ()
    subject: str = ""
    profile: str = ""


@dataclass(frozen=True, slots=True)
class SyncCmd:
    meta: RequestMeta
    entries: tuple[AllowEntry, ...]


@dataclass(frozen=True, slots=True)
class EraseCmd:
    meta: RequestMeta
    subject: str


Command = AllowCmd | RevokeCmd | SyncCmd | EraseCmd


@dataclass(frozen=True, slots=True)
class EntryResult:
    address: str
    profile: str
    status: Status
    expires_at_ms: int = 0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    at_ms: int
    entry: Entry | None
    detail: str = ""
    state_version: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    """What one command does: entry changes, its results and the events of each change."""

    upserts: tuple[Entry, ...] = ()
    removals: tuple[Entry, ...] = ()
    results: tuple[EntryResult, ...] = ()
    events: tuple[Event, ...] = ()
    ordering: tuple[tuple[EntryKey, int], ...] = ()
    sync_issued_at_ms: int | None = None
    erase_subject: str | None = None

    @property
    def changes(self) -> int:
        return len(self.events)


@dataclass(slots=True)
class StateView:
    """A mutable view of the allow state (entries, ordering memory): the engine's live one, or
    a group's ``working`` view over it that the decisions are folded into."""

    entries: MutableMapping[EntryKey, Entry] = field(default_factory=dict)
    last_issued: dict[EntryKey, int] = field(default_factory=dict)
    last_sync_issued_at_ms: int = 0
    state_version: int = 0

    def fold(self, d: Decision) -> None:
        for e in d.removals:
            self.entries.pop(e.key, None)
        for e in d.upserts:
            self.entries[e.key] = e
        for key, issued in d.ordering:
            self.last_issued[key] = max(issued, self.last_issued.get(key, issued))
        if d.sync_issued_at_ms is not None:
            self.last_sync_issued_at_ms = d.sync_issued_at_ms
        self.state_version += d.changes

    def detached(self) -> StateView:
        """A copy to fold a group into: entries and counters, without the ordering cache."""
        return StateView(
            entries=dict(self.entries),
            last_sync_issued_at_ms=self.last_sync_issued_at_ms,
            state_version=self.state_version,
        )

    def working(self) -> StateView:
        """A view to fold a group into: its changes kept over these entries, which stay as they
        are until ``adopt`` takes the group in (no copy of them; see ``EntryChanges``)."""
        return StateView(
            entries=EntryChanges(self.entries),
            last_sync_issued_at_ms=self.last_sync_issued_at_ms,
            state_version=self.state_version,
        )

    def adopt(self, group: StateView) -> None:
        """Take in a committed ``working`` view of this one: its entry changes and counters
        (not its ordering cache, which is loaded for each group)."""
        changes = group.entries
        if not isinstance(changes, EntryChanges) or changes.base is not self.entries:
            raise ValueError("only a working view of this view can be adopted")
        changes.write_to(self.entries)
        self.last_sync_issued_at_ms = group.last_sync_issued_at_ms
        self.state_version = group.state_version

    def by_subject(self, subject: str, profile: str = "") -> list[Entry]:
        return [
            e
            for e in self.entries.values()
            if e.subject == subject and (not profile or e.key.profile == profile)
        ]

    def count(self, profile: str, family: int) -> int:
        return sum(1 for k in self.entries if k.profile == profile and k.address.family == family)


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps checked before ordering (PROTOCOL.md order of checks)."""

    max_entries: int
    set_size: Mapping[int, int]  # family -> per-(profile, family) set size


def numbered(events: Iterable[Event], first_version: int) -> list[Event]:
    """``events`` carrying the versions their changes produce, after ``first_version``."""
    return [
        Event(e.kind, e.at_ms, e.entry, e.detail, first_version + i + 1)
        for i, e in enumerate(events)
    ]


def newest_numbered(
    raised: Sequence[tuple[Sequence[Event], int]], keep: int = HISTORY
) -> tuple[list[Event], int]:
    """The newest ``keep`` of a group's events, numbered, and the version through which the
    group's older ones are not kept (0: all are). ``raised``: each decision's events with the
    version before them. A 100,000-entry Sync numbers 10,000 events, not 100,000."""
    total = sum(len(evs) for evs, _ in raised)
    skip = max(0, total - keep)
    newest: list[Event] = []
    for evs, first in raised:
        if skip >= len(evs):
            skip -= len(evs)
            continue
        newest += numbered(evs[skip:], first + skip)
        skip = 0
    if total <= keep:
        return newest, 0
    last_evs, last_first = raised[-1]
    return newest, (newest[0].state_version if newest else last_first + len(last_evs) + 1) - 1


def order_floor(view: StateView, meta: RequestMeta) -> int:
    """The ``issued_at`` below which ``meta``'s request is STALE on every address.

    A Sync states the whole dynamic set as of its ``issued_at``, so it is the last operation
    applied to every address, named or not: an Allow or Revoke issued before it is STALE, and
    the outcome does not depend on which of the two arrived first. This floor stands in for an
    ordering mark per address of the Sync. On-host requests, which a Sync never touches, are
    ordered by their own per-address marks only.
    """
    return 0 if is_local(meta.request_id) else view.last_sync_issued_at_ms


def _is_stale(view: StateView, key: EntryKey, issued_at_ms: int, floor: int) -> bool:
    return issued_at_ms < max(floor, view.last_issued.get(key, issued_at_ms))


def _entry(a: AllowEntry, meta: RequestMeta, now_ms: int, old: Entry | None) -> Entry:
    return Entry(
        key=a.key,
        subject=a.subject,
        created_at_ms=old.created_at_ms if old else now_ms,
        expires_at_ms=now_ms + a.ttl_seconds * 1000,
        request_id=meta.request_id,
    )


def _upsert(
    view: StateView, a: AllowEntry, meta: RequestMeta, now_ms: int, floor: int
) -> tuple[Entry | None, EntryResult, Event | None]:
    key = a.key
    old = view.entries.get(key)
    if _is_stale(view, key, meta.issued_at_ms, floor):
        return (
            None,
            EntryResult(
                key.address.text,
                key.profile,
                Status.STALE,
                old.expires_at_ms if old else 0,
                "stale_request",
            ),
            None,
        )
    new = _entry(a, meta, now_ms, old)
    status = Status.REFRESHED if old else Status.ADDED
    kind = EventKind.REFRESHED if old else EventKind.ADDED
    return (
        new,
        EntryResult(key.address.text, key.profile, status, new.expires_at_ms),
        Event(kind, now_ms, new),
    )


def _check_caps(
    view: StateView, added: Iterable[EntryKey], removed: Iterable[EntryKey], limits: Limits
) -> None:
    delta: dict[tuple[str, int], int] = {}
    total = len(view.entries)
    for k in added:
        if k not in view.entries:
            delta[(k.profile, k.address.family)] = delta.get((k.profile, k.address.family), 0) + 1
            total += 1
    for k in removed:
        if k in view.entries:
            delta[(k.profile, k.address.family)] = delta.get((k.profile, k.address.family), 0) - 1
            total -= 1
    if total > limits.max_entries:
        raise ResourceExhausted(
            "entry_cap", f"would hold {total} entries, cap {limits.max_entries}"
        )
    for (profile, family), d in delta.items():
        size = limits.set_size[family]
        # The set holds a subset of all entries: only count it (a walk over every entry) when
        # the whole state could overflow it, which keeps a single Allow O(1) on a big state.
        if d > 0 and len(view.entries) + d > size and view.count(profile, family) + d > size:
            raise ResourceExhausted(
                "set_full", f"profile {profile} IPv{family} set holds at most {size} entries"
            )


def decide_allow(view: StateView, cmd: AllowCmd, now_ms: int, limits: Limits) -> Decision:
    _check_caps(view, (a.key for a in cmd.entries), (), limits)
    floor = order_floor(view, cmd.meta)
    ups, results, events = [], [], []
    for a in cmd.entries:
        new, res, ev = _upsert(view, a, cmd.meta, now_ms, floor)
        results.append(res)
        if new and ev:
            ups.append(new)
            events.append(ev)
    return Decision(
        upserts=tuple(ups),
        results=tuple(results),
        events=tuple(events),
        ordering=tuple((a.key, cmd.meta.issued_at_ms) for a in cmd.entries),
    )


def _revoke_targets(view: StateView, cmd: RevokeCmd, profiles: Iterable[str]) -> list[EntryKey]:
    if cmd.subject:
        return [e.key for e in view.by_subject(cmd.subject, cmd.profile)]
    names = [cmd.profile] if cmd.profile else list(profiles)
    keys: list[EntryKey] = []
    for addr in cmd.addresses:
        matched = [EntryKey(p, addr) for p in names if EntryKey(p, addr) in view.entries]
        # An address in no profile is reported once, against the requested (or default) profile.
        keys += matched or [EntryKey(cmd.profile, addr)]
    return keys


def decide_revoke(
    view: StateView, cmd: RevokeCmd, now_ms: int, profiles: Iterable[str]
) -> Decision:
    names = list(profiles)
    floor = order_floor(view, cmd.meta)
    removals, results, events, ordering = [], [], [], []
    for key in _revoke_targets(view, cmd, names):
        old = view.entries.get(key)
        if old is None:
            results.append(EntryResult(key.address.text, key.profile, Status.NOT_FOUND))
            # Remember the revoke so a delayed older Allow cannot resurrect the address.
            for p in [key.profile] if key.profile else names:
                ordering.append((EntryKey(p, key.address), cmd.meta.issued_at_ms))
            continue
        if _is_stale(view, key, cmd.meta.issued_at_ms, floor):
            results.append(
                EntryResult(
                    key.address.text, key.profile, Status.STALE, old.expires_at_ms, "stale_request"
                )
            )
            continue
        removals.append(old)
        ordering.append((key, cmd.meta.issued_at_ms))
        results.append(EntryResult(key.address.text, key.profile, Status.REMOVED))
        events.append(Event(EventKind.REMOVED, now_ms, old, f"revoked by {cmd.meta.request_id}"))
    return Decision(
        removals=tuple(removals),
        results=tuple(results),
        events=tuple(events),
        ordering=tuple(ordering),
    )


def decide_sync(view: StateView, cmd: SyncCmd, now_ms: int, limits: Limits) -> Decision:
    issued = cmd.meta.issued_at_ms
    if issued <= view.last_sync_issued_at_ms:
        raise FailedPrecondition(
            "stale_sync",
            f"issued_at {issued} is not newer than the last applied Sync "
            f"({view.last_sync_issued_at_ms})",
        )
    wanted = {a.key for a in cmd.entries}
    # Local grants (the on-host fallback portal) are never touched by a Sync.
    doomed = [e for k, e in view.entries.items() if k not in wanted and not e.local]
    _check_caps(view, wanted, (e.key for e in doomed), limits)
    # Newer than the floor (the last Sync) by the check above: only a newer mark makes it STALE.
    ups, removals, results, events = [], [], [], []
    for a in cmd.entries:
        new, res, ev = _upsert(view, a, cmd.meta, now_ms, 0)
        results.append(res)
        if new and ev:
            ups.append(new)
            events.append(ev)
    for old in doomed:
        if _is_stale(view, old.key, issued, 0):
            results.append(
                EntryResult(
                    old.key.address.text,
                    old.key.profile,
                    Status.STALE,
                    old.expires_at_ms,
                    "stale_request",
                )
            )
            continue
        removals.append(old)
        results.append(EntryResult(old.key.address.text, old.key.profile, Status.REMOVED))
        events.append(Event(EventKind.REMOVED, now_ms, old, f"not in sync {cmd.meta.request_id}"))
    # No ordering mark per address: ``sync_issued_at_ms`` orders them all (``order_floor``).
    return Decision(
        upserts=tuple(ups),
        removals=tuple(removals),
        results=tuple(results),
        events=tuple(events),
        sync_issued_at_ms=issued,
    )


def decide_erase(view: StateView, cmd: EraseCmd, now_ms: int) -> Decision:
    removals, results, events = [], [], []
    for old in view.by_subject(cmd.subject):
        removals.append(old)
        results.append(EntryResult(old.key.address.text, old.key.profile, Status.REMOVED))
        events.append(Event(EventKind.REMOVED, now_ms, replace(old, subject=""), "erased"))
    return Decision(
        removals=tuple(removals),
        results=tuple(results),
        events=tuple(events),
        ordering=tuple((e.key, cmd.meta.issued_at_ms) for e in removals),
        erase_subject=cmd.subject,
    )


def decide(
    view: StateView, cmd: Command, now_ms: int, limits: Limits, profiles: Iterable[str]
) -> Decision:
    """The effect of ``cmd`` on ``view`` (not yet folded in); raises for refused commands."""
    if isinstance(cmd, AllowCmd):
        return decide_allow(view, cmd, now_ms, limits)
    if isinstance(cmd, RevokeCmd):
        return decide_revoke(view, cmd, now_ms, profiles)
    if isinstance(cmd, SyncCmd):
        return decide_sync(view, cmd, now_ms, limits)
    return decide_erase(view, cmd, now_ms)


def expire(view: StateView, now_ms: int, keys: Iterable[EntryKey] | None = None) -> Decision:
    """Entries whose time has passed: the kernel already stopped matching them.

    ``keys``: look only at these (in this order), not at every entry; absent ones are skipped.
    """
    if keys is None:
        candidates: Iterable[Entry] = view.entries.values()
    else:
        candidates = (e for e in map(view.entries.get, keys) if e is not None)
    gone = [e for e in candidates if e.expires_at_ms <= now_ms]
    return Decision(
        removals=tuple(gone),
        events=tuple(Event(EventKind.EXPIRED, now_ms, e) for e in gone),
    )
