"""Pure: what to send to the kernel, given what is wanted and what is (believed) there.

Owns the diff between desired and observed elements; never performs I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from agent.model import Element, EntryKey


@dataclass(frozen=True, slots=True)
class ElementPlan:
    """One transaction's worth of element changes."""

    adds: tuple[Element, ...] = ()
    refreshes: tuple[Element, ...] = ()
    removes: tuple[EntryKey, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.adds or self.refreshes or self.removes)

    @property
    def deletes(self) -> tuple[EntryKey, ...]:
        """Keys the batch deletes: removals, and the old copy of every refreshed element."""
        return self.removes + tuple(e.key for e in self.refreshes)

    @property
    def creates(self) -> tuple[Element, ...]:
        return self.adds + self.refreshes


def plan_changes(
    upserts: Iterable[Element], removals: Iterable[EntryKey], present: Collection[EntryKey]
) -> ElementPlan:
    """Upserts of present keys are refreshes, of absent keys adds; absent removals are dropped.

    A key both upserted and removed in one call is an error of the caller.
    """
    ups = list(upserts)
    up_keys = {e.key for e in ups}
    if len(up_keys) != len(ups):
        raise ValueError("an element is upserted twice in one plan")
    asked = list(dict.fromkeys(removals))
    if up_keys.intersection(asked):
        raise ValueError("an element is both upserted and removed in one plan")
    rem = [k for k in asked if k in present]
    return ElementPlan(
        adds=tuple(e for e in ups if e.key not in present),
        refreshes=tuple(e for e in ups if e.key in present),
        removes=tuple(rem),
    )


def plan_replace_all(
    desired: Iterable[Element], observed: Mapping[EntryKey, object]
) -> ElementPlan:
    """Make the observed allow elements exactly ``desired``: add, refresh, remove the rest."""
    wanted = list(desired)
    keys = {e.key for e in wanted}
    return plan_changes(wanted, [k for k in observed if k not in keys], observed.keys())
