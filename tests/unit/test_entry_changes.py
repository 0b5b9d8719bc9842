"""A group's working entries behave as a copy of the live entries would, without copying them:
reads see the group's changes, the live entries stay as they were until the changes are written
in, and then they hold exactly what a copy would have held."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.entry_changes import EntryChanges
from agent.state import StateView

# An operation: (key, value) sets, (key, None) deletes (when present).
operations = st.lists(st.tuples(st.integers(0, 12), st.one_of(st.none(), st.integers())))
bases = st.dictionaries(st.integers(0, 12), st.integers(), max_size=10)


def play(ops: list[tuple[int, int | None]], *targets: dict[int, int] | EntryChanges[int, int]):
    for key, value in ops:
        for target in targets:
            if value is not None:
                target[key] = value
            elif key in target:
                del target[key]


@given(bases, operations)
def test_reads_see_what_a_copy_would_hold_and_the_base_is_untouched(
    base: dict[int, int], ops: list[tuple[int, int | None]]
) -> None:
    original = dict(base)
    copy, changes = dict(base), EntryChanges(base)

    play(ops, copy, changes)

    assert dict(changes) == copy
    assert len(changes) == len(copy)
    # The views walk in the keys' order, each key with the value a read gives.
    assert list(changes.items()) == [(k, changes[k]) for k in changes]
    assert list(changes.values()) == [changes[k] for k in changes]
    assert dict(changes.items()) == copy
    assert all((k in changes) == (k in copy) for k in range(13))
    assert [changes.get(k) for k in range(13)] == [copy.get(k) for k in range(13)]
    assert [changes.get(k, -1) for k in range(13)] == [copy.get(k, -1) for k in range(13)]
    assert base == original


@given(bases, operations)
def test_written_in_the_changes_leave_the_base_equal_to_the_copy(
    base: dict[int, int], ops: list[tuple[int, int | None]]
) -> None:
    copy, changes = dict(base), EntryChanges(base)
    play(ops, copy, changes)

    changes.write_to(base)

    assert base == copy


def test_iteration_keeps_the_base_order_then_new_keys_in_arrival_order() -> None:
    changes = EntryChanges({1: 10, 2: 20, 3: 30})
    changes[9] = 90
    changes[2] = 21
    del changes[1]
    changes[5] = 50

    assert list(changes) == [2, 3, 9, 5]
    assert list(changes.items()) == [(2, 21), (3, 30), (9, 90), (5, 50)]
    assert list(changes.values()) == [21, 30, 90, 50]


def test_unchanged_it_iterates_as_its_base() -> None:
    changes = EntryChanges({1: 10, 2: 20})

    assert (list(changes), list(changes.items()), list(changes.values())) == (
        [1, 2],
        [(1, 10), (2, 20)],
        [10, 20],
    )


def test_a_missing_key_is_a_key_error_like_a_dict() -> None:
    changes = EntryChanges({1: 10})
    del changes[1]

    with pytest.raises(KeyError):
        changes[1]
    with pytest.raises(KeyError):
        del changes[1]
    assert changes.pop(1, None) is None


def test_only_a_working_view_of_the_view_itself_can_be_adopted() -> None:
    live = StateView(entries={}, state_version=3)
    group = live.working()
    group.state_version = 5

    with pytest.raises(ValueError, match="working view"):
        StateView(entries={}).adopt(group)
    with pytest.raises(ValueError, match="working view"):
        live.adopt(live.detached())

    live.adopt(group)
    assert live.state_version == 5
