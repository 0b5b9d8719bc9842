"""What a group commit writes down: decisions in, the batch of records out (no store, no kernel).

An Allow records its request with the names an Erase looks for, an audit row per changed entry
(who, with which key) and an ordering mark kept a window past the entry; an Erase's stored answer
counts what it erased and names nobody."""

from __future__ import annotations

from typing import Any

from agent.group_records import Accepted, commit_batch
from agent.model import Address, AllowEntry
from agent.outcome import Outcome
from agent.state import (
    AllowCmd,
    Command,
    EraseCmd,
    Limits,
    RequestMeta,
    StateView,
    decide,
)
from agent.state_records import to_stored
from agent.store_records import CommitBatch, Erasure

NOW = 1_800_000_000_000
WINDOW = 180_000
LIMITS = Limits(max_entries=100, set_size={4: 100, 6: 100})


def meta(rid: str, rpc: str) -> RequestMeta:
    return RequestMeta(rid, rpc, NOW - 1000, NOW + 60_000, b"d" * 32, "cp", "key-1")


def allow(rid: str, address: str, subject: str) -> AllowCmd:
    entry = AllowEntry(Address(address), "agent", 600, subject)
    return AllowCmd(meta(rid, "Allow"), (entry,))


def accept(view: StateView, *commands: Command) -> list[Accepted]:
    """Decide and fold ``commands`` in order, as the writer does for one group."""
    accepted: list[Accepted] = []
    for cmd in commands:
        d = decide(view, cmd, NOW, LIMITS, ("agent",))
        view.fold(d)
        accepted.append((cmd, d, Outcome(cmd.meta.request_id, d.results, view.state_version)))
    return accepted


def batch_of(view: StateView, accepted: list[Accepted], **given: Any) -> CommitBatch:
    """The group's batch, as the writer asks for it after its intent ``intent-1``."""
    args: dict[str, Any] = {"upserts": (), "removals": (), **given}
    return commit_batch(
        view,
        accepted,
        now=NOW,
        events=[],
        history_floor=0,
        forget_window_ms=WINDOW,
        intent_id="intent-1",
        **args,
    )


def test_an_allow_records_its_request_audit_row_and_ordering_mark() -> None:
    view = StateView().working()
    accepted = accept(view, allow("req-00000001", "198.18.0.7", "alice"))
    entry = view.entries[accepted[0][1].upserts[0].key]

    batch = batch_of(view, accepted, upserts=(to_stored(entry),))

    (request,) = batch.requests
    assert request.record.request_id == "req-00000001"
    assert request.record.keep_until_ms == NOW + 60_000 + WINDOW
    assert (request.subjects, request.addresses) == (("alice",), ("198.18.0.7",))
    assert Outcome.decode(request.record.result) == accepted[0][2]
    (audit,) = batch.audit
    assert (audit.action, audit.address, audit.subject) == ("added", "198.18.0.7", "alice")
    assert (audit.caller, audit.keyid, audit.request_id) == ("cp", "key-1", "req-00000001")
    (mark,) = batch.ordering
    assert (mark.address, mark.issued_at_ms) == ("198.18.0.7", NOW - 1000)
    assert mark.forget_after_ms == entry.expires_at_ms + WINDOW
    assert (batch.state_version, batch.intent_id) == (1, "intent-1")


def test_an_erase_answer_counts_the_records_it_erases_and_names_nobody() -> None:
    view = StateView().working()
    accepted = accept(
        view,
        allow("req-00000001", "198.18.0.7", "alice"),
        allow("req-00000002", "198.18.0.8", "bob"),
        EraseCmd(meta("req-00000003", "Erase"), "alice"),
    )
    removed = accepted[2][1].removals

    batch = batch_of(
        view,
        accepted,
        removals=removed,
        erasure=Erasure("alice", ("198.18.0.7",), NOW),
        erased_stored=5,  # what the store already held about her
    )

    erase = batch.requests[2]
    assert (erase.subjects, erase.addresses) == ((), ())
    answer = Outcome.decode(erase.record.result or b"")
    # 5 stored + alice's Allow of this batch: its request record and its audit row (the
    # Erase's own audit row names nobody).
    assert (answer.results, answer.erased_records) == ((), 5 + 2)
    assert [a.action for a in batch.audit] == ["added", "added", "erase"]
    assert batch.requests[1].record.result == accepted[1][2].encode()  # bob's answer as it was
