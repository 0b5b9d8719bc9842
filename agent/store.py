"""The agent's durable state on SQLite: entries, replay records, ordering memory, the audit log,
the recent event history and crash intents.

Owns the database file; it records what the engine decided and decides nothing itself (no
clock: every time is passed in; no kernel; no protocol rules). Privacy: it stores addresses,
subjects, profiles, times, request ids, caller identities, key ids, digests and the opaque
serialized results of requests; never a request's payload.

Durability: write-ahead log with ``synchronous=FULL``, so a write method that returned has been
fsynced and survives ``kill -9`` and power loss. Every write method is one SQLite transaction:
it lands whole or not at all.

Threading: one write connection, guarded by a lock, serves the write methods (the engine is the
single writer; the lock only makes a second writer wait, not wrong). Read methods borrow a
connection from a small pool of read-only connections, so a read from any thread runs
concurrently with the writer and sees the last committed state (WAL snapshot isolation); a read
that needs several statements runs them in one read transaction. ``close()`` must not race reads.

Failures are ``StoreError`` (an ``Unavailable``) classified by SQLite's error code, never by
message text: ``store_corrupt`` (``StoreCorrupt``; the message gives the recovery),
``store_full`` (the disk is full), ``store_too_new`` (written by a newer agent) and
``store_failed`` (anything else, e.g. an I/O error or a closed store). After a failed write
nothing of it is stored (the engine should then fail loudly and restart, converging from the
pending intent it wrote before touching the kernel).

Erasure policy (PROTOCOL.md Erase): audit rows naming the subject or one of the addresses are
deleted; request records naming them are deleted, or, while replay protection still needs them,
reduced to request id, rpc, payload digest and ``keep_until_ms``. Retained events naming them
are not redacted but cut: the history is truncated up to the newest such event, so a watcher
that had not yet seen them is told to resync instead of being shown invented or blanked events.
Ordering memory is kept (it names an address and times, no person, and is needed so a delayed
older request cannot resurrect a revoked entry; it is forgotten within minutes of the entry).
Entries are removed by the engine through a normal commit. Pending intents are left alone (the
engine clears them on its next commit or at start). Deleted rows are overwritten with zeros
(``secure_delete``) and the WAL is checkpointed and truncated after an erasure, so the erased
text does not linger in free pages or old log frames of the files.

A lost database must not take what replay protection and watchers rely on with it: every
committed ``state_version`` stays below a ceiling kept in a file beside it
(``agent.store_ceiling``), from which a fresh store resumes after a recovery
(``resume_after_loss``), refusing requests issued before it (``replay_floor_ms``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from agent import store_schema
from agent.errors import Unavailable
from agent.store_ceiling import VersionCeiling
from agent.store_records import (
    INTENT_OPS,
    AuditRecord,
    CommitBatch,
    EntryKeyText,
    Erasure,
    EventPage,
    IntentChange,
    IntentOp,
    NewRequest,
    OrderingMark,
    PendingIntent,
    PurgeCounts,
    RecordError,
    RequestRecord,
    StoredEntry,
    StoredEvent,
)
from agent.store_schema import (
    META_EVENTS_FLOOR,
    META_LAST_SYNC,
    META_REPLAY_FLOOR,
    META_STATE_VERSION,
    META_STOP_GENERATION,
)

__all__ = [
    "AuditRecord",
    "CommitBatch",
    "EntryKeyText",
    "Erasure",
    "EventPage",
    "IntentChange",
    "IntentOp",
    "NewRequest",
    "OrderingMark",
    "PendingIntent",
    "PurgeCounts",
    "RecordError",
    "RequestRecord",
    "Store",
    "StoreCorrupt",
    "StoreError",
    "StoredEntry",
    "StoredEvent",
    "store_error",
]

DEFAULT_BUSY_TIMEOUT_S = 5.0
_MAX_IDLE_READERS = 8
# After a checkpoint the WAL is truncated to this size: a 100k-entry Sync grows it to tens of MB.
_JOURNAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
# Page cache of the write connection, in KiB: most of the entries table and its index of a
# 100k-entry store, so a Sync's upserts seldom re-read pages. It is filled during a Sync, on
# top of libnftables' own peak: 32 MB cost 24 MB more of that peak and no measurable time,
# 4-8 MB about 7 % more of the writer's time.
_WRITER_CACHE_KIB = 16 * 1024
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


class StoreError(Unavailable):
    """The state database cannot be used; ``reason`` says why, ``path`` which file."""

    def __init__(self, reason: str, path: Path, detail: str, sqlite_errorname: str = "") -> None:
        self.path = path
        self.sqlite_errorname = sqlite_errorname
        super().__init__(reason, detail)


class StoreCorrupt(StoreError):
    """The database file is damaged or is not a database; the message says how to recover."""

    def __init__(self, path: Path, finding: str, sqlite_errorname: str = "") -> None:
        super().__init__(
            "store_corrupt",
            path,
            f"the state database {path} is damaged ({finding}). To recover: stop the agent, "
            f"move {path} (and {path}-wal, {path}-shm if present) aside and start the agent; "
            "it rebuilds its entries from the kernel's table and asks the control plane for a "
            "Sync.",
            sqlite_errorname,
        )


def store_error(exc: sqlite3.Error, path: Path) -> StoreError:
    """Classify a sqlite3 exception by its (primary) result code."""
    code = getattr(exc, "sqlite_errorcode", None)
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    primary = code & 0xFF if isinstance(code, int) else None
    if primary in _CORRUPT_CODES:
        return StoreCorrupt(path, f"{name}: {exc}", name)
    if primary == sqlite3.SQLITE_FULL:
        return StoreError(
            "store_full", path, f"{path}: {name}: the file system is full; free space on it", name
        )
    return StoreError("store_failed", path, f"{path}: {name}: {exc}", name)


def _connect(path: Path, timeout_s: float) -> sqlite3.Connection:
    """Open one connection; every transaction is begun and ended explicitly by this module."""
    # check_same_thread=False: pooled read connections move between threads (one at a time),
    # and the write connection is used by whichever thread holds the write lock.
    return sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite rolls some failed transactions back by itself (SQLITE_FULL, I/O errors).
    if conn.in_transaction:
        # Suppressed: the error that made us roll back is the one worth raising.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _create_private(path: Path) -> None:
    """Create an empty database file readable by its owner only; SQLite gives the -wal and
    -shm files the same mode."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise StoreError("store_failed", path, f"cannot create {path}: {exc.strerror}") from exc
    os.close(fd)


