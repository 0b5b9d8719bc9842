"""The element diff, state in and state out: what is present, what is asked, what is sent.

Keys are written as short names (``a4``, ``b6`` ...) so each row reads like the sentence it pins.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from agent.model import Address, Element, EntryKey
from agent.rules.plan import (
    ElementPlan,
    SetOverflow,
    plan_changes,
    plan_replace_all,
    set_overflows,
)

KEYS = {
    "a4": EntryKey("agent", Address("198.18.0.1")),
    "b4": EntryKey("agent", Address("198.18.0.2")),
    "c4": EntryKey("agent", Address("198.18.0.3")),
    "a6": EntryKey("agent", Address("2001:db8:1:2::/64")),
    "b6": EntryKey("agent", Address("2001:db8::5")),
    "x4": EntryKey("admin", Address("198.18.0.1")),  # same address as a4, other profile
}


def value_error(call: Callable[..., object], *args: object, **kwargs: object) -> ValueError:
    """Programmer errors are plain ValueErrors without a reason word; STYLE.md forbids matching
    their text, so the exact type is what is pinned."""
    with pytest.raises(ValueError) as info:  # noqa: PT011
        call(*args, **kwargs)
    assert type(info.value) is ValueError
    return info.value


def k(name: str) -> EntryKey:
    return KEYS[name]


def e(name: str, timeout: int = 60) -> Element:
    return Element(k(name), timeout, f"req=r sub={name}")


def names(keys: tuple[EntryKey, ...]) -> list[str]:
    by_key = {v: n for n, v in KEYS.items()}
    return [by_key[key] for key in keys]


def summary(plan: ElementPlan) -> tuple[list[str], list[str], list[str]]:
    """(adds, refreshes, removes) by short name."""
    return (
        names(tuple(x.key for x in plan.adds)),
        names(tuple(x.key for x in plan.refreshes)),
        names(plan.removes),
    )


# (upserts, removals, present) -> (adds, refreshes, removes)
CHANGES = [
    pytest.param([], [], [], ([], [], []), id="nothing-asked-nothing-sent"),
    pytest.param([], [], ["a4", "b6"], ([], [], []), id="present-untouched-when-not-named"),
    pytest.param(["a4"], [], [], (["a4"], [], []), id="upsert-of-absent-is-add"),
    pytest.param(["a4"], [], ["a4"], ([], ["a4"], []), id="upsert-of-present-is-refresh"),
    pytest.param(["a4"], [], ["x4"], (["a4"], [], []), id="profile-is-part-of-the-key"),
    pytest.param([], ["a4"], ["a4"], ([], [], ["a4"]), id="removal-of-present"),
    pytest.param([], ["a4"], [], ([], [], []), id="removal-of-absent-is-dropped"),
    pytest.param([], ["a4", "a4"], ["a4"], ([], [], ["a4"]), id="repeated-removal-once"),
    pytest.param(
        ["a4", "a6", "b4"],
        ["b6", "c4"],
        ["a6", "b6"],
        (["a4", "b4"], ["a6"], ["b6"]),
        id="mixed",
    ),
    pytest.param(
        ["c4", "a4", "b4"],
        [],
        ["b4"],
        (["c4", "a4"], ["b4"], []),
        id="request-order-kept",
    ),
]


@pytest.mark.parametrize(("upserts", "removals", "present", "expected"), CHANGES)
def test_plan_changes(
    upserts: list[str],
    removals: list[str],
    present: list[str],
    expected: tuple[list[str], list[str], list[str]],
) -> None:
    plan = plan_changes([e(n) for n in upserts], [k(n) for n in removals], {k(n) for n in present})
    assert summary(plan) == expected
    assert plan.empty == (expected == ([], [], []))


def test_plan_keeps_the_elements_it_was_given() -> None:
    fresh = e("a4", 3600)
    plan = plan_changes([fresh], [], {k("a4")})
    assert plan.refreshes == (fresh,)


def test_deletes_are_removals_and_old_copies_of_refreshes_creates_are_adds_and_refreshes() -> None:
    plan = plan_changes([e("a4"), e("b4")], [k("b6")], {k("b4"), k("b6")})
    assert plan.deletes == (k("b6"), k("b4"))
    assert plan.creates == (e("a4"), e("b4"))


@pytest.mark.parametrize(
    ("upserts", "removals", "present"),
    [
        pytest.param(["a4", "a4"], [], [], id="same-key-twice-absent"),
        pytest.param(["a4", "a4"], [], ["a4"], id="same-key-twice-present"),
        pytest.param(["a4", "b4", "a4"], [], [], id="same-key-apart"),
        pytest.param(["a4"], ["a4"], ["a4"], id="upsert-and-remove-present-key"),
        pytest.param(["a4"], ["a4"], [], id="upsert-and-remove-absent-key"),
    ],
)
def test_contradictory_plan_is_a_value_error(
    upserts: list[str], removals: list[str], present: list[str]
) -> None:
    ups = [e(n) for n in upserts]
    rems = [k(n) for n in removals]
    value_error(plan_changes, ups, rems, {k(n) for n in present})


def test_duplicate_upsert_with_different_timeouts_is_a_value_error() -> None:
    value_error(plan_changes, [e("a4", 60), e("a4", 120)], [], set())


# desired, observed -> (adds, refreshes, removes)
REPLACE = [
    pytest.param([], [], ([], [], []), id="empty-stays-empty"),
    pytest.param([], ["a4", "b6"], ([], [], ["a4", "b6"]), id="empty-desired-removes-all"),
    pytest.param(["a4", "b6"], [], (["a4", "b6"], [], []), id="all-new-added"),
    pytest.param(["a4"], ["a4"], ([], ["a4"], []), id="present-desired-refreshed"),
    pytest.param(
        ["a4", "a6"],
        ["a4", "b4", "b6"],
        (["a6"], ["a4"], ["b4", "b6"]),
        id="exactly-desired",
    ),
    pytest.param(["a4"], ["x4"], (["a4"], [], ["x4"]), id="other-profile-same-address"),
]


@pytest.mark.parametrize(("desired", "observed", "expected"), REPLACE)
def test_plan_replace_all(
    desired: list[str], observed: list[str], expected: tuple[list[str], list[str], list[str]]
) -> None:
    plan = plan_replace_all([e(n) for n in desired], {k(n): object() for n in observed})
    assert summary(plan) == expected


def test_replace_all_result_holds_exactly_the_desired_keys() -> None:
    desired = [e("a4"), e("a6"), e("c4")]
    observed = {k(n): object() for n in ("a4", "b4", "b6", "x4")}
    plan = plan_replace_all(desired, observed)
    after = (set(observed) - set(plan.deletes)) | {x.key for x in plan.creates}
    assert after == {x.key for x in desired}


def test_replace_all_with_a_duplicate_desired_key_is_a_value_error() -> None:
    value_error(plan_replace_all, [e("a4"), e("a4", 120)], {})


def test_replace_all_takes_the_observed_keys_as_a_plain_set() -> None:
    observed = {k(n): object() for n in ("a4", "b4", "x4")}
    desired = [e("a4"), e("a6")]
    from_set, from_mapping = (plan_replace_all(desired, o) for o in (set(observed), observed))
    # A set has no order of its own, so neither have the removals planned from it.
    by_role = [sorted(group) for group in summary(from_set)]
    assert by_role == [sorted(group) for group in summary(from_mapping)]
    assert by_role == [["a6"], ["a4"], ["b4", "x4"]]


# --- capacity --------------------------------------------------------------------------------

SIZES = {4: 2, 6: 1}

# (upserts, removals, present) -> sets the plan would overfill, as (profile, family, after)
CAPACITY = [
    pytest.param(["a4", "b4"], [], [], [], id="filling-exactly-fits"),
    pytest.param(["a4", "b4", "c4"], [], [], [("agent", 4, 3)], id="one-too-many"),
    pytest.param(["c4"], [], ["a4", "b4"], [("agent", 4, 3)], id="full-set-takes-no-add"),
    pytest.param(["a4", "b4"], [], ["a4", "b4"], [], id="refreshes-of-a-full-set-fit"),
    pytest.param(["c4"], ["a4"], ["a4", "b4"], [], id="a-removal-frees-its-slot-in-the-batch"),
    pytest.param(["c4"], [], ["a4", "b4", "x4"], [("agent", 4, 3)], id="sets-are-per-profile"),
    pytest.param(["x4"], [], ["a4", "b4"], [], id="another-profile-has-its-own-set"),
    pytest.param(["a6", "b6"], [], [], [("agent", 6, 2)], id="sizes-are-per-family"),
    pytest.param(
        ["c4", "b6"], [], ["a4", "b4", "a6"], [("agent", 4, 3), ("agent", 6, 2)], id="both"
    ),
    pytest.param([], [], ["a4", "b4", "c4"], [], id="an-overfull-set-nothing-adds-to-is-not-named"),
]


@pytest.mark.parametrize(("upserts", "removals", "present", "expected"), CAPACITY)
def test_set_overflows(
    upserts: list[str],
    removals: list[str],
    present: list[str],
    expected: list[tuple[str, int, int]],
) -> None:
    belief = {k(n) for n in present}
    plan = plan_changes([e(n) for n in upserts], [k(n) for n in removals], belief)
    assert set_overflows(plan, belief, SIZES) == tuple(
        SetOverflow(profile, family, after, SIZES[family]) for profile, family, after in expected
    )


def test_empty_plan_is_empty() -> None:
    assert ElementPlan().empty
    assert ElementPlan().deletes == ()
    assert ElementPlan().creates == ()
    assert not ElementPlan(removes=(k("a4"),)).empty
