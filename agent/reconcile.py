"""Read back the kernel, diff against the durable state, apply the difference in one transaction.

Owns convergence, the one path used for start-up (adopt a live table, settle a crash's pending
intent), reboot restore, drift repair and periodic verification. "If it is in our table, it is
ours": elements the store does not know are removed, entries the store has but the kernel
lost are restored with their remaining timeout, and elements re-added by hand with another
timeout or comment are written again as the agent made them; entries whose time passed become
EXPIRED events and are never restored. The rest of the table (chains, rules, sets, objects, the
static sources' elements) is compared whole by ``agent.rules.structure``: whatever differs is
rendered again and whatever the agent did not make is deleted. A broken or missing structure is
re-installed together with the restored elements in the same transaction, so allowed sources
are never locked out in between; such a
structure repair is drift (logged, counted) but not an event: events and ``state_version`` move
once per entry that changes. It never flushes the table, so entries keep working while the
daemon restarts. The decision is pure (``plan_convergence``); ``converge`` reads and writes.

``converge`` is not thread-safe against the engine: at run time it runs as a task on the
engine's writer thread (``Engine.run_task``), so a repair never races a request.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace

from agent.model import EntryKey, ObservedElement
from agent.rules import render
from agent.rules.structure import (
    expected_structure,
    interval_sets,
    read_structure,
    render_repair,
)
from agent.rules.table import FirewallTable
from agent.state import (
    LOCAL_PREFIX,
    Entry,
    Event,
    EventKind,
    StateView,
    expire,
    newest_numbered,
    numbered,
)
from agent.state_records import (
    element_for,
    expiry_audit,
    from_stored,
    settled_audit,
    to_stored,
    to_stored_event,
)
from agent.store import Store
from agent.store_records import CommitBatch, PendingIntent

log = logging.getLogger(__name__)
_REQUEST_IN_COMMENT = re.compile(r"(?:^|\s)req=(\S+)")
_SUBJECT_IN_COMMENT = re.compile(r"\ssub=(.*)\Z", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Scope:
    """What one convergence looks at.

    ``install``: re-apply the structure whatever it looks like (start-up: config may have
    changed). ``structure``: check the structure cheaply and repair it if broken. ``sets``:
    allow sets (names) whose elements are compared; ``None`` means all of them, an empty set
    none. ``settle``: settle pending intents (start-up only: at run time the engine owns them).
    """

    install: bool = False
    structure: bool = True
    sets: frozenset[str] | None = frozenset()
    settle: bool = False


STARTUP = Scope(install=True, structure=True, sets=None, settle=True)
# Start-up after a clean stop when the ruleset generation has not moved since (see
# ``startup_scope``): the elements are as the previous process left them, less the ones whose
# timeout ran out, which the stored expiry times name too. Listing 100,000 elements would cost
# over a second; the structure is still checked and re-applied.
UNCHANGED_STARTUP = Scope(install=True, structure=True, sets=frozenset(), settle=True)
FULL = Scope(structure=True, sets=None)
STRUCTURE = Scope(structure=True, sets=frozenset())


def startup_scope(stop_generation: int | None, generation: int | None, *, intents: bool) -> Scope:
    """Pure: what the start-up convergence must read.

    ``stop_generation`` is the kernel's ruleset generation (``ruleset_fingerprint``: with the
    boot and the namespace) recorded at the last clean stop (None after a crash or on a fresh
    state), ``generation`` the current one (None if unreadable). Every committed transaction
    of any table moves the generation, so equal values mean nobody changed the ruleset in
    between. Pending intents need the elements to be settled.
    """
    if stop_generation is None or stop_generation != generation or intents:
        return STARTUP
    return UNCHANGED_STARTUP


# How far an element's expiry in the kernel may be from its entry's before it counts as changed
# by hand: the kernel lists whole seconds, and a restored element's timeout is rounded up.
EXPIRY_TOLERANCE_MS = 5_000


def element_differs(entry: Entry, seen: ObservedElement, now_ms: int) -> bool:
    """Pure: whether the kernel's element of ``entry`` is not the one the agent wrote (another
    comment, no timeout, or another expiry: re-added by hand)."""
    if seen.timeout_s <= 0:
        return True
    if seen.comment != render.element_comment(entry.subject, entry.request_id, local=entry.local):
        return True
    return abs(now_ms + seen.expires_s * 1000 - entry.expires_at_ms) > EXPIRY_TOLERANCE_MS


@dataclass(frozen=True, slots=True)
class Convergence:
    restored: int = 0
    removed: int = 0
    corrected: int = 0  # elements whose timeout or comment was changed by hand
    settled_intents: int = 0
    expired: int = 0
    structure_repaired: tuple[str, ...] = ()  # what of the structure was missing
    events: tuple[Event, ...] = ()
    # At start-up there was no table at all (a first install, a reboot): installing it is no
    # drift, and is not logged as one.
    table_installed: bool = False

    @property
    def drift(self) -> bool:
        """Whether the kernel had drifted from the agent's state (and was repaired)."""
        return bool(self.structure_repaired or self.restored or self.removed or self.corrected)

    def describe(self) -> str:
        parts = []
        if self.table_installed:
            parts.append("table installed")
        elif self.structure_repaired:
            parts.append("structure restored (" + ", ".join(self.structure_repaired) + ")")
        parts += [
            f"{n} {what}"
            for n, what in (
                (self.restored, "entries restored"),
                (self.removed, "unknown elements removed"),
                (self.corrected, "elements' timeout or comment restored"),
                (self.expired, "expired"),
                (self.settled_intents, "intents settled"),
            )
            if n
        ]
        return ", ".join(parts) or "in sync"


