"""What a group commit writes down besides its entries: the requests' records (replay and
Erase), audit rows, ordering marks and numbered events, as one ``CommitBatch``.

Pure: builds records from a group's decisions and never reads the store; the engine passes in
what it read (how many stored records an Erase removes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from agent.model import EntryKey
from agent.outcome import Outcome
from agent.state import Command, Decision, Entry, EraseCmd, Event, StateView
from agent.state_records import event_audit, to_stored_event
from agent.store_records import (
    AuditRecord,
    CommitBatch,
    Erasure,
    NewRequest,
    OrderingMark,
    RequestRecord,
    StoredEntry,
)

# One accepted request of a group: its command, what it decided, and its answer.
Accepted = tuple[Command, Decision, Outcome]


def commit_batch(
    final: StateView,
    accepted: Sequence[Accepted],
    *,
    now: int,
    events: Sequence[Event],
    history_floor: int,
    upserts: tuple[StoredEntry, ...],
    removals: Sequence[Entry],
    forget_window_ms: int,
    intent_id: str,
    erasure: Erasure | None = None,
    erased_stored: int = 0,
) -> CommitBatch:
    """The group's records, in one batch. ``final``: the state the group leads to; ``events``
    and ``history_floor``: its numbered events as the history keeps them; ``erased_stored``:
    the records of ``erasure``'s person the store holds before this batch."""
    requests = tuple(request_record(cmd, o, forget_window_ms) for cmd, _, o in accepted)
    audit = tuple(a for cmd, d, _ in accepted for a in audit_rows(cmd, d, now))
    if erasure is not None:
        requests = _erase_results(accepted, requests, audit, erasure, erased_stored)
    return CommitBatch(
        state_version=final.state_version,
        upserts=upserts,
        removals=tuple((e.key.profile, e.key.address.text) for e in removals),
        requests=requests,
        audit=audit,
        ordering=tuple(
            OrderingMark(
                k.profile, k.address.text, issued, forget_after(final, k, now, forget_window_ms)
            )
            for _, d, _ in accepted
            for k, issued in d.ordering
        ),
        events=tuple(map(to_stored_event, events)),
        history_floor=history_floor,
        last_sync_issued_at_ms=next(
            (d.sync_issued_at_ms for _, d, _ in accepted if d.sync_issued_at_ms), None
        ),
        intent_id=intent_id,
        erase=erasure,
    )


def forget_after(view: StateView, key: EntryKey, now: int, forget_window_ms: int) -> int:
    """When the ordering memory of ``key`` may go: a window after its entry (if any) ends."""
    entry = view.entries.get(key)
    until = max(now, entry.expires_at_ms if entry else now)
    return until + forget_window_ms


def request_record(cmd: Command, outcome: Outcome, forget_window_ms: int) -> NewRequest:
    """The request log's record of an accepted request, with the names an Erase looks for."""
    meta = cmd.meta
    record = RequestRecord(
        request_id=meta.request_id,
        rpc=meta.rpc,
        payload_digest=meta.payload_digest,
        keep_until_ms=meta.expires_at_ms + forget_window_ms,
        result=outcome.encode(),
    )
    if isinstance(cmd, EraseCmd):
        return NewRequest(record)  # names nobody, so it survives its own erasure
    subjects = {getattr(cmd, "subject", "")} | {a.subject for a in getattr(cmd, "entries", ())}
    addresses = {r.address for r in outcome.results}
    return NewRequest(record, tuple(s for s in subjects if s), tuple(addresses))


def audit_rows(cmd: Command, d: Decision, now: int) -> list[AuditRecord]:
    """An accepted request's audit rows: one per entry it changed (an Erase: one in all)."""
    meta = cmd.meta
    if isinstance(cmd, EraseCmd):
        return [
            AuditRecord(
                now,
                "erase",
                "",
                "",
                "",
                meta.request_id,
                meta.caller,
                meta.keyid,
                f"{len(d.removals)} entries revoked",
            )
        ]
    return [
        event_audit(e, e.entry, now, meta.request_id, caller=meta.caller, keyid=meta.keyid)
        for e in d.events
        if e.entry is not None
    ]


def _erase_results(
    accepted: Sequence[Accepted],
    requests: tuple[NewRequest, ...],
    audit: tuple[AuditRecord, ...],
    erasure: Erasure,
    erased_stored: int,
) -> tuple[NewRequest, ...]:
    """``requests`` with each Erase's stored result (what a retry gets back) reduced to its
    version and the number of records it erases: its entry results would name the erased
    person's addresses. The count is the store's erasure of this very batch."""
    names = set(erasure.addresses)
    count = erased_stored
    count += sum(1 for a in audit if a.subject == erasure.subject or a.address in names)
    count += sum(
        1 for r in requests if erasure.subject in r.subjects or names.intersection(r.addresses)
    )
    reduced = []
    for (cmd, _, o), request in zip(accepted, requests, strict=True):
        if isinstance(cmd, EraseCmd):
            result = Outcome(o.request_id, (), o.state_version, count).encode()
            reduced.append(replace(request, record=replace(request.record, result=result)))
        else:
            reduced.append(request)
    return tuple(reduced)
