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


def plan_replace_all(desired: Iterable[Element], observed: Collection[EntryKey]) -> ElementPlan:
    """Make the observed allow elements exactly ``desired``: add, refresh, remove the rest.

    ``observed`` holds the keys in the kernel (a mapping keyed by them will do).
    """
    wanted = list(desired)
    keys = {e.key for e in wanted}
    return plan_changes(wanted, [k for k in observed if k not in keys], observed)


@dataclass(frozen=True, slots=True)
class SetOverflow:
    """A set the plan would fill beyond its configured size."""

    profile: str
    family: int
    after: int
    size: int


def set_overflows(
    plan: ElementPlan, present: Collection[EntryKey], sizes: Mapping[int, int]
) -> tuple[SetOverflow, ...]:
    """The sets (per profile and family) that ``plan`` applied to ``present`` would overfill.

    ``sizes`` is the configured size per family. A refresh neither adds nor frees a slot; the
    kernel counts the slots a removal frees in the same batch.
    """
    counts: dict[tuple[str, int], int] = {}
    for key in present:
        where = (key.profile, key.address.family)
        counts[where] = counts.get(where, 0) + 1
    for key in plan.removes:
        where = (key.profile, key.address.family)
        counts[where] = counts.get(where, 0) - 1
    grown: set[tuple[str, int]] = set()
    for e in plan.adds:
        where = (e.key.profile, e.key.address.family)
        counts[where] = counts.get(where, 0) + 1
        grown.add(where)
    return tuple(
        SetOverflow(profile, family, counts[(profile, family)], sizes[family])
        for profile, family in sorted(grown)
        if counts[(profile, family)] > sizes[family]
    )