def request_of(comment: str) -> str:
    m = _REQUEST_IN_COMMENT.search(comment)
    return m.group(1) if m else ""


def subject_of(comment: str) -> str:
    m = _SUBJECT_IN_COMMENT.search(comment)
    return m.group(1) if m else ""


def entry_from_element(e: ObservedElement, now_ms: int) -> Entry:
    """An entry rebuilt from the kernel alone (its comment names subject and request).

    Subjects longer than the comment's 128 bytes come back cut (ending in ``~``); the creation
    time is unknown and given as ``now_ms``.
    """
    request = request_of(e.comment)
    if e.comment.startswith("local ") and not request.startswith(LOCAL_PREFIX):
        request = LOCAL_PREFIX + request
    return Entry(e.key, subject_of(e.comment), now_ms, now_ms + e.expires_s * 1000, request)


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


@dataclass(frozen=True, slots=True)
class Plan:
    """What one convergence changes, decided from the read-back alone (``plan_convergence``).

    ``upserts``/``removals``: pending intents rolled forward into the store, ``settled`` their
    events; ``missing``: entries to restore into the kernel; ``unknown``: elements to remove from
    it; ``altered``: entries whose element is there with another timeout or comment (written
    again); ``result.events``: one per entry that changed, numbered from the view's
    ``state_version``.
    """

    view: StateView
    upserts: Mapping[EntryKey, Entry]
    removals: frozenset[EntryKey]
    settled: tuple[Event, ...]
    expired: tuple[Entry, ...]
    missing: tuple[Entry, ...]
    unknown: tuple[ObservedElement, ...]
    result: Convergence
    altered: tuple[Entry, ...] = ()


SETTLED = "settled at start: the kernel had this change of an unanswered request"


def settled_events(
    view: StateView, upserts: Mapping[EntryKey, Entry], removals: Collection[EntryKey], now_ms: int
) -> list[Event]:
    """Pure: one event per entry that rolling the intents forward changes (unnumbered).

    The change was made before the crash, but it changes the agent's state only now, and
    every change of the state has its event and version (PROTOCOL.md).
    """
    events = [
        Event(EventKind.REFRESHED if key in view.entries else EventKind.ADDED, now_ms, e, SETTLED)
        for key, e in upserts.items()
        if view.entries.get(key) != e
    ]
    events += [
        Event(EventKind.REMOVED, now_ms, view.entries[key], SETTLED)
        for key in sorted(removals)
        if key in view.entries
    ]
    return events


def plan_convergence(
    view: StateView,
    observed: Mapping[EntryKey, ObservedElement],
    *,
    checked: Collection[str],
    now_ms: int,
    intents: tuple[PendingIntent, ...] = (),
    structure_repaired: Sequence[str] = (),
) -> Plan:
    """Pure: the difference between ``view`` and the kernel's ``observed`` elements.

    Only sets named in ``checked`` were read, so only their entries can be missing. A repaired
    structure changes no entry: it is counted and logged as drift but raises no event and does
    not move ``state_version`` (PROTOCOL.md: one version per entry that changes), so a fresh
    host installing its table for the first time starts at version 0 with no history.
    """
    final = view.detached()
    ups, rems = settle_intents(final, intents, observed)
    settled = settled_events(view, ups, rems, now_ms)
    for key in rems:
        final.entries.pop(key, None)
    final.entries.update(ups)

    expiry = expire(final, now_ms)
    final.fold(expiry)
    profiles = {k.profile for k in final.entries}
    checked_sets = {
        (profile, family)
        for profile in profiles
        for family in (4, 6)
        if render.allow_set(profile, family) in checked
    }
    if len(checked_sets) == 2 * len(profiles):  # every set read (start-up, reboot): no filter
        missing = tuple(e for k, e in final.entries.items() if k not in observed)
    else:
        missing = tuple(
            e
            for k, e in final.entries.items()
            if (k.profile, k.address.family) in checked_sets and k not in observed
        )
    unknown = tuple(o for k, o in observed.items() if k not in final.entries)
    altered = tuple(
        final.entries[k]
        for k, o in observed.items()
        if k in final.entries and element_differs(final.entries[k], o, now_ms)
    )
    events = numbered([*settled, *expiry.events], view.state_version)
    version = view.state_version + len(events)
    # Made with their versions at once: a reboot restores 100,000 entries.
    events += [
        Event(EventKind.DRIFT_REPAIRED, now_ms, e, "restored into the kernel", version + i)
        for i, e in enumerate(missing, 1)
    ]
    version += len(missing)
    events += [
        Event(
            EventKind.DRIFT_REPAIRED,
            now_ms,
            entry_from_element(o, now_ms),
            "removed: not granted by the agent",
            version + i,
        )
        for i, o in enumerate(unknown, 1)
    ]
    version += len(unknown)
    events += [
        Event(
            EventKind.DRIFT_REPAIRED,
            now_ms,
            e,
            "timeout and comment restored: the element was changed by hand",
            version + i,
        )
        for i, e in enumerate(altered, 1)
    ]
    final.state_version = view.state_version + len(events)
    result = Convergence(
        restored=len(missing),
        removed=len(unknown),
        corrected=len(altered),
        settled_intents=len(intents),
        expired=len(expiry.removals),
        structure_repaired=tuple(structure_repaired),
        events=tuple(events),
    )
    return Plan(
        final,
        ups,
        frozenset(rems),
        tuple(events[: len(settled)]),
        expiry.removals,
        missing,
        unknown,
        result,
        altered,
    )


