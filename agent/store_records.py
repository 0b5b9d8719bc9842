"""The records ``agent.store`` reads and writes: frozen values, validated when made.

Owns the shape of durable state (entries, replay records, audit rows, events, intents, commit
batches). Pure: no I/O and no protocol decisions; the engine fills these and the store persists
them as given. Checks are cheap on purpose (100,000 entries are rebuilt at every start), so
addresses are taken as normal-form text already validated by ``agent.policy``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

IntentOp = Literal["upsert", "remove"]
INTENT_OPS: frozenset[str] = frozenset({"upsert", "remove"})

# A key of the entries table and of ordering memory: (profile, normal-form address).
EntryKeyText = tuple[str, str]


class RecordError(ValueError):
    """A record or batch that cannot be stored as built: a bug of the caller, not of input."""


def _require_text(name: str, value: str) -> None:
    if not value:
        raise RecordError(f"{name} must not be empty")


def _require_time(name: str, value: int) -> None:
    if value < 0:
        raise RecordError(f"{name} must be a non-negative unix time in ms, got {value}")


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """One dynamic entry or local grant as the agent believes it to be.

    ``address`` is the normal form (``agent.model.Address.text``); ``local`` marks a grant made
    over the local socket (its ``request_id`` begins with ``local-``).
    """

    profile: str
    address: str
    subject: str
    created_at_ms: int
    expires_at_ms: int
    request_id: str
    local: bool = False

    def __post_init__(self) -> None:
        _require_text("profile", self.profile)
        _require_text("address", self.address)
        _require_time("created_at_ms", self.created_at_ms)
        _require_time("expires_at_ms", self.expires_at_ms)

    @property
    def key(self) -> EntryKeyText:
        return (self.profile, self.address)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What replay protection remembers of an accepted request.

    ``keep_until_ms`` is the instant after which the request can no longer be accepted by anyone:
    its ``expires_at`` plus the clock-skew tolerance. The store keeps the record until then and
    no longer (purge deletes it at ``now_ms >= keep_until_ms``). ``result`` is the serialized
    ``ApplyResult`` to answer a byte-identical retry with; it is ``None`` after an erasure
    reduced the record to what replay protection needs.
    """

    request_id: str
    rpc: str
    payload_digest: bytes
    keep_until_ms: int
    result: bytes | None

    def __post_init__(self) -> None:
        _require_text("request_id", self.request_id)
        _require_text("rpc", self.rpc)
        if not self.payload_digest:
            raise RecordError("payload_digest must not be empty")
        _require_time("keep_until_ms", self.keep_until_ms)


@dataclass(frozen=True, slots=True)
class NewRequest:
    """A request record to write, with the people and addresses it names.

    ``subjects`` and ``addresses`` are kept beside the record only so an erasure can find it;
    empty subjects are ignored. An ``Erase`` request should name nobody, so that its own record
    (and its result, for safe retries) survives the erasure it performs.
    """

    record: RequestRecord
    subjects: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One line of the audit log: who did what to which address, on whose behalf.

    ``caller`` is the mTLS identity (or ``local:uid=...`` for the local socket) and ``keyid``
    the key whose signature verified; empty strings where a field does not apply.
    """

    at_ms: int
    action: str
    profile: str
    address: str
    subject: str
    request_id: str
    caller: str
    keyid: str
    detail: str = ""

    def __post_init__(self) -> None:
        _require_time("at_ms", self.at_ms)
        _require_text("action", self.action)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One change of the allow state, as ``WatchEvents`` replays it.

    ``kind`` is the engine's word for the change (the store does not interpret it); ``entry`` is
    the entry after the change (or as it was, for a removal), ``None`` for events about no entry.
    """

    state_version: int
    at_ms: int
    kind: str
    entry: StoredEntry | None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.state_version < 1:
            raise RecordError(f"event state_version must be >= 1, got {self.state_version}")
        _require_time("at_ms", self.at_ms)
        _require_text("kind", self.kind)