def _configure_writer(conn: sqlite3.Connection, path: Path) -> None:
    # The first statement that reads the file: a non-database fails here with SQLITE_NOTADB.
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise StoreError("store_failed", path, f"{path}: cannot use WAL (journal_mode={mode})")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    # Deleted rows are overwritten with zeros, so an erased or purged person does not live on
    # in free pages of the file.
    conn.execute("PRAGMA secure_delete = ON")
    conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT_BYTES:d}")
    conn.execute(f"PRAGMA cache_size = -{_WRITER_CACHE_KIB:d}")


def _check_integrity(conn: sqlite3.Connection, path: Path) -> None:
    # One line per finding: SQLite's own findings may span several lines.
    findings = [" ".join(str(row[0]).split()) for row in conn.execute("PRAGMA quick_check(5)")]
    if findings != ["ok"]:
        raise StoreCorrupt(path, "quick_check: " + "; ".join(findings))


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    migrations = store_schema.MIGRATIONS
    current = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if current > len(migrations):
        raise StoreError(
            "store_too_new",
            path,
            f"{path} has schema version {current}, this agent knows up to {len(migrations)}: "
            "run the newer agent again, or move the file aside to start from the kernel's state",
        )
    for version in range(current, len(migrations)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            migrations[version](conn)
            conn.execute(f"PRAGMA user_version = {version + 1:d}")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise


class _ReaderPool:
    """Read-only connections, each lent to one thread at a time; idle ones are reused."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        self._path = path
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        self._closed = False

    def acquire(self) -> sqlite3.Connection:
        with self._lock:
            if self._closed:
                raise StoreError("store_failed", self._path, "the store is closed")
            if self._idle:
                return self._idle.pop()
        conn = _connect(self._path, self._timeout_s)
        try:
            conn.execute("PRAGMA query_only = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def shrink(self) -> None:
        with self._lock:
            for conn in self._idle:
                conn.execute("PRAGMA shrink_memory")

    def release(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < _MAX_IDLE_READERS:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


# Every statement is literal text: values are always bound, lists travel as one JSON array
# parameter read with json_each, so no SQL is ever assembled from data.
_SELECT_ENTRIES = (
    "SELECT profile, address, subject, created_at_ms, expires_at_ms, request_id, local FROM entries"
)
_UPSERT_ENTRY = (
    "INSERT INTO entries "
    "(profile, address, subject, created_at_ms, expires_at_ms, request_id, local) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (profile, address) DO UPDATE SET subject = excluded.subject, "
    "created_at_ms = excluded.created_at_ms, expires_at_ms = excluded.expires_at_ms, "
    "request_id = excluded.request_id, local = excluded.local"
)
_DELETE_ENTRY = "DELETE FROM entries WHERE profile = ? AND address = ?"
_INSERT_REQUEST = (
    "INSERT INTO requests (request_id, rpc, payload_digest, keep_until_ms, result, names) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_SELECT_REQUESTS = (
    "SELECT request_id, rpc, payload_digest, keep_until_ms, result FROM requests "
    "WHERE request_id IN (SELECT value FROM json_each(?))"
)
_INSERT_AUDIT = (
    "INSERT INTO audit "
    "(at_ms, action, profile, address, subject, request_id, caller, keyid, detail) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The newest ``limit`` (?5; -1: all) rows from ``at_ms`` ?1 on, each filter (?2 request id,
# ?3 subject, ?4 address) applied unless empty; returned in the order they were written.
_SELECT_AUDIT = (
    "SELECT at_ms, action, profile, address, subject, request_id, caller, keyid, detail "
    "FROM (SELECT * FROM audit WHERE at_ms >= ?1 AND (?2 = '' OR request_id = ?2) "
    "AND (?3 = '' OR subject = ?3) AND (?4 = '' OR address = ?4) ORDER BY id DESC LIMIT ?5) "
    "ORDER BY id"
)
_MARK_ORDERING = (
    "INSERT INTO ordering (profile, address, issued_at_ms, forget_after_ms) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (profile, address) DO UPDATE SET "
    "issued_at_ms = max(issued_at_ms, excluded.issued_at_ms), "
    "forget_after_ms = max(forget_after_ms, excluded.forget_after_ms)"
)
_INSERT_EVENT = (
    "INSERT INTO events (state_version, at_ms, kind, detail, "
    "profile, address, subject, created_at_ms, expires_at_ms, request_id, local) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_EVENTS = (
    "SELECT state_version, at_ms, kind, detail, "
    "profile, address, subject, created_at_ms, expires_at_ms, request_id, local "
    "FROM events WHERE state_version > ? ORDER BY state_version LIMIT ?"
)
# Erasure: ?1 = the subject, ?2 = a JSON array of the addresses.
_ERASE_AUDIT = (
    "DELETE FROM audit WHERE subject = ?1 OR address IN (SELECT value FROM json_each(?2))"
)
_COUNT_NAMED_AUDIT = (
    "SELECT count(*) FROM audit WHERE subject = ?1 OR address IN (SELECT value FROM json_each(?2))"
)
# A request's names (see store_schema v3): a scan of the requests still kept, which are the
# last minutes' only, so counting them is counting the ids this returns.
_NAMED_REQUESTS = (
    "SELECT request_id FROM requests WHERE names IS NOT NULL AND ("
    "EXISTS (SELECT 1 FROM json_each(names, '$.subjects') WHERE value = ?1) OR "
    "EXISTS (SELECT 1 FROM json_each(names, '$.addresses') "
    "WHERE value IN (SELECT value FROM json_each(?2))))"
)
_NEWEST_NAMED_EVENT = (
    "SELECT max(state_version) FROM events "
    "WHERE subject = ?1 OR address IN (SELECT value FROM json_each(?2))"
)

_EntryRow = tuple[str, str, str, int, int, str, int]


def _entry_row(e: StoredEntry) -> _EntryRow:
    return (
        e.profile,
        e.address,
        e.subject,
        e.created_at_ms,
        e.expires_at_ms,
        e.request_id,
        int(e.local),
    )


def _entry(row: Iterable[Any]) -> StoredEntry:
    profile, address, subject, created, expires, request_id, local = row
    return StoredEntry(profile, address, subject, created, expires, request_id, local == 1)


def _event_row(ev: StoredEvent) -> tuple[Any, ...]:
    entry: tuple[Any, ...] = (None,) * 7 if ev.entry is None else _entry_row(ev.entry)
    return (ev.state_version, ev.at_ms, ev.kind, ev.detail, *entry)


def _event(row: tuple[Any, ...]) -> StoredEvent:
    version, at_ms, kind, detail = row[:4]
    entry = None if row[4] is None else _entry(row[4:])
    return StoredEvent(version, at_ms, kind, entry, detail)


def _intent_op(text: str) -> IntentOp:
    if text == "upsert":
        return "upsert"
    if text == "remove":
        return "remove"
    raise RecordError(f"unknown intent op {text!r} (known: {sorted(INTENT_OPS)})")


def _request_row(req: NewRequest) -> tuple[str, str, bytes, int, bytes | None, str | None]:
    r = req.record
    subjects = [s for s in req.subjects if s]
    names = (
        json.dumps({"subjects": subjects, "addresses": list(req.addresses)}, separators=(",", ":"))
        if subjects or req.addresses
        else None
    )
    return (r.request_id, r.rpc, r.payload_digest, r.keep_until_ms, r.result, names)


def _meta(conn: sqlite3.Connection, key: str) -> int | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else int(row[0])


def _raise_meta(conn: sqlite3.Connection, key: str, value: int) -> None:
    """Set ``key`` to ``value`` unless it is already larger."""
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
        (key, value),
    )


def _cut_events(conn: sqlite3.Connection, through_version: int) -> int:
    """Drop the history up to and including ``through_version``; returns rows deleted."""
    deleted = conn.execute(
        "DELETE FROM events WHERE state_version <= ?", (through_version,)
    ).rowcount
    _raise_meta(conn, META_EVENTS_FLOOR, through_version)
    return deleted


def _erase(conn: sqlite3.Connection, erasure: Erasure) -> int:
    params = (erasure.subject, json.dumps(sorted(set(erasure.addresses))))
    audit = conn.execute(_ERASE_AUDIT, params).rowcount
    named = [(rid,) for (rid,) in conn.execute(_NAMED_REQUESTS, params)]
    # Past its window a request needs no replay protection: delete it. Inside it, keep only
    # what recognises a replay: id, rpc, digest and how long to keep them.
    conn.executemany(
        "DELETE FROM requests WHERE request_id = ? AND keep_until_ms <= ?",
        ((rid, erasure.now_ms) for (rid,) in named),
    )
    conn.executemany("UPDATE requests SET result = NULL, names = NULL WHERE request_id = ?", named)
    newest = conn.execute(_NEWEST_NAMED_EVENT, params).fetchone()[0]
    if newest is not None:
        _cut_events(conn, int(newest))
    return audit + len(named)


class Store:
    """The durable state of one agent. Make one with ``Store.open``; close it when done."""

    def __init__(self, path: Path, writer: sqlite3.Connection, busy_timeout_s: float) -> None:
        self._path = path
        self._writer: sqlite3.Connection | None = writer
        self._write_lock = threading.Lock()
        self._busy_timeout_s = busy_timeout_s
        self._readers = _ReaderPool(path, busy_timeout_s)
        self._ceiling = VersionCeiling(path)

    @classmethod
    def open(cls, path: Path, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> Store:
        """Open (creating, mode 0600, if missing) and check the database, then migrate it.

        Raises ``StoreCorrupt`` when the file is not a database or ``PRAGMA quick_check``
        finds damage; ``StoreError`` otherwise.
        """
        _create_private(path)
        try:
            conn = _connect(path, busy_timeout_s)
        except sqlite3.Error as exc:
            raise store_error(exc, path) from exc
        try:
            _configure_writer(conn, path)
            _check_integrity(conn, path)
            _migrate(conn, path)
        except sqlite3.Error as exc:
            conn.close()
            raise store_error(exc, path) from exc
        except BaseException:
            conn.close()
            raise
        return cls(path, conn, busy_timeout_s)

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        """Close every connection; the last close checkpoints the WAL into the database."""
        with self._write_lock:
            writer, self._writer = self._writer, None
        self._readers.close()
        if writer is not None:
            writer.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ----- transactions -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction. ``durable=False`` commits without waiting for the disk
        (written to the OS, so a killed process loses nothing; an OS crash may lose it): for
        intents only. A later durable commit's fsync of the WAL makes it durable too."""
        with self._write_lock:
            conn = self._writer
            if conn is None:
                raise StoreError("store_failed", self._path, "the store is closed")
            try:
                if not durable:
                    conn.execute("PRAGMA synchronous = OFF")
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                _rollback(conn)
                raise store_error(exc, self._path) from exc
            except BaseException:
                _rollback(conn)
                raise
            finally:
                if not durable:
                    conn.execute("PRAGMA synchronous = FULL")

    @contextlib.contextmanager
    def _reading(self, *, one_statement: bool = False) -> Iterator[sqlite3.Connection]:
        """A read connection in one read transaction (one snapshot for all its statements).

        ``one_statement``: the caller runs one statement, which is a snapshot by itself, so no
        BEGIN/COMMIT is sent: each SQLite call gives up the GIL, and getting it back is what
        the writer thread waits for under load.
        """
        try:
            conn = self._readers.acquire()
        except sqlite3.Error as exc:
            raise store_error(exc, self._path) from exc
        explicit = not one_statement
        try:
            if explicit:
                conn.execute("BEGIN")
            yield conn
            if explicit:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise store_error(exc, self._path) from exc
        finally:
            _rollback(conn)
            self._readers.release(conn)

    # ----- reads ------------------------------------------------------------------------------

    def release_memory(self) -> None:
        """Give back what a large batch left behind: idle again, the agent needs a few pages,
        not tens of megabytes.

        The writer connection is replaced by a fresh one: besides its page cache, each of its
        prepared statements keeps a copy of the values last bound to it until it runs again (a
        100,000-entry Sync's request row binds megabytes of result and names). If a fresh one
        cannot be opened, the old one is kept with its cache shrunk.
        """
        with self._write_lock:
            if self._writer is not None:
                try:
                    fresh = _connect(self._path, self._busy_timeout_s)
                    _configure_writer(fresh, self._path)
                except (sqlite3.Error, StoreError):
                    self._writer.execute("PRAGMA shrink_memory")
                else:
                    self._writer.close()
                    self._writer = fresh
        self._readers.shrink()

    def entry_rows(self) -> list[_EntryRow]:
        """Every stored entry as its row (profile, address, subject, created_at_ms,
        expires_at_ms, request_id, local): what a start loads, 100,000 of them, without a
        record object each."""
        with self._reading(one_statement=True) as conn:
            return conn.execute(_SELECT_ENTRIES).fetchall()

    def load_entries(self) -> list[StoredEntry]:
        """Every stored entry (dynamic entries and local grants), in key order."""
        return [_entry(row) for row in self.entry_rows()]

    def state_version(self) -> int:
        with self._reading() as conn:
            return _meta(conn, META_STATE_VERSION) or 0

    def last_sync_issued_at_ms(self) -> int | None:
        """``issued_at`` of the newest applied Sync, ``None`` before the first one."""
        with self._reading() as conn:
            return _meta(conn, META_LAST_SYNC)

    def lookup_request(self, request_id: str) -> RequestRecord | None:
        """The stored record of ``request_id``, even one past ``keep_until_ms`` not yet purged."""
        return self.lookup_requests([request_id]).get(request_id)

    def lookup_requests(self, request_ids: Iterable[str]) -> dict[str, RequestRecord]:
        """``lookup_request`` for many ids in one query; ids not stored are absent."""
        with self._reading(one_statement=True) as conn:
            rows = conn.execute(_SELECT_REQUESTS, (json.dumps(list(request_ids)),)).fetchall()
        return {
            rid: RequestRecord(rid, rpc, bytes(digest), keep_until, result)
            for rid, rpc, digest, keep_until, result in rows
        }

    def last_issued_at(self, keys: Iterable[EntryKeyText]) -> dict[EntryKeyText, int]:
        """Ordering memory of the given (profile, address) keys; unknown keys are absent."""
        pairs = json.dumps([[profile, address] for profile, address in keys])
        with self._reading(one_statement=True) as conn:
            rows = conn.execute(
                "SELECT o.profile, o.address, o.issued_at_ms FROM json_each(?) AS k "
                "JOIN ordering AS o ON o.profile = json_extract(k.value, '$[0]') "
                "AND o.address = json_extract(k.value, '$[1]')",
                (pairs,),
            ).fetchall()
        return {(p, a): issued for p, a, issued in rows}

    def ordering_after(self, issued_at_ms: int) -> dict[EntryKeyText, int]:
        """Ordering memory of every key last ordered after ``issued_at_ms`` (what can make a
        Sync of that time STALE): a scan, as a Sync is rare and the rows it finds are few."""
        with self._reading(one_statement=True) as conn:
            rows = conn.execute(
                "SELECT profile, address, issued_at_ms FROM ordering WHERE issued_at_ms > ?",
                (issued_at_ms,),
            ).fetchall()
        return {(p, a): issued for p, a, issued in rows}

    def events_since(self, version: int, limit: int) -> EventPage:
        """Up to ``limit`` retained events with ``state_version > version``, oldest first,
        with the history's lower bound read in the same snapshot."""
        if limit < 1:
            raise RecordError(f"limit must be >= 1, got {limit}")
        with self._reading() as conn:
            floor = _meta(conn, META_EVENTS_FLOOR) or 0
            rows = conn.execute(_SELECT_EVENTS, (version, limit)).fetchall()
        return EventPage(floor + 1, tuple(_event(row) for row in rows))

    def oldest_retained_version(self) -> int:
        """Every event with ``state_version >=`` this is retained (1: nothing was ever cut)."""
        with self._reading() as conn:
            return (_meta(conn, META_EVENTS_FLOOR) or 0) + 1

    def pending_intents(self) -> tuple[PendingIntent, ...]:
        """Intents written and not yet cleared, oldest first (after a crash: to converge)."""
        with self._reading() as conn:
            heads = conn.execute(
                "SELECT intent_id, created_at_ms, changes FROM intents ORDER BY id"
            ).fetchall()
        return tuple(
            PendingIntent(
                intent_id,
                created_at_ms,
                tuple(
                    IntentChange(_intent_op(row[0]), _entry(row[1:])) for row in json.loads(changes)
                ),
            )
            for intent_id, created_at_ms, changes in heads
        )

    def audit_records(
        self,
        *,
        since_ms: int = 0,
        limit: int | None = None,
        request_id: str = "",
        subject: str = "",
        address: str = "",
    ) -> list[AuditRecord]:
        """The newest ``limit`` audit rows (all without one) with ``at_ms >= since_ms`` and the
        given request id, subject and address (each only if not empty), in the order they were
        written. Filtered lookups scan the table (no index on request ids: a Sync writes
        100,000 rows at once), about 70 ms at a million rows: a sysadmin's query can afford
        it, on a read connection the writer never waits for."""
        if limit is not None and limit < 1:
            raise RecordError(f"limit must be >= 1, got {limit}")
        params = (since_ms, request_id, subject, address, -1 if limit is None else limit)
        with self._reading(one_statement=True) as conn:
            rows = conn.execute(_SELECT_AUDIT, params).fetchall()
        return [AuditRecord(*row) for row in rows]

    def addresses_of_subject(self, subject: str) -> frozenset[str]:
        """Addresses the subject holds or held (entries and audit rows): its addresses to
        erase."""
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT address FROM entries WHERE subject = ?1 "
                "UNION SELECT address FROM audit WHERE subject = ?1 AND address <> ''",
                (subject,),
            ).fetchall()
        return frozenset(address for (address,) in rows)

    def count_subject_records(self, subject: str, addresses: Iterable[str]) -> int:
        """How many records ``erase_subject(subject, addresses, ...)`` would erase now.

        Exact while nothing else writes (the engine is the single writer), so the engine can put
        the count in an Erase's result before committing the erasure with it.
        """
        params = (subject, json.dumps(sorted(set(addresses))))
        with self._reading() as conn:
            audit = conn.execute(_COUNT_NAMED_AUDIT, params).fetchone()[0]
            requests = conn.execute(_NAMED_REQUESTS, params).fetchall()
        return int(audit) + len(requests)

    # ----- writes -----------------------------------------------------------------------------

    def write_intent(self, intent: PendingIntent) -> None:
        """Persist what is about to be sent to the kernel, before sending it.

        Not flushed to the disk: the intent only has to outlive this process (a ``kill -9``
        between the kernel transaction and the commit), which it does once the OS has it. A
        power loss takes the kernel's ruleset with it, and the restore rebuilds from the last
        durable commit, where no acknowledged change is missing. One fsync less per group.
        """
        changes = json.dumps(
            [[change.op, *_entry_row(change.entry)] for change in intent.changes],
            separators=(",", ":"),
        )
        with self._writing(durable=False) as conn:
            conn.execute(
                "INSERT INTO intents (intent_id, created_at_ms, changes) VALUES (?, ?, ?)",
                (intent.intent_id, intent.created_at_ms, changes),
            )

    def record_stop_generation(self, generation: int) -> None:
        """Remember the ruleset generation at a clean stop (see ``take_stop_generation``)."""
        with self._writing() as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (META_STOP_GENERATION, generation),
            )

    def take_stop_generation(self) -> int | None:
        """The generation recorded at the last clean stop, forgotten as it is read: a later
        crash must not find it again."""
        with self._writing() as conn:
            value = _meta(conn, META_STOP_GENERATION)
            if value is not None:
                conn.execute("DELETE FROM meta WHERE key = ?", (META_STOP_GENERATION,))
        return value

    def discard_intent(self, intent_id: str) -> None:
        """Forget an intent whose kernel transaction was refused (nothing changed)."""
        with self._writing(durable=False) as conn:
            conn.execute("DELETE FROM intents WHERE intent_id = ?", (intent_id,))

    def commit(self, batch: CommitBatch, *, ready: Callable[[], object] | None = None) -> int:
        """Write one group commit in one transaction; returns the records ``batch.erase``
        erased (0 without one).

        ``ready``, if given, is called after the rows are written and before COMMIT: it waits
        for what must happen first (the kernel transaction) and raises to roll everything back.

        Raises ``RecordError`` (and writes nothing) when the batch would move ``state_version``
        backwards or carries an event not newer than the stored version; a request id already
        stored, a repeated event version or any other SQLite failure is a ``StoreError``.
        """
        with self._writing() as conn:
            current = _meta(conn, META_STATE_VERSION) or 0
            if batch.state_version < current:
                raise RecordError(f"state_version {batch.state_version} < stored {current}")
            if batch.events and batch.events[0].state_version <= current:
                raise RecordError(
                    f"event version {batch.events[0].state_version} <= stored {current}"
                )
            self._cover(batch.state_version)
            self._write_batch(conn, batch)
            erased = _erase(conn, batch.erase) if batch.erase is not None else 0
            if ready is not None:
                ready()
        if batch.erase is not None:
            self._truncate_wal()
        return erased

    def _cover(self, version: int) -> None:
        try:
            self._ceiling.cover(version)
        except OSError as exc:
            raise StoreError(
                "store_failed", self._ceiling.path, f"cannot record the version ceiling: {exc}"
            ) from exc

    def record_ceiling(self) -> None:
        """Make sure the ceiling beside the database covers its current version."""
        self._cover(self.state_version())

    def replay_floor_ms(self) -> int:
        """Signed requests issued before this (unix ms) are refused: see ``resume_after_loss``."""
        with self._reading(one_statement=True) as conn:
            return _meta(conn, META_REPLAY_FLOOR) or 0

    def resume_after_loss(self, now_ms: int) -> int:
        """Start this fresh store where a lost one left off; returns its first state_version.

        The lost database took the request log with it, so a signed request accepted before
        (a captured Allow, since revoked) could be applied again: every request issued before
        ``now_ms`` is refused from now on (``replay_floor_ms``). Its versions are unknown too:
        this store continues from the ceiling recorded beside it (``VersionCeiling``), with no
        history below (a watcher from an older version is told RESYNC_REQUIRED).
        """
        version = self._ceiling.read()
        with self._writing() as conn:
            if (_meta(conn, META_STATE_VERSION) or 0) > version:
                raise RecordError("resume_after_loss on a store that has versions of its own")
            self._cover(version)
            conn.execute("UPDATE meta SET value = ? WHERE key = ?", (version, META_STATE_VERSION))
            _raise_meta(conn, META_EVENTS_FLOOR, version)
            _raise_meta(conn, META_REPLAY_FLOOR, now_ms)
        return version

    @staticmethod
    def _write_batch(conn: sqlite3.Connection, batch: CommitBatch) -> None:
        conn.executemany(_DELETE_ENTRY, batch.removals)
        conn.executemany(_UPSERT_ENTRY, (_entry_row(e) for e in batch.upserts))
        conn.executemany(_INSERT_REQUEST, map(_request_row, batch.requests))
        conn.executemany(
            _INSERT_AUDIT,
            (
                (
                    a.at_ms,
                    a.action,
                    a.profile,
                    a.address,
                    a.subject,
                    a.request_id,
                    a.caller,
                    a.keyid,
                    a.detail,
                )
                for a in batch.audit
            ),
        )
        conn.executemany(
            _MARK_ORDERING,
            ((m.profile, m.address, m.issued_at_ms, m.forget_after_ms) for m in batch.ordering),
        )
        if batch.history_floor:
            _cut_events(conn, batch.history_floor)
        conn.executemany(_INSERT_EVENT, (_event_row(ev) for ev in batch.events))
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = ?", (batch.state_version, META_STATE_VERSION)
        )
        if batch.last_sync_issued_at_ms is not None:
            _raise_meta(conn, META_LAST_SYNC, batch.last_sync_issued_at_ms)
        if batch.intent_id is not None:
            conn.execute("DELETE FROM intents WHERE intent_id = ?", (batch.intent_id,))

    def erase_subject(self, subject: str, addresses: Iterable[str], now_ms: int) -> int:
        """Erase (PROTOCOL.md Erase) every audit and request record naming ``subject`` or one
        of ``addresses``, in one transaction; returns how many records were erased.

        A request record still inside its window is reduced, not deleted, and counts as erased.
        Retained events naming them are cut from the history (see the module docstring).
        """
        with self._writing() as conn:
            erased = _erase(conn, Erasure(subject, tuple(addresses), now_ms))
        self._truncate_wal()
        return erased

    def _truncate_wal(self) -> None:
        """Best effort: copy the WAL into the database and empty it, so the pre-erasure page
        images in old WAL frames are gone too. A reader still holding an old snapshot past the
        busy timeout leaves it for a later checkpoint; the erasure itself is already durable."""
        with self._write_lock:
            if self._writer is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def purge(self, now_ms: int, *, audit_retention_ms: int, max_events: int) -> PurgeCounts:
        """Routine retention, in one transaction.

        Deletes audit rows older than ``audit_retention_ms``, request records past
        ``keep_until_ms``, ordering memory past ``forget_after_ms``, and cuts the event history
        to the newest ``max_events`` events none older than ``audit_retention_ms``.
        """
        if audit_retention_ms < 0 or max_events < 0:
            raise RecordError("audit_retention_ms and max_events must be >= 0")
        cutoff = now_ms - audit_retention_ms
        with self._writing() as conn:
            audit = conn.execute("DELETE FROM audit WHERE at_ms < ?", (cutoff,)).rowcount
            requests = conn.execute(
                "DELETE FROM requests WHERE keep_until_ms <= ?", (now_ms,)
            ).rowcount
            ordering = conn.execute(
                "DELETE FROM ordering WHERE forget_after_ms <= ?", (now_ms,)
            ).rowcount
            # Cut a prefix only, so the retained history stays gap-free even if at_ms ever
            # went backwards.
            by_age = conn.execute(
                "SELECT max(state_version) FROM events WHERE at_ms < ?", (cutoff,)
            ).fetchone()[0]
            by_count = conn.execute(
                "SELECT state_version FROM events ORDER BY state_version DESC LIMIT 1 OFFSET ?",
                (max_events,),
            ).fetchone()
            cut = max(by_age or 0, by_count[0] if by_count else 0)
            events = _cut_events(conn, cut) if cut else 0
        return PurgeCounts(audit=audit, requests=requests, ordering=ordering, events=events)