def converge(
    view: StateView, store: Store, table: FirewallTable, now_ms: int, scope: Scope = STARTUP
) -> tuple[StateView, Convergence]:
    """Bring kernel and store to the same allow state; returns the new view (``view`` is kept).

    Raises ``AgentError`` (nothing recorded) when the kernel or the store refuses; a kernel
    change that landed before a store failure is repaired by the next convergence.
    """
    cfg = table.cfg
    broken: list[str] = []
    absent = False
    all_sets = [(p.name, fam) for p in cfg.profiles for fam in (4, 6)]
    wanted = [s for s in all_sets if scope.sets is None or render.allow_set(*s) in scope.sets]
    readable = wanted
    structure = None
    if scope.structure or scope.install:
        live = read_structure(table.nft, cfg.table, interval_sets(cfg))
        expected = expected_structure(cfg)
        broken = expected.missing_from(live)
        absent = scope.install and not (live.chains or live.sets)
        rogue = expected.rogue_in(live)
        structure = render_repair(cfg, live, rogue)
        # An allow set deleted to be made again (its type or flags were changed) loses its
        # elements: they are restored in the same transaction, like those of a lost set.
        present = live.allow_sets() - set(rogue.sets)
        if broken:
            # A lost set lost its elements with it: compare every set, reading those still there.
            wanted = all_sets
        readable = [s for s in wanted if render.allow_set(*s) in present]
    observed = table.read_elements(readable) if readable else {}
    checked = {render.allow_set(*s) for s in wanted}
    intents = store.pending_intents() if scope.settle else ()
    plan = plan_convergence(
        view, observed, checked=checked, now_ms=now_ms, intents=intents, structure_repaired=broken
    )

    elements = [element_for(e, now_ms) for e in (*plan.missing, *plan.altered)]
    removals = [o.key for o in plan.unknown]
    if scope.install or broken:
        table.install_with(elements, removals, present=set(observed), structure=structure)
    elif elements or removals:
        table.apply(elements, removals, present=set(observed))

    result = replace(plan.result, table_installed=True) if absent else plan.result
    if plan.upserts or plan.removals or result.events or intents:
        gone = plan.removals | {e.key for e in plan.expired}
        # Numbered already, from the view's version on; only the history's length is written.
        kept, history_floor = newest_numbered([(result.events, view.state_version)])
        store.commit(
            CommitBatch(
                state_version=plan.view.state_version,
                upserts=tuple(to_stored(e) for e in plan.upserts.values()),
                removals=tuple((k.profile, k.address.text) for k in gone),
                audit=(
                    *map(settled_audit, plan.settled),
                    *(expiry_audit(e, now_ms) for e in plan.expired),
                ),
                events=tuple(map(to_stored_event, kept)),
                history_floor=history_floor,
            )
        )
        for intent in intents:
            store.discard_intent(intent.intent_id)
    if result.drift or intents or plan.expired:
        log.info(
            "converged kernel and state: %s",
            result.describe(),
            extra={"REASON": _log_reason(result)},
        )
    return plan.view, result


def _log_reason(result: Convergence) -> str:
    if result.table_installed:
        return "table_installed"
    return "drift" if result.drift else "converge"


def converge_task(
    store: Store, table: FirewallTable, now_ms: Callable[[], int], scope: Scope
) -> Callable[[StateView], tuple[StateView, Sequence[Event], Convergence]]:
    """``converge`` as an engine task (``Engine.run_task``): runs on the writer thread."""

    def task(view: StateView) -> tuple[StateView, Sequence[Event], Convergence]:
        final, conv = converge(view, store, table, now_ms(), scope)
        return final, conv.events, conv

    return task


def adopt_kernel(table: FirewallTable, now_ms: int) -> list[Entry]:
    """Entries rebuilt from the kernel's table alone (recovery from a lost or corrupt store)."""
    if not table.exists():
        return []
    live = read_structure(table.nft, table.cfg.table).allow_sets()
    sets = [
        (p.name, fam)
        for p in table.cfg.profiles
        for fam in (4, 6)
        if render.allow_set(p.name, fam) in live
    ]
    observed = table.read_elements(sets)
    return [entry_from_element(o, now_ms) for o in observed.values() if o.expires_s > 0]
