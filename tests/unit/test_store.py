"""agent.store against real SQLite files: round trips, atomic commits, durability after SIGKILL,
corruption and full disks, retention, erasure, the bounded event history and crash intents."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent import store as store_module
from agent import store_schema
from agent.errors import Unavailable
from agent.store import (
    AuditRecord,
    CommitBatch,
    Erasure,
    IntentChange,
    NewRequest,
    OrderingMark,
    PendingIntent,
    PurgeCounts,
    RecordError,
    RequestRecord,
    Store,
    StoreCorrupt,
    StoredEntry,
    StoredEvent,
    StoreError,
    store_error,
)

REPO = Path(__file__).resolve().parents[2]
DAY_MS = 86_400_000
T0 = 1_700_000_000_000


def entry(
    n: int,
    *,
    subject: str = "alice",
    profile: str = "agents",
    request_id: str = "req-00000001",
    local: bool = False,
    at: int = T0,
) -> StoredEntry:
    return StoredEntry(profile, f"198.51.100.{n}", subject, at, at + DAY_MS, request_id, local)


def request(
    request_id: str,
    *,
    keep_until_ms: int = T0 + 330_000,
    result: bytes | None = b"result",
    subjects: tuple[str, ...] = (),
    addresses: tuple[str, ...] = (),
) -> NewRequest:
    record = RequestRecord(request_id, "Allow", b"\x01" * 32, keep_until_ms, result)
    return NewRequest(record, subjects, addresses)


def audit(action: str, address: str, subject: str, *, at: int = T0, rid: str = "r") -> AuditRecord:
    return AuditRecord(at, action, "agents", address, subject, rid, "cp.example", "key-1", "")


def events(
    first: int, entries: tuple[StoredEntry | None, ...], at: int = T0
) -> tuple[StoredEvent, ...]:
    return tuple(
        StoredEvent(first + i, at, "added" if e else "reloaded", e) for i, e in enumerate(entries)
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def store(db: Path) -> Iterator[Store]:
    with Store.open(db) as s:
        yield s


# ----- opening ---------------------------------------------------------------------------------


def test_open_creates_a_private_wal_database_at_the_current_schema_version(db: Path) -> None:
    Store.open(db).close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    raw = sqlite3.connect(db)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == len(store_schema.MIGRATIONS)
    finally:
        raw.close()


def test_connections_are_durable_and_readers_cannot_write(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SIGKILL cannot show fsync (the page cache survives it), so the settings that make a
    # commit survive power loss are checked on the connections themselves.
    opened: list[sqlite3.Connection] = []
    real_connect = store_module._connect

    def spy(path: Path, timeout_s: float) -> sqlite3.Connection:
        opened.append(real_connect(path, timeout_s))
        return opened[-1]

    monkeypatch.setattr(store_module, "_connect", spy)
    with Store.open(db) as s:
        s.load_entries()
        writer, reader = opened

        def pragma(conn: sqlite3.Connection, name: str) -> object:
            return conn.execute(f"PRAGMA {name}").fetchone()[0]

        assert pragma(writer, "journal_mode") == "wal"
        assert pragma(writer, "synchronous") == 2  # FULL: the WAL is fsynced at every commit
        assert pragma(writer, "foreign_keys") == 1
        assert pragma(writer, "secure_delete") == 1
        assert pragma(writer, "busy_timeout") > 0
        assert pragma(reader, "query_only") == 1


def test_a_fresh_store_is_empty_at_version_zero(store: Store) -> None:
    assert store.load_entries() == []
    assert store.state_version() == 0
    assert store.last_sync_issued_at_ms() is None
    assert store.pending_intents() == ()
    assert store.oldest_retained_version() == 1
    assert store.events_since(0, 10).events == ()


def _garbage(db: Path) -> None:
    db.write_bytes(b"this is not an sqlite database, just some text " * 200)


def _populated(db: Path) -> None:
    with Store.open(db) as s:
        s.commit(
            CommitBatch(
                state_version=1,
                upserts=tuple(entry(n % 250, profile=f"p{n // 250}") for n in range(3000)),
                audit=tuple(audit("allow", f"198.51.100.{n % 250}", "alice") for n in range(3000)),
            )
        )


def _damage_pages(db: Path) -> None:
    _populated(db)
    with db.open("r+b") as f:
        f.seek(4096 * 2)
        f.write(b"\xa5" * 4096 * 6)


def _damage_header(db: Path) -> None:
    _populated(db)
    with db.open("r+b") as f:
        f.write(b"\x00" * 100)


def _truncate(db: Path) -> None:
    _populated(db)
    os.truncate(db, db.stat().st_size // 2)


@pytest.mark.parametrize(
    "damage",
    [_garbage, _damage_pages, _damage_header, _truncate],
    ids=["not_a_database", "damaged_pages", "damaged_header", "truncated"],
)
def test_a_damaged_database_is_store_corrupt_with_the_recovery_steps(
    db: Path, damage: Callable[[Path], None]
) -> None:
    damage(db)
    with pytest.raises(StoreCorrupt) as info:
        Store.open(db)
    err = info.value
    assert isinstance(err, Unavailable)
    assert err.reason == "store_corrupt"
    assert err.path == db
    # The operator reads this message: it must name the file and the way out.
    assert str(db) in err.detail
    assert "aside" in err.detail
    assert "Sync" in err.detail


def test_a_missing_state_directory_is_store_failed(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as info:
        Store.open(tmp_path / "missing" / "state.db")
    assert info.value.reason == "store_failed"


def test_a_database_from_a_newer_agent_is_refused(db: Path) -> None:
    Store.open(db).close()
    raw = sqlite3.connect(db)
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    with pytest.raises(StoreError) as info:
        Store.open(db)
    assert info.value.reason == "store_too_new"


def test_migrations_run_in_order_and_keep_the_data(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.open(db) as s:
        s.commit(CommitBatch(state_version=1, upserts=(entry(1),)))

    def add_notes(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE notes (text TEXT NOT NULL)")

    monkeypatch.setattr(store_schema, "MIGRATIONS", (*store_schema.MIGRATIONS, add_notes))
    with Store.open(db) as s:
        assert s.load_entries() == [entry(1)]
    raw = sqlite3.connect(db)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == len(store_schema.MIGRATIONS)
        assert raw.execute("SELECT count(*) FROM notes").fetchone()[0] == 0
    finally:
        raw.close()


@contextlib.contextmanager
def _written_at_version(
    db: Path, monkeypatch: pytest.MonkeyPatch, version: int
) -> Iterator[sqlite3.Connection]:
    """A store made by the first ``version`` migrations, written raw through the yielded
    connection in one transaction; the current migrations apply again afterwards."""
    monkeypatch.setattr(store_schema, "MIGRATIONS", store_schema.MIGRATIONS[:version])
    Store.open(db).close()
    raw = sqlite3.connect(db)
    try:
        with raw:
            yield raw
    finally:
        raw.close()
        monkeypatch.undo()


def test_a_v1_store_keeps_its_pending_intents_in_order_through_v2(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _written_at_version(db, monkeypatch, 1) as raw:
        raw.execute("INSERT INTO intents (intent_id, created_at_ms) VALUES ('i1', 5), ('i2', 6)")
        for seq, (op, n) in enumerate((("upsert", 2), ("remove", 1))):
            e = entry(n)
            raw.execute(
                "INSERT INTO intent_changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ("i1", seq, op, *dataclasses.astuple(e)[:-1], int(e.local)),
            )
    with Store.open(db) as s:
        assert s.pending_intents() == (
            PendingIntent(
                "i1", 5, (IntentChange("upsert", entry(2)), IntentChange("remove", entry(1)))
            ),
            PendingIntent("i2", 6, ()),
        )


def test_a_v2_store_keeps_what_its_requests_name_through_v3(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _written_at_version(db, monkeypatch, 2) as raw:
        for rid in ("req-alice000", "req-address0", "req-nobody00"):
            raw.execute(
                "INSERT INTO requests (request_id, rpc, payload_digest, keep_until_ms, result) "
                "VALUES (?, 'Allow', x'01', ?, x'02')",
                (rid, T0 + 60_000),
            )
        raw.executemany(
            "INSERT INTO request_names VALUES (?, ?, ?)",
            (
                ("req-alice000", "subject", "alice"),
                ("req-alice000", "address", ALICE_A),
                ("req-address0", "address", ALICE_B),
            ),
        )
    with Store.open(db) as s:
        assert s.count_subject_records("alice", [ALICE_B]) == 2
        assert s.count_subject_records("bob", [BOB]) == 0
        assert s.erase_subject("alice", [ALICE_B], T0) == 2
        assert s.lookup_request("req-nobody00") is not None
        assert s.lookup_request("req-nobody00").result == b"\x02"  # type: ignore[union-attr]
        assert s.lookup_request("req-alice000").result is None  # type: ignore[union-attr]
    raw = sqlite3.connect(db)
    try:
        tables = {name for (name,) in raw.execute("SELECT name FROM sqlite_schema")}
        assert "request_names" not in tables
        assert raw.execute("SELECT count(*) FROM requests WHERE names IS NOT NULL").fetchone() == (
            0,
        )
    finally:
        raw.close()


def test_a_failing_migration_changes_nothing(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Store.open(db).close()

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x)")
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    monkeypatch.setattr(store_schema, "MIGRATIONS", (*store_schema.MIGRATIONS, broken))
    with pytest.raises(StoreError) as info:
        Store.open(db)
    assert info.value.reason == "store_failed"
    raw = sqlite3.connect(db)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == len(store_schema.MIGRATIONS) - 1
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_schema")}
        assert "half_done" not in tables
    finally:
        raw.close()


# ----- round trips -----------------------------------------------------------------------------

ENTRIES = (
    entry(1),
    entry(2, subject="", profile="admin"),
    entry(3, subject='O\'Brien "x"; ☎', local=True, request_id="local-1a2b3c4d"),
    StoredEntry("agents", "2001:db8:1:2::/64", "bob", T0, T0 + 60_000, "req-00000002", False),
)


def test_entries_round_trip(store: Store) -> None:
    store.commit(CommitBatch(state_version=4, upserts=ENTRIES))
    assert sorted(store.load_entries(), key=lambda e: e.key) == sorted(ENTRIES, key=lambda e: e.key)
    assert store.state_version() == 4


def test_an_upsert_replaces_every_field_and_a_removal_deletes(store: Store) -> None:
    store.commit(CommitBatch(state_version=2, upserts=(entry(1), entry(2))))
    refreshed = entry(1, subject="carol", request_id="req-00000009", at=T0 + 5)
    store.commit(CommitBatch(state_version=4, upserts=(refreshed,), removals=(entry(2).key,)))
    assert store.load_entries() == [refreshed]


def test_request_records_round_trip(store: Store) -> None:
    with_result = request("req-aaaaaaaa", result=b"\x08\x01serialized")
    without = request("req-bbbbbbbb", result=None)
    store.commit(CommitBatch(state_version=0, requests=(with_result, without)))
    assert store.lookup_request("req-aaaaaaaa") == with_result.record
    assert store.lookup_request("req-bbbbbbbb") == without.record
    assert store.lookup_request("req-cccccccc") is None


def test_audit_records_round_trip_in_write_order(store: Store) -> None:
    rows = (audit("allow", "198.51.100.1", "alice", at=T0 + 2), audit("revoke", "", "", at=T0))
    store.commit(CommitBatch(state_version=0, audit=rows))
    assert store.audit_records() == list(rows)
    assert store.audit_records(since_ms=T0 + 1) == [rows[0]]
    assert store.audit_records(limit=1) == [rows[1]]  # the newest written


def test_audit_records_are_found_by_request_subject_and_address(store: Store) -> None:
    rows = (
        audit("allow", "198.51.100.1", "alice", rid="req-00000001"),
        audit("allow", "198.51.100.2", "bob", rid="req-00000001"),
        audit("revoke", "198.51.100.1", "alice", rid="req-00000002"),
        audit("allow", "198.51.100.3", "alice", rid="req-00000003"),
    )
    store.commit(CommitBatch(state_version=0, audit=rows))
    assert store.audit_records(request_id="req-00000001") == list(rows[:2])
    assert store.audit_records(subject="alice") == [rows[0], rows[2], rows[3]]
    assert store.audit_records(address="198.51.100.1") == [rows[0], rows[2]]
    assert store.audit_records(subject="alice", address="198.51.100.1", limit=1) == [rows[2]]
    assert store.audit_records(request_id="req-00000009") == []
    # Filters are values, never SQL.
    assert store.audit_records(subject="' OR 1=1 --") == []
    with pytest.raises(RecordError):
        store.audit_records(limit=0)


def test_events_round_trip_with_and_without_an_entry(store: Store) -> None:
    evs = (
        StoredEvent(1, T0, "added", entry(1), "allow"),
        StoredEvent(2, T0 + 1, "reloaded", None, "config reloaded"),
        StoredEvent(3, T0 + 2, "removed", entry(3, local=True, subject="")),
    )
    store.commit(CommitBatch(state_version=3, events=evs))
    page = store.events_since(0, 100)
    assert page.events == evs
    assert page.oldest_retained_version == 1
    assert store.events_since(1, 1).events == evs[1:2]


def test_a_batch_waits_for_ready_and_a_refusal_there_writes_nothing(store: Store) -> None:
    store.commit(CommitBatch(state_version=1, upserts=(entry(1),)))
    calls: list[int] = []

    def kernel_refused() -> None:
        calls.append(store.state_version())  # rows written, not yet committed: not visible
        raise Unavailable("kernel_refused", "the kernel said no")

    batch = CommitBatch(
        state_version=2,
        upserts=(entry(2),),
        requests=(request("r-2"),),
        audit=(audit("added", "a", "s"),),
    )
    with pytest.raises(Unavailable):
        store.commit(batch, ready=kernel_refused)
    assert calls == [1]
    assert store.load_entries() == [entry(1)]
    assert store.state_version() == 1
    assert store.lookup_request("r-2") is None
    assert store.audit_records() == []
    assert store.commit(batch, ready=lambda: None) == 0  # the same batch, once the kernel agreed
    assert store.load_entries() == [entry(1), entry(2)]


def test_releasing_memory_keeps_the_store_working(store: Store) -> None:
    store.commit(CommitBatch(state_version=1, upserts=(entry(1),)))
    assert store.lookup_request("none") is None  # a reader connection is pooled
    writer = store._writer
    store.release_memory()
    # A fresh writer (statements that held a large batch's values are gone), set up as the
    # first one was: durable, zeroing deleted rows, checking references.
    assert store._writer is not writer
    assert store._writer is not None
    for pragma, value in (("synchronous", 2), ("secure_delete", 1), ("foreign_keys", 1)):
        assert store._writer.execute(f"PRAGMA {pragma}").fetchone() == (value,)
    store.commit(CommitBatch(state_version=2, upserts=(entry(2),)))
    assert store.load_entries() == [entry(1), entry(2)]


def test_the_stop_generation_is_taken_once(store: Store) -> None:
    assert store.take_stop_generation() is None
    store.record_stop_generation(41)
    store.record_stop_generation(42)  # the newest stop counts
    assert store.take_stop_generation() == 42
    assert store.take_stop_generation() is None  # a crash after this start finds nothing


def test_last_sync_is_kept_and_never_moves_backwards(store: Store) -> None:
    store.commit(CommitBatch(state_version=0, last_sync_issued_at_ms=T0 + 10))
    store.commit(CommitBatch(state_version=0, last_sync_issued_at_ms=T0))
    store.commit(CommitBatch(state_version=0))
    assert store.last_sync_issued_at_ms() == T0 + 10


def test_ordering_memory_is_per_profile_and_address_and_never_moves_backwards(
    store: Store,
) -> None:
    a, b = "198.51.100.1", "198.51.100.2"
    store.commit(
        CommitBatch(
            state_version=0,
            ordering=(
                OrderingMark("agents", a, T0 + 5, T0 + 1000),
                OrderingMark("admin", a, T0 + 7, T0 + 1000),
                OrderingMark("agents", b, T0 + 9, T0 + 1000),
            ),
        )
    )
    store.commit(
        CommitBatch(state_version=0, ordering=(OrderingMark("agents", a, T0 + 1, T0 + 10),))
    )
    assert store.last_issued_at([("agents", a), ("agents", "198.51.100.99")]) == {
        ("agents", a): T0 + 5
    }
    # What can make a Sync of T0 + 5 STALE: the marks newer than it.
    assert store.ordering_after(T0 + 5) == {("admin", a): T0 + 7, ("agents", b): T0 + 9}
    assert store.last_issued_at([]) == {}


def test_intents_round_trip_in_write_order_and_are_cleared_by_commit_or_discard(
    store: Store,
) -> None:
    first = PendingIntent(
        "intent-1", T0, (IntentChange("upsert", entry(1)), IntentChange("remove", entry(2)))
    )
    second = PendingIntent("intent-2", T0 + 1, (IntentChange("upsert", entry(3, local=True)),))
    empty = PendingIntent("intent-3", T0 + 2, ())
    for intent in (first, second, empty):
        store.write_intent(intent)
    assert store.pending_intents() == (first, second, empty)

    store.commit(CommitBatch(state_version=1, upserts=(entry(1),), intent_id="intent-1"))
    store.discard_intent("intent-3")
    assert store.pending_intents() == (second,)


def test_reopening_keeps_everything(db: Path) -> None:
    intent = PendingIntent("intent-9", T0, (IntentChange("upsert", entry(5)),))
    batch = CommitBatch(
        state_version=2,
        upserts=ENTRIES[:2],
        requests=(request("req-aaaaaaaa"),),
        audit=(audit("allow", "198.51.100.1", "alice"),),
        ordering=(OrderingMark("agents", "198.51.100.1", T0, T0 + 9),),
        events=events(1, ENTRIES[:2]),
        last_sync_issued_at_ms=T0,
    )
    with Store.open(db) as s:
        s.commit(batch)
        s.write_intent(intent)
    with Store.open(db) as s:
        assert sorted(s.load_entries(), key=lambda e: e.key) == sorted(
            ENTRIES[:2], key=lambda e: e.key
        )
        assert s.state_version() == 2
        assert s.lookup_request("req-aaaaaaaa") == batch.requests[0].record
        assert s.audit_records() == list(batch.audit)
        assert s.last_issued_at([("agents", "198.51.100.1")]) == {("agents", "198.51.100.1"): T0}
        assert s.events_since(0, 10).events == batch.events
        assert s.last_sync_issued_at_ms() == T0
        assert s.pending_intents() == (intent,)


# ----- atomicity and durability ---------------------------------------------------------------


def _snapshot(s: Store) -> tuple[object, ...]:
    return (
        sorted(s.load_entries(), key=lambda e: e.key),
        s.state_version(),
        s.audit_records(),
        s.events_since(0, 1000),
        s.ordering_after(0),
        s.last_sync_issued_at_ms(),
        s.pending_intents(),
        s.lookup_request("req-fresh000"),
    )


def _bad_batch(requests: tuple[NewRequest, ...]) -> CommitBatch:
    """A batch whose failure comes after every other kind of write has been executed."""
    return CommitBatch(
        state_version=9,
        upserts=(entry(7), entry(1, subject="mallory")),
        removals=(entry(2).key,),
        requests=requests,
        audit=(audit("allow", "198.51.100.7", "alice"),),
        ordering=(OrderingMark("agents", "198.51.100.7", T0 + 50, T0 + 99),),
        events=events(4, (entry(7),)),
        last_sync_issued_at_ms=T0 + 50,
        intent_id="intent-1",
    )


@pytest.mark.parametrize(
    ("batch", "error", "reason"),
    [
        (
            _bad_batch((request("req-fresh000"), request("req-existing"))),
            StoreError,
            "store_failed",
        ),
        (
            _bad_batch((request("req-fresh000"), request("req-fresh000"))),
            StoreError,
            "store_failed",
        ),
        (CommitBatch(state_version=2, upserts=(entry(7),)), RecordError, None),
    ],
    ids=["request_id_already_stored", "request_id_twice_in_batch", "state_version_backwards"],
)
def test_a_failing_commit_leaves_nothing_of_itself(
    store: Store, batch: CommitBatch, error: type[Exception], reason: str | None
) -> None:
    store.commit(
        CommitBatch(
            state_version=3,
            upserts=(entry(1), entry(2)),
            requests=(request("req-existing"),),
            events=events(1, (entry(1), entry(2), None)),
        )
    )
    store.write_intent(PendingIntent("intent-1", T0, (IntentChange("upsert", entry(7)),)))
    before = _snapshot(store)
    with pytest.raises(error) as info:
        store.commit(batch)
    if reason is not None:
        assert isinstance(info.value, StoreError)
        assert info.value.reason == reason
        assert info.value.sqlite_errorname.startswith("SQLITE_CONSTRAINT")
    assert _snapshot(store) == before
    # The store is still usable after the failure.
    store.commit(CommitBatch(state_version=4, upserts=(entry(9),)))
    assert store.state_version() == 4


def test_a_full_disk_is_store_full_and_writes_nothing(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.open(db) as s:
        s.commit(CommitBatch(state_version=1, upserts=(entry(1),)))
    real_connect = store_module._connect

    def capped(path: Path, timeout_s: float) -> sqlite3.Connection:
        # SQLite answers SQLITE_FULL, as on a full disk, once the file would outgrow this.
        conn = real_connect(path, timeout_s)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        return conn

    monkeypatch.setattr(store_module, "_connect", capped)
    with Store.open(db) as s:
        big = tuple(entry(n % 250, profile=f"p{n // 250}") for n in range(5000))
        with pytest.raises(StoreError) as info:
            s.commit(CommitBatch(state_version=2, upserts=big, events=events(2, big[:1])))
        assert info.value.reason == "store_full"
        assert s.load_entries() == [entry(1)]
        assert s.state_version() == 1
        assert s.events_since(0, 10).events == ()


CHILD = """
import sys
from pathlib import Path
from agent.store import CommitBatch, Store, StoredEntry, StoredEvent
store = Store.open(Path(sys.argv[1]))
for k in range(1, 4):
    e = StoredEntry("agents", f"198.51.100.{k}", "alice", 1000, 2000, f"req-{k:08d}")
    event = StoredEvent(k, 1, "added", e)
    store.commit(CommitBatch(state_version=k, upserts=(e,), events=(event,)))
    print(f"ack {k}", flush=True)