@dataclass(frozen=True, slots=True)
class OrderingMark:
    """Ordering memory of one (profile, address): the last applied ``issued_at``.

    The store keeps the larger of the stored and the new values of both fields, so a mark can
    never move backwards; it forgets the row once ``now_ms >= forget_after_ms``.
    """

    profile: str
    address: str
    issued_at_ms: int
    forget_after_ms: int

    def __post_init__(self) -> None:
        _require_text("profile", self.profile)
        _require_text("address", self.address)
        _require_time("issued_at_ms", self.issued_at_ms)
        _require_time("forget_after_ms", self.forget_after_ms)


@dataclass(frozen=True, slots=True)
class IntentChange:
    op: IntentOp
    entry: StoredEntry

    def __post_init__(self) -> None:
        if self.op not in INTENT_OPS:
            raise RecordError(f"intent op must be 'upsert' or 'remove', got {self.op!r}")


@dataclass(frozen=True, slots=True)
class PendingIntent:
    """Changes about to be sent to the kernel, written first so a crash can be converged."""

    intent_id: str
    created_at_ms: int
    changes: tuple[IntentChange, ...]

    def __post_init__(self) -> None:
        _require_text("intent_id", self.intent_id)
        _require_time("created_at_ms", self.created_at_ms)


@dataclass(frozen=True, slots=True)
class Erasure:
    """Erase every audit and request record naming ``subject`` or one of ``addresses``."""

    subject: str
    addresses: tuple[str, ...]
    now_ms: int

    def __post_init__(self) -> None:
        # An empty subject would name every anonymous record (PROTOCOL.md Erase forbids it).
        _require_text("subject", self.subject)
        _require_time("now_ms", self.now_ms)


@dataclass(frozen=True, slots=True)
class CommitBatch:
    """Everything one group commit changes, written in one SQLite transaction.

    Applied in this order: entry removals, entry upserts, request records, audit rows, ordering
    marks, events, the state version and last Sync time, clearing ``intent_id``, then ``erase``
    (last, so nothing the transaction leaves names the erased person; see ``Store.commit``).
    ``state_version`` is the version after the batch (unchanged is allowed, lower is not);
    ``last_sync_issued_at_ms`` of ``None`` leaves the stored value alone. ``history_floor``
    above 0: the batch raised more events than the history retains, and only the newest are in
    ``events``; the stored history is cut through that version (PROTOCOL.md: older history is
    signalled, not invented).
    """

    state_version: int
    upserts: tuple[StoredEntry, ...] = ()
    removals: tuple[EntryKeyText, ...] = ()
    requests: tuple[NewRequest, ...] = ()
    audit: tuple[AuditRecord, ...] = ()
    ordering: tuple[OrderingMark, ...] = ()
    events: tuple[StoredEvent, ...] = ()
    last_sync_issued_at_ms: int | None = None
    intent_id: str | None = None
    erase: Erasure | None = None
    history_floor: int = 0

    def __post_init__(self) -> None:
        if self.state_version < 0:
            raise RecordError(f"state_version must be >= 0, got {self.state_version}")
        if not 0 <= self.history_floor <= self.state_version:
            raise RecordError(f"history_floor {self.history_floor} outside 0..state_version")
        previous = self.history_floor
        for event in self.events:
            if event.state_version <= previous or event.state_version > self.state_version:
                raise RecordError(
                    "events must have strictly increasing versions, none above the batch's "
                    f"state_version {self.state_version} (got {event.state_version})"
                )
            previous = event.state_version
        if self.upserts and self.removals:
            both = {e.key for e in self.upserts}.intersection(self.removals)
            if both:
                raise RecordError(f"keys both upserted and removed in one batch: {sorted(both)}")


@dataclass(frozen=True, slots=True)
class PurgeCounts:
    """How many rows a routine purge deleted, per kind."""

    audit: int
    requests: int
    ordering: int
    events: int


@dataclass(frozen=True, slots=True)
class EventPage:
    """Retained events after a version, read in one snapshot with the history's lower bound.

    Every event with ``state_version >= oldest_retained_version`` is retained; a watcher asking
    for the events after ``since`` missed history when ``since + 1 < oldest_retained_version``.
    """

    oldest_retained_version: int
    events: tuple[StoredEvent, ...]
