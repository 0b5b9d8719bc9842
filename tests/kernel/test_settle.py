"""A crash between the kernel transaction and the commit, settled at the next start by
``converge``: the real table in a lab namespace, the real store in a file, the intents written
as the writer writes them. What the kernel shows enters the state like any change (event,
version, audit row); what it does not show never happened."""

from __future__ import annotations

import time
from pathlib import Path

from tablekit import Rig

from agent.reconcile import STARTUP, converge
from agent.state import EventKind, StateView
from agent.state_records import element_for, from_stored
from agent.store import Store
from agent.store_records import IntentChange, PendingIntent, StoredEntry


def test_a_crashed_change_the_kernel_took_is_settled_with_its_event_and_audit_row(
    rig: Rig, tmp_path: Path
) -> None:
    now = int(time.time() * 1000)
    landed = StoredEntry("agent", "198.18.9.1", "agent-9", now, now + 600_000, "req-landed1")
    never_sent = StoredEntry("agent", "198.18.9.2", "agent-8", now, now + 600_000, "req-unsent1")
    store = Store.open(tmp_path / "state.db")
    try:
        # The first request's transaction reached the kernel before the crash; the second's not.
        store.write_intent(PendingIntent("i-landed", now, (IntentChange("upsert", landed),)))
        store.write_intent(PendingIntent("i-unsent", now, (IntentChange("upsert", never_sent),)))
        rig.table.apply([element_for(from_stored(landed), now)], present=set())

        view, conv = converge(StateView(), store, rig.table, now, STARTUP)

        key = rig.key("198.18.9.1")
        assert list(view.entries) == [key]
        assert view.state_version == 1
        assert [(e.kind, e.state_version) for e in conv.events] == [(EventKind.ADDED, 1)]
        assert conv.events[0].detail.startswith("settled at start")
        assert store.pending_intents() == ()
        assert store.state_version() == 1
        assert [r[1] for r in store.entry_rows()] == ["198.18.9.1"]
        assert [e.state_version for e in store.events_since(0, 10).events] == [1]
        audit = store.audit_records()
        assert [(a.action, a.address, a.request_id, a.caller) for a in audit] == [
            ("added", "198.18.9.1", "req-landed1", "")
        ]
        assert set(rig.table.read_elements()) == {key}
    finally:
        store.close()