sys.stdin.read()  # hold the store open (nothing checkpointed) until killed
"""


def test_acknowledged_commits_survive_sigkill(db: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
        env=env,
        text=True,
    )
    try:
        assert child.stdout is not None
        acks = [child.stdout.readline().strip() for _ in range(3)]
        assert acks == ["ack 1", "ack 2", "ack 3"]
        # The commits live only in the write-ahead log: reopening must recover them from it.
        assert Path(f"{db}-wal").stat().st_size > 0
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        if child.stdin is not None:
            child.stdin.close()
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    with Store.open(db) as s:
        assert s.state_version() == 3
        assert sorted(e.address for e in s.load_entries()) == [
            "198.51.100.1",
            "198.51.100.2",
            "198.51.100.3",
        ]
        assert [ev.state_version for ev in s.events_since(0, 10).events] == [1, 2, 3]


# ----- threads --------------------------------------------------------------------------------


def test_reads_are_not_blocked_by_a_writer_and_see_only_committed_state(db: Path) -> None:
    with Store.open(db, busy_timeout_s=0.05) as s:
        s.commit(CommitBatch(state_version=1, upserts=(entry(1),)))
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("DELETE FROM entries")
            assert s.load_entries() == [entry(1)]
            with pytest.raises(StoreError) as info:
                s.commit(CommitBatch(state_version=2, upserts=(entry(2),)))
            assert info.value.reason == "store_failed"
            assert info.value.sqlite_errorname == "SQLITE_BUSY"
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert s.load_entries() == [entry(1)]


def test_reads_from_many_threads_run_while_the_writer_commits(store: Store) -> None:
    done = threading.Event()
    failures: list[BaseException] = []
    seen: list[list[int]] = [[] for _ in range(4)]

    def reader(mine: list[int]) -> None:
        try:
            while not done.is_set():
                page = store.events_since(0, 10_000)
                # One snapshot: the events are gap-free and as many as the versions committed.
                versions = [ev.state_version for ev in page.events]
                assert versions == list(range(1, len(versions) + 1))
                mine.append(len(versions))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            failures.append(exc)

    threads = [threading.Thread(target=reader, args=(seen[i],)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for k in range(1, 101):
            store.commit(CommitBatch(state_version=k, events=events(k, (entry(k % 250),))))
    finally:
        done.set()
        for t in threads:
            t.join(timeout=30)
    assert failures == []
    for mine in seen:
        assert mine == sorted(mine)
    assert store.events_since(0, 1000).events[-1].state_version == 100


def test_a_closed_store_refuses_reads_and_writes(db: Path) -> None:
    s = Store.open(db)
    s.close()
    with pytest.raises(StoreError) as read:
        s.load_entries()
    with pytest.raises(StoreError) as write:
        s.commit(CommitBatch(state_version=1))
    assert read.value.reason == write.value.reason == "store_failed"


# ----- retention ------------------------------------------------------------------------------


def test_purge_deletes_what_retention_and_replay_no_longer_need(store: Store) -> None:
    now = T0 + 10 * DAY_MS
    week = 7 * DAY_MS
    store.commit(
        CommitBatch(
            state_version=6,
            audit=(
                audit("allow", "198.51.100.1", "alice", at=now - week - 1),
                audit("allow", "198.51.100.2", "bob", at=now - week),
                audit("allow", "198.51.100.3", "carol", at=now),
            ),
            requests=(
                request("req-passed00", keep_until_ms=now - 1, subjects=("alice",)),
                request("req-boundary", keep_until_ms=now),
                request("req-stillval", keep_until_ms=now + 1),
            ),
            ordering=(
                OrderingMark("agents", "198.51.100.1", T0, now),
                OrderingMark("agents", "198.51.100.2", T0, now + 1),
            ),
            events=(
                *events(1, (entry(1), entry(2)), at=now - week - 1),
                *events(3, (entry(3), entry(4), entry(5), entry(6)), at=now - 1),
            ),
        )
    )
    counts = store.purge(now, audit_retention_ms=week, max_events=3)
    assert counts == PurgeCounts(audit=1, requests=2, ordering=1, events=3)
    assert [a.subject for a in store.audit_records()] == ["bob", "carol"]
    assert store.lookup_request("req-passed00") is None
    assert store.lookup_request("req-boundary") is None
    assert store.lookup_request("req-stillval") is not None
    assert store.ordering_after(0) == {("agents", "198.51.100.2"): T0}
    page = store.events_since(0, 100)
    assert [ev.state_version for ev in page.events] == [4, 5, 6]
    assert page.oldest_retained_version == 4
    assert store.purge(now, audit_retention_ms=week, max_events=3) == PurgeCounts(0, 0, 0, 0)


def test_purge_cuts_old_events_by_age_even_under_the_count_bound(store: Store) -> None:
    now = T0 + DAY_MS
    store.commit(
        CommitBatch(
            state_version=3,
            events=(*events(1, (entry(1), entry(2)), at=T0), *events(3, (entry(3),), at=now)),
        )
    )
    assert store.purge(now, audit_retention_ms=DAY_MS - 1, max_events=100).events == 2
    assert store.oldest_retained_version() == 3


def test_the_event_history_floor_tells_a_watcher_it_missed_history(store: Store) -> None:
    store.commit(
        CommitBatch(state_version=50, events=events(1, tuple(entry(n) for n in range(1, 51))))
    )
    store.purge(T0, audit_retention_ms=DAY_MS, max_events=20)
    page = store.events_since(10, 5)
    assert page.oldest_retained_version == 31
    assert page.oldest_retained_version > 10 + 1  # -> RESYNC_REQUIRED, then what is retained
    assert [ev.state_version for ev in page.events] == [31, 32, 33, 34, 35]
    assert store.events_since(30, 5).events[0].state_version == 31
    # Committing more keeps the floor; versions continue after the retained ones.
    store.commit(CommitBatch(state_version=51, events=events(51, (None,))))
    assert store.oldest_retained_version() == 31


def test_a_batch_with_more_events_than_the_history_keeps_cuts_the_history(store: Store) -> None:
    store.commit(CommitBatch(state_version=5, events=events(1, tuple(entry(n) for n in range(5)))))
    # Versions 6..105 changed; only the newest 10 events travel, the rest are cut.
    store.commit(CommitBatch(state_version=105, events=events(96, (None,) * 10), history_floor=95))
    page = store.events_since(3, 100)
    assert page.oldest_retained_version == 96  # > 3 + 1: the watcher is told to resync
    assert [ev.state_version for ev in page.events] == list(range(96, 106))
    with pytest.raises(RecordError):  # an event inside the cut part cannot travel with it
        CommitBatch(state_version=120, events=events(110, (None,)), history_floor=110)


def test_an_event_not_newer_than_the_stored_version_is_refused(store: Store) -> None:
    store.commit(CommitBatch(state_version=5, events=events(1, (entry(1),))))
    with pytest.raises(RecordError):
        store.commit(CommitBatch(state_version=6, events=events(5, (entry(2),))))


# ----- erasure --------------------------------------------------------------------------------

ALICE_A, ALICE_B, BOB = "198.51.100.1", "198.51.100.2", "198.51.100.9"


def _erasure_fixture(store: Store, now: int) -> None:
    store.commit(
        CommitBatch(
            state_version=4,
            audit=(
                audit("allow", ALICE_A, "alice"),
                audit("allow", ALICE_B, "alice"),
                audit("revoke", ALICE_B, ""),  # names her address, not her
                audit("allow", BOB, "bob"),
                audit("sync", "", "", rid="req-sync0000"),
            ),
            requests=(
                request("req-alicepast", keep_until_ms=now - 1, subjects=("alice",)),
                request(
                    "req-alicelive",
                    keep_until_ms=now + 60_000,
                    result=b"names alice",
                    subjects=("alice",),
                    addresses=(ALICE_A,),
                ),
                request("req-addrlive0", keep_until_ms=now + 1, addresses=(ALICE_B,)),
                request(
                    "req-boblive00", keep_until_ms=now + 1, subjects=("bob",), addresses=(BOB,)
                ),
            ),
            events=(
                StoredEvent(1, T0, "added", entry(1)),
                StoredEvent(2, T0, "added", entry(9, subject="bob")),
                StoredEvent(3, T0, "added", entry(2)),
                StoredEvent(4, T0, "added", entry(9, subject="bob")),
            ),
        )
    )


def test_erase_deletes_what_names_the_person_and_keeps_replay_digests(store: Store) -> None:
    now = T0 + 1000
    _erasure_fixture(store, now)
    assert store.addresses_of_subject("alice") == {ALICE_A, ALICE_B}
    assert store.count_subject_records("alice", [ALICE_A, ALICE_B]) == 6

    assert store.erase_subject("alice", [ALICE_A, ALICE_B], now) == 6

    assert [(a.action, a.subject) for a in store.audit_records()] == [
        ("allow", "bob"),
        ("sync", ""),
    ]
    assert store.lookup_request("req-alicepast") is None
    for rid in ("req-alicelive", "req-addrlive0"):
        kept = store.lookup_request(rid)
        assert kept is not None
        assert kept.result is None
        assert kept.payload_digest == b"\x01" * 32
        assert kept.keep_until_ms > now
    assert (
        store.lookup_request("req-boblive00")
        == request("req-boblive00", keep_until_ms=now + 1).record
    )
    # History is cut through her newest event; what follows is retained.
    page = store.events_since(0, 10)
    assert page.oldest_retained_version == 4
    assert [ev.state_version for ev in page.events] == [4]
    # Nothing left to erase: a second erasure finds nothing, and her records do not come back.
    assert store.erase_subject("alice", [ALICE_A, ALICE_B], now) == 0
    assert store.count_subject_records("alice", [ALICE_A, ALICE_B]) == 0


def test_erased_text_is_gone_from_the_files(db: Path) -> None:
    now = T0 + 1000
    hidden = "zebulon.quartermaine"
    with Store.open(db) as s:
        s.commit(
            CommitBatch(
                state_version=1,
                upserts=(entry(1, subject=hidden),),
                audit=tuple(audit("allow", ALICE_A, hidden) for _ in range(50)),
                requests=(request("req-hidden00", subjects=(hidden,), result=hidden.encode()),),
                events=events(1, (entry(1, subject=hidden),)),
            )
        )
        s.commit(CommitBatch(state_version=2, removals=(entry(1).key,)))
        assert s.erase_subject(hidden, [ALICE_A], now) == 51
        files = [p for p in db.parent.iterdir() if p.name.startswith(db.name)]
        assert all(hidden.encode() not in p.read_bytes() for p in files)


def test_erase_in_a_commit_runs_after_the_batch_and_spares_an_unnamed_request(
    store: Store,
) -> None:
    now = T0 + 1000
    _erasure_fixture(store, now)
    precount = store.count_subject_records("alice", [ALICE_A, ALICE_B])
    batch = CommitBatch(
        state_version=5,
        audit=(audit("revoke", ALICE_A, "alice", rid="req-erase000"),),
        requests=(request("req-erase000", result=b"erased 7"),),  # names nobody
        events=(StoredEvent(5, now, "removed", entry(1)),),
        erase=Erasure("alice", (ALICE_A, ALICE_B), now),
    )
    assert store.commit(batch) == precount + 1
    assert store.lookup_request("req-erase000") == batch.requests[0].record
    assert all(a.subject != "alice" for a in store.audit_records())
    page = store.events_since(0, 10)
    assert page.oldest_retained_version == 6
    assert page.events == ()
    assert store.state_version() == 5


# ----- errors and validation ------------------------------------------------------------------


def _full_error(tmp_path: Path) -> sqlite3.Error:
    conn = sqlite3.connect(tmp_path / "full.db")
    conn.execute("CREATE TABLE t (x)")
    conn.execute("PRAGMA max_page_count = 2")
    try:
        conn.execute("INSERT INTO t VALUES (zeroblob(100000))")
    except sqlite3.Error as exc:
        return exc
    finally:
        conn.close()
    raise AssertionError("expected SQLITE_FULL")


def _not_a_database_error(tmp_path: Path) -> sqlite3.Error:
    path = tmp_path / "junk.db"
    path.write_bytes(b"junk" * 1000)
    conn = sqlite3.connect(path)
    try:
        conn.execute("SELECT * FROM sqlite_schema")
    except sqlite3.Error as exc:
        return exc
    finally:
        conn.close()
    raise AssertionError("expected SQLITE_NOTADB")


def _constraint_error(tmp_path: Path) -> sqlite3.Error:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (x PRIMARY KEY)")
    try:
        conn.executemany("INSERT INTO t VALUES (?)", [(1,), (1,)])
    except sqlite3.Error as exc:
        return exc
    finally:
        conn.close()
    raise AssertionError("expected SQLITE_CONSTRAINT")


def _closed_error(tmp_path: Path) -> sqlite3.Error:
    conn = sqlite3.connect(":memory:")
    conn.close()
    try:
        conn.execute("SELECT 1")
    except sqlite3.Error as exc:
        return exc
    raise AssertionError("expected ProgrammingError")


@pytest.mark.parametrize(
    ("make", "reason", "kind"),
    [
        (_full_error, "store_full", StoreError),
        (_not_a_database_error, "store_corrupt", StoreCorrupt),
        (_constraint_error, "store_failed", StoreError),
        (_closed_error, "store_failed", StoreError),
    ],
    ids=["full", "not_a_database", "constraint", "closed_connection"],
)
def test_sqlite_errors_are_classified_by_code(
    tmp_path: Path,
    make: Callable[[Path], sqlite3.Error],
    reason: str,
    kind: type[StoreError],
) -> None:
    err = store_error(make(tmp_path), tmp_path / "state.db")
    assert type(err) is kind
    assert err.reason == reason
    assert isinstance(err, Unavailable)


@pytest.mark.parametrize(
    "build",
    [
        lambda: StoredEntry("", "198.51.100.1", "", 0, 0, "r"),
        lambda: StoredEntry("agents", "", "", 0, 0, "r"),
        lambda: StoredEntry("agents", "198.51.100.1", "", -1, 0, "r"),
        lambda: RequestRecord("", "Allow", b"d", 0, None),
        lambda: RequestRecord("req-aaaaaaaa", "Allow", b"", 0, None),
        lambda: AuditRecord(0, "", "", "", "", "", "", ""),
        lambda: StoredEvent(0, 0, "added", None),
        lambda: StoredEvent(1, 0, "", None),
        lambda: IntentChange("replace", entry(1)),  # type: ignore[arg-type]
        lambda: PendingIntent("", 0, ()),
        lambda: Erasure("", (), 0),
        lambda: OrderingMark("agents", "198.51.100.1", -1, 0),
        lambda: CommitBatch(state_version=-1),
        lambda: CommitBatch(state_version=1, events=events(2, (None,))),
        lambda: CommitBatch(state_version=5, events=(*events(3, (None,)), *events(2, (None,)))),
        lambda: CommitBatch(state_version=1, upserts=(entry(1),), removals=(entry(1).key,)),
    ],
    ids=[
        "entry_without_profile",
        "entry_without_address",
        "entry_negative_time",
        "request_without_id",
        "request_without_digest",
        "audit_without_action",
        "event_version_zero",
        "event_without_kind",
        "intent_unknown_op",
        "intent_without_id",
        "erasure_of_empty_subject",
        "ordering_negative_time",
        "batch_negative_version",
        "batch_event_above_version",
        "batch_events_out_of_order",
        "batch_upserts_and_removes_one_key",
    ],
)
def test_invalid_records_cannot_be_made(build: Callable[[], object]) -> None:
    with pytest.raises(RecordError):
        build()
