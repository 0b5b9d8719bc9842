"""The store's SQLite schema and its migrations, versioned with ``PRAGMA user_version``.

Owns the DDL and nothing else: ``agent.store`` runs ``MIGRATIONS[v]`` to move a database from
version ``v`` to ``v + 1``, each step in its own transaction. A step, once released, is never
edited; a schema change is a new step appended to ``MIGRATIONS``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

Migration = Callable[[sqlite3.Connection], None]

# Keys of the one-row-per-key ``meta`` table.
META_STATE_VERSION = "state_version"
META_LAST_SYNC = "last_sync_issued_at_ms"
# The highest state_version whose event is no longer retained (0: history is complete).
META_EVENTS_FLOOR = "events_floor"
# The kernel's ruleset generation when the daemon last stopped cleanly; taken (read and
# deleted) at the next start, so it speaks for one stop only.
META_STOP_GENERATION = "kernel_generation_at_stop"
# After a recovery from a lost database: signed requests issued before this (unix ms) are
# refused, since the lost request log can no longer tell a replay from a new request.
META_REPLAY_FLOOR = "replay_floor_ms"

_V1 = (
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE entries (
        profile       TEXT NOT NULL,
        address       TEXT NOT NULL,
        subject       TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        request_id    TEXT NOT NULL,
        local         INTEGER NOT NULL CHECK (local IN (0, 1)),
        PRIMARY KEY (profile, address)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX entries_by_subject ON entries (subject)",
    # A rowid table: a Sync's result can be megabytes, too big for a WITHOUT ROWID row.
    """
    CREATE TABLE requests (
        id             INTEGER PRIMARY KEY,
        request_id     TEXT NOT NULL UNIQUE,
        rpc            TEXT NOT NULL,
        payload_digest BLOB NOT NULL,
        keep_until_ms  INTEGER NOT NULL,
        result         BLOB
    )
    """,
    "CREATE INDEX requests_by_keep_until ON requests (keep_until_ms)",
    # Who and what a request names, only so that an erasure can find the request.
    """
    CREATE TABLE request_names (
        request_id TEXT NOT NULL REFERENCES requests (request_id) ON DELETE CASCADE,
        kind       TEXT NOT NULL CHECK (kind IN ('subject', 'address')),
        value      TEXT NOT NULL,
        PRIMARY KEY (request_id, kind, value)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX request_names_by_value ON request_names (kind, value)",
    """
    CREATE TABLE audit (
        id         INTEGER PRIMARY KEY,
        at_ms      INTEGER NOT NULL,
        action     TEXT NOT NULL,
        profile    TEXT NOT NULL,
        address    TEXT NOT NULL,
        subject    TEXT NOT NULL,
        request_id TEXT NOT NULL,
        caller     TEXT NOT NULL,
        keyid      TEXT NOT NULL,
        detail     TEXT NOT NULL
    )
    """,
    "CREATE INDEX audit_by_at ON audit (at_ms)",
    "CREATE INDEX audit_by_subject ON audit (subject)",
    "CREATE INDEX audit_by_address ON audit (address)",
    """
    CREATE TABLE ordering (
        profile         TEXT NOT NULL,
        address         TEXT NOT NULL,
        issued_at_ms    INTEGER NOT NULL,
        forget_after_ms INTEGER NOT NULL,
        PRIMARY KEY (profile, address)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX ordering_by_address ON ordering (address)",
    "CREATE INDEX ordering_by_forget ON ordering (forget_after_ms)",
    # An event either carries a whole entry or none of it.
    """
    CREATE TABLE events (
        state_version INTEGER PRIMARY KEY,
        at_ms         INTEGER NOT NULL,
        kind          TEXT NOT NULL,
        detail        TEXT NOT NULL,
        profile       TEXT,
        address       TEXT,
        subject       TEXT,
        created_at_ms INTEGER,
        expires_at_ms INTEGER,
        request_id    TEXT,
        local         INTEGER,
        CHECK ((profile IS NULL) + (address IS NULL) + (subject IS NULL)
               + (created_at_ms IS NULL) + (expires_at_ms IS NULL) + (request_id IS NULL)
               + (local IS NULL) IN (0, 7))
    )
    """,
    """
    CREATE TABLE intents (
        id            INTEGER PRIMARY KEY,
        intent_id     TEXT NOT NULL UNIQUE,
        created_at_ms INTEGER NOT NULL
    )
    """,
    """
    CREATE TABLE intent_changes (
        intent_id     TEXT NOT NULL REFERENCES intents (intent_id) ON DELETE CASCADE,
        seq           INTEGER NOT NULL,
        op            TEXT NOT NULL CHECK (op IN ('upsert', 'remove')),
        profile       TEXT NOT NULL,
        address       TEXT NOT NULL,
        subject       TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        request_id    TEXT NOT NULL,
        local         INTEGER NOT NULL CHECK (local IN (0, 1)),
        PRIMARY KEY (intent_id, seq)
    ) WITHOUT ROWID
    """,
)


def _create_v1(conn: sqlite3.Connection) -> None:
    for statement in _V1:
        conn.execute(statement)
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, 0)",
        ((META_STATE_VERSION,), (META_EVENTS_FLOOR,)),
    )


# v2: an intent's changes are one JSON array in its row (``[op, profile, address, subject,
# created_at_ms, expires_at_ms, request_id, local]`` each), written and deleted as one row: a
# 100,000-entry Sync no longer inserts and then cascade-deletes 100,000 change rows. Pending
# v1 intents are carried over in order.
_V2 = (
    "ALTER TABLE intents ADD COLUMN changes TEXT NOT NULL DEFAULT '[]'",
    """
    UPDATE intents SET changes = (
        SELECT coalesce(json_group_array(json_array(
            op, profile, address, subject, created_at_ms, expires_at_ms, request_id, local)), '[]')
        FROM (SELECT * FROM intent_changes c WHERE c.intent_id = intents.intent_id ORDER BY seq)
    )
    """,
    "DROP TABLE intent_changes",
)


def _compact_intents_v2(conn: sqlite3.Connection) -> None:
    for statement in _V2:
        conn.execute(statement)


# v3: who and what a request names (only so that an erasure can find it) is one JSON object in
# its row, ``{"subjects": [...], "addresses": [...]}``, NULL when it names nobody, instead of a
# row per name in ``request_names``: a 100,000-entry Sync inserted 200,000 indexed rows (0.5 s
# of its commit) for the rare Erase. Requests are kept only for their window, so the erasure's
# scan of their names reads minutes of requests, not days.
_V3 = (
    "ALTER TABLE requests ADD COLUMN names TEXT",
    """
    UPDATE requests SET names = (
        SELECT json_object(
            'subjects', json_group_array(value) FILTER (WHERE kind = 'subject'),
            'addresses', json_group_array(value) FILTER (WHERE kind = 'address'))
        FROM request_names n WHERE n.request_id = requests.request_id
        HAVING count(*) > 0
    )
    """,
    "DROP TABLE request_names",
)


def _request_names_in_rows_v3(conn: sqlite3.Connection) -> None:
    for statement in _V3:
        conn.execute(statement)


MIGRATIONS: tuple[Migration, ...] = (
    _create_v1,
    _compact_intents_v2,
    _request_names_in_rows_v3,
)
