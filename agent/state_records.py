"""The allow state's values as the store's records and the kernel's elements, and back.

Pure: owns how an ``Entry`` or ``Event`` is written down (a stored row, an intent change, an
audit row, a kernel element with its remaining timeout and comment); decides nothing and
performs no I/O. The engine and the reconciler both write through it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from agent.model import Address, Element, EntryKey
from agent.rules.render import element_comment
from agent.state import Entry, Event
from agent.store_records import AuditRecord, StoredEntry, StoredEvent


def to_stored(e: Entry) -> StoredEntry:
    return StoredEntry(
        profile=e.key.profile,
        address=e.key.address.text,
        subject=e.subject,
        created_at_ms=e.created_at_ms,
        expires_at_ms=e.expires_at_ms,
        request_id=e.request_id,
        local=e.local,
    )


def to_stored_event(e: Event) -> StoredEvent:
    return StoredEvent(
        state_version=e.state_version,
        at_ms=e.at_ms,
        kind=e.kind.name,
        entry=to_stored(e.entry) if e.entry else None,
        detail=e.detail,
    )


def entries_from_rows(
    rows: Iterable[tuple[str, str, str, int, int, str, int]],
) -> dict[EntryKey, Entry]:
    """The state's entries from the store's rows, whose addresses are in normal form.

    Each row comes with its own copy of values that most entries share (the profile, and a
    Sync's request id and times): one object per value is kept, ~20 MB less at 100,000.
    """
    entries: dict[EntryKey, Entry] = {}
    shared: dict[object, Any] = {}
    one = shared.setdefault
    for profile, address, subject, created, expires, request_id, _local in rows:
        key = EntryKey(one(profile, profile), Address.trusted(address))
        entries[key] = Entry(
            key, subject, one(created, created), one(expires, expires), one(request_id, request_id)
        )
    return entries


def from_stored(s: StoredEntry) -> Entry:
    """The entry of a stored row; the store only ever holds addresses in normal form."""
    return Entry(
        key=EntryKey(s.profile, Address.trusted(s.address)),
        subject=s.subject,
        created_at_ms=s.created_at_ms,
        expires_at_ms=s.expires_at_ms,
        request_id=s.request_id,
    )


def expiry_audit(e: Entry, now_ms: int) -> AuditRecord:
    """The audit row of an entry whose time ran out (no caller, no key: the kernel did it)."""
    return AuditRecord(
        now_ms, "expired", e.key.profile, e.key.address.text, e.subject, e.request_id, "", ""
    )


def event_audit(
    e: Event, entry: Entry, at_ms: int, request_id: str, *, caller: str = "", keyid: str = ""
) -> AuditRecord:
    """The audit row of an event that changed ``entry`` (the event's own), on behalf of
    ``request_id`` (and ``caller`` with ``keyid``, when known)."""
    return AuditRecord(
        at_ms,
        e.kind.name.lower(),
        entry.key.profile,
        entry.key.address.text,
        entry.subject,
        request_id,
        caller,
        keyid,
        e.detail,
    )


def settled_audit(e: Event) -> AuditRecord:
    """The audit row of a change rolled forward at start-up (``reconcile.settled_events``):
    who asked for it is not known, as an intent does not record the caller."""
    if e.entry is None:
        raise ValueError("a settled change names its entry")
    return event_audit(e, e.entry, e.at_ms, e.entry.request_id)


def element_for(e: Entry, now_ms: int) -> Element:
    """The kernel element of an entry, with the timeout that remains of it (at least 1 s)."""
    remaining = max(1, -(-(e.expires_at_ms - now_ms) // 1000))
    return Element(e.key, remaining, element_comment(e.subject, e.request_id, local=e.local))
