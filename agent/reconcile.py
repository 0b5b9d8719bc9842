"""Read back the kernel, diff against the durable state, apply the difference in one transaction.

Owns convergence: at start (adopt a live table, restore after reboot, settle a crash's pending
intent). "If it is in our table, it is ours": elements the store does not know are removed, and
entries the store has but the kernel lost are restored with their remaining timeout. It never
flushes the table, so entries keep working while the daemon restarts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass

from agent.engine import element_for, from_stored, to_stored, to_stored_event
from agent.model import EntryKey, ObservedElement
from agent.rules.table import FirewallTable
from agent.state import Entry, Event, EventKind, StateView, numbered
from agent.store import Store
from agent.store_records import CommitBatch, PendingIntent

log = logging.getLogger(__name__)
_REQUEST_IN_COMMENT = re.compile(r"(?:^|\s)req=(\S+)")


@dataclass(frozen=True, slots=True)
class Convergence:
    restored: int
    removed: int
    settled_intents: int


def request_of(comment: str) -> str:
    m = _REQUEST_IN_COMMENT.search(comment)
    return m.group(1) if m else ""


def settle_intents(
    view: StateView,
    intents: tuple[PendingIntent, ...],
    observed: Mapping[EntryKey, ObservedElement],
) -> tuple[dict[EntryKey, Entry], set[EntryKey]]:
    """Pure: what a crash between intent and commit left, judged by the kernel.

    A change the kernel shows (the element carries the intent's request id, or is gone for a
    removal) is rolled forward into the store; one it does not show never happened. Either way
    the caller got no answer, so its retry is applied normally.
    """
    upserts: dict[EntryKey, Entry] = {}
    removals: set[EntryKey] = set()
    for intent in intents:
        for change in intent.changes:
            entry = from_stored(change.entry)
            seen = observed.get(entry.key)
            if change.op == "upsert" and seen and request_of(seen.comment) == entry.request_id:
                upserts[entry.key] = entry
            elif change.op == "remove" and seen is None and entry.key in view.entries:
                removals.add(entry.key)
    return upserts, removals


def converge(view: StateView, store: Store, table: FirewallTable, now_ms: int) -> Convergence:
    """Bring kernel and store to the same allow state; ``view`` is updated in place."""
    observed = table.read_elements()
    intents = store.pending_intents()
    ups, rems = settle_intents(view, intents, observed)
    for key in rems:
        view.entries.pop(key, None)
    view.entries.update(ups)
    live = {k: e for k, e in view.entries.items() if e.expires_at_ms > now_ms}
    missing = [e for k, e in live.items() if k not in observed]
    unknown = [k for k in observed if k not in view.entries]
    if missing or unknown:
        table.apply([element_for(e, now_ms) for e in missing], unknown, present=set(observed))
    first = view.state_version
    events = numbered(
        (Event(EventKind.DRIFT_REPAIRED, now_ms, e, "restored into the kernel") for e in missing),
        first,
    )
    view.state_version += len(events)
    if ups or rems or events or intents:
        store.commit(
            CommitBatch(
                state_version=view.state_version,
                upserts=tuple(to_stored(e) for e in ups.values()),
                removals=tuple((k.profile, k.address.text) for k in rems),
                events=tuple(map(to_stored_event, events)),
            )
        )
        for intent in intents:
            store.discard_intent(intent.intent_id)
    if missing or unknown or intents:
        log.info(
            "converged kernel and state: %d restored, %d unknown removed, %d intents settled",
            len(missing),
            len(unknown),
            len(intents),
        )
    return Convergence(len(missing), len(unknown), len(intents))
