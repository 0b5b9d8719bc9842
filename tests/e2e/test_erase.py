"""Erase (GDPR erasure) end to end: after it, the state database names neither the person nor
one of their addresses, except the ordering memory the protocol needs ("Ordering memory").

The SQLite file is read directly (state_dir/state.db, its WAL included) while the daemon runs,
after the erased person's requests were replayed, so stored replay results are covered too.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from e2ekit import AgentRig, C, RawCaller, allow_entry, signed
from netlab import Lab

from agent.rpc.pb import agent_pb2

ALICE = "Alice O'Hara"
ALICE_ADDRESSES = ("198.18.16.1", "198.18.16.2", "2001:db8:0:16::/64")
BOB = "bob-the-builder"
BOB_ADDRESS = "198.18.16.9"
# Tables that may still hold an erased address: ordering memory names addresses and times only,
# and is kept so a delayed older Allow cannot resurrect a revoked entry.
MAY_NAME_ADDRESSES = {"ordering"}


def _rows(db: Path) -> Iterator[tuple[str, tuple[object, ...]]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):  # noqa: S608 (names from sqlite)
                yield table, tuple(row)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _naming(db: Path, needles: tuple[str, ...]) -> list[tuple[str, tuple[object, ...]]]:
    return [
        (table, row)
        for table, row in _rows(db)
        if any(needle in _text(v) for v in row for needle in needles)
    ]


def _watch(raw: RawCaller, until: int) -> list[agent_pb2.AgentEvent]:
    """The retained history from the start, up to state_version ``until`` (or 2 s)."""
    events: list[agent_pb2.AgentEvent] = []
    stream = raw.stub.WatchEvents(agent_pb2.WatchEventsRequest(since_state_version=0), timeout=2)
    try:
        for event in stream:
            events.append(event)
            if event.state_version >= until:
                break
    except grpc.RpcError as exc:
        if exc.code() != C.DEADLINE_EXCEEDED:
            raise
    finally:
        stream.cancel()
    return events


@pytest.fixture
def rig(lab: Lab, tmp_path: Path) -> Iterator[AgentRig]:
    with AgentRig.running(lab, tmp_path / "erase") as rig:
        yield rig


def test_erase_leaves_no_trace_of_the_person(rig: AgentRig) -> None:
    raw = rig.raw
    db = rig.agent.state_dir / "state.db"
    first = signed(
        agent_pb2.AllowRequest(
            header=raw.header(),
            entries=[allow_entry(a, 600, ALICE) for a in ALICE_ADDRESSES[:2]]
            + [allow_entry(BOB_ADDRESS, 600, BOB)],
        ),
        raw.signer,
    )
    assert raw.send("Allow", first).ok
    assert raw.allow(allow_entry("2001:db8:0:16::7", 600, ALICE)).ok
    assert raw.revoke([ALICE_ADDRESSES[1]]).ok  # a request naming only her address
    assert _naming(db, (ALICE,)), "the test must see the person's records before the erasure"

    erase = signed(agent_pb2.EraseRequest(header=raw.header(), subject=ALICE), raw.signer)
    erased = raw.send("Erase", erase)
    erased.applied()
    assert erased.result.erased_records > 0
    assert sorted(r.address for r in erased.result.results) == [
        ALICE_ADDRESSES[0],
        ALICE_ADDRESSES[2],
    ]
    # Replays of her requests answer without re-applying anything and without naming her.
    after_erase = rig.observe()
    for rpc, env in (("Allow", first), ("Erase", erase)):
        replay = raw.send(rpc, env)
        replay.applied()
        named = {r.address for r in replay.result.results} & set(ALICE_ADDRESSES)
        assert not named, f"the replayed {rpc} result still names {named}"
    replayed_erase = raw.send("Erase", erase).result
    assert replayed_erase is not None
    assert replayed_erase.state_version == erased.result.state_version
    assert replayed_erase.erased_records == erased.result.erased_records
    assert rig.observe() == after_erase

    leftovers = [
        (table, row)
        for table, row in _naming(db, (ALICE, *ALICE_ADDRESSES))
        if table not in MAY_NAME_ADDRESSES or any(ALICE in _text(v) for v in row)
    ]
    assert not leftovers
    for path in db.parent.glob("state.db*"):
        assert ALICE.encode() not in path.read_bytes(), f"{path.name} still holds the subject"
    # The journal is out of Erase's reach: nothing the agent logs names a person.
    log = rig.agent.log_path.read_text(errors="replace")
    assert "Allow " in log
    assert "Erase " in log  # the requests were logged, by request id
    named = [name for name in (ALICE, *ALICE_ADDRESSES, BOB, BOB_ADDRESS) if name in log]
    assert not named, f"the daemon's log names {named}"
    # The other person's records are untouched.
    assert _naming(db, (BOB,))
    assert [(e.address, e.subject) for e in raw.state().entries] == [(BOB_ADDRESS, BOB)]
    assert rig.observe().elements == {BOB_ADDRESS}


def test_watch_events_does_not_replay_an_erased_persons_history(rig: AgentRig) -> None:
    raw = rig.raw
    assert raw.allow(allow_entry(ALICE_ADDRESSES[0], 600, ALICE)).ok
    assert raw.allow(allow_entry(BOB_ADDRESS, 600, BOB)).ok
    assert raw.erase(ALICE).ok
    # A change after the erasure: the history's last event, where the stream can stop reading.
    last = raw.allow(allow_entry("198.18.16.10", 600, BOB)).result
    assert last is not None
    events = _watch(raw, last.state_version)
    assert events[-1].state_version == last.state_version
    named = [
        e
        for e in events
        if e.entry.subject == ALICE or e.entry.address in ALICE_ADDRESSES or ALICE in e.detail
    ]
    assert not named


def test_erase_survives_a_restart(rig: AgentRig) -> None:
    raw = rig.raw
    assert raw.allow(allow_entry(ALICE_ADDRESSES[0], 600, ALICE)).ok
    assert raw.erase(ALICE).ok
    assert raw.allow(allow_entry(BOB_ADDRESS, 600, BOB)).ok
    before = rig.observe()
    rig.restart()
    assert rig.observe() == before
    assert ALICE_ADDRESSES[0] not in before.elements
    events = _watch(rig.raw, before.state_version)
    assert events[-1].state_version == before.state_version
    assert not [e for e in events if e.entry.subject == ALICE]
