"""RULESET.md "Ownership" and "Entries" under failure: a refused batch changes nothing, anywhere.

Every change is one libnftables transaction, so a batch the kernel refuses (an element that is
already there, a full set) must leave the agent's table exactly as it was, and no operation of the
agent may ever change another owner's table - not even a failing one.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Callable
from typing import Any

import pytest
from netlab import ADDR, Lab, wait_until
from tablekit import OTHER_TABLE, TABLE, Rig, assert_unchanged, config, open_rig

from agent.errors import ErrorKind, KernelError, SetFull
from agent.model import Element, EntryKey
from agent.policy import normalize_address
from agent.rules import render
from agent.rules.nft import ElementConflict, NftAdapter
from agent.rules.render import element_comment
from agent.rules.table import FirewallTable


def whole_listing(rig: Rig, *what: str) -> dict[str, Any]:
    """A listing in which no set names a value twice.

    Right after a large batch the kernel may still be resizing a set's hash table, and a dump
    racing that is torn (see test_table_entries); wait for one that is whole before comparing.
    """
    found: list[dict[str, Any]] = []

    def whole() -> bool:
        listing = rig.listing(*what)
        for item in listing["nftables"]:
            elems = item.get("set", {}).get("elem", ())
            values = [str(e["elem"]["val"] if isinstance(e, dict) else e) for e in elems]
            if len(values) != len(set(values)):
                return False
        found.append(listing)
        return True

    wait_until(whole, timeout=5, what=f"a whole listing of {' '.join(what)}")
    return found[-1]


def our_table(rig: Rig) -> dict[str, Any]:
    return whole_listing(rig, "table", "inet", TABLE)


def _elements(rig: Rig, first: str, count: int, request_id: str) -> list[Element]:
    start = ipaddress.ip_address(first)
    return [
        Element(
            EntryKey("agent", normalize_address(str(start + i), rig.cfg.address_policy)),
            3600,
            element_comment(f"bulk-{i}", request_id),
        )
        for i in range(count)
    ]


# --- one bad element -------------------------------------------------------------------------


def test_batch_with_one_existing_element_changes_nothing(rig: Rig) -> None:
    existing = rig.element(ADDR.client4, 600, subject="existing")
    doomed = rig.element(ADDR.client4_alt, 900, subject="to-be-removed")
    rig.table.apply([existing, doomed])
    before = our_table(rig)
    # Deletes first, then the IPv6 set's creates, then the IPv4 set's: the failing element is in
    # the last command, so every command before it was accepted and must be rolled back.
    creates = [
        rig.element(ADDR.client6_far),
        *_elements(rig, "198.18.10.1", 5, "req-good"),
        rig.element(ADDR.client4, 3600, subject="clash"),
    ]
    batch = render.encode_element_batch(TABLE, deletes=[doomed.key], creates=creates)

    with pytest.raises(ElementConflict) as failure:
        rig.table.nft.apply(batch)

    assert failure.value.errno == errno.EEXIST
    assert failure.value.reason == "element_conflict"
    assert_unchanged(before, our_table(rig))
    assert rig.lab.reaches("udp", 5060, src=ADDR.client4_alt)  # the delete did not land
    assert not rig.lab.reaches("udp", 5060, src=ADDR.client6_far)  # nor did the v6 create


def test_large_batch_with_one_conflicting_element_changes_nothing(rig: Rig) -> None:
    present = _elements(rig, "198.18.128.0", 30_000, "req-first")
    rig.table.apply(present, present=set())
    before = our_table(rig)
    fresh = _elements(rig, "198.19.128.0", 30_000, "req-second")
    # The conflicting element comes last, so it is in the batch's last netlink message.
    batch = render.encode_element_batch(TABLE, creates=[*fresh, present[-1]])

    with pytest.raises(ElementConflict) as failure:
        rig.table.nft.apply(batch)

    assert failure.value.errno == errno.EEXIST
    assert_unchanged(before, our_table(rig))


# --- full set --------------------------------------------------------------------------------


@pytest.mark.parametrize("filled", [4, 3], ids=["full", "one-slot-left"])
def test_batch_overflowing_a_full_set_is_refused_whole(lab: Lab, filled: int) -> None:
    rig = open_rig(lab, "set_size_ipv4 = 4")
    rig.table.apply(_elements(rig, "198.18.20.1", filled, "req-fill"))
    before = our_table(rig)

    with pytest.raises(SetFull) as failure:
        rig.table.apply(_elements(rig, "198.18.30.1", 6 - filled, "req-more"))

    assert (failure.value.reason, failure.value.kind) == ("set_full", ErrorKind.RESOURCE_EXHAUSTED)
    assert_unchanged(before, our_table(rig))


# --- batches refused in many netlink messages -------------------------------------------------
# libnftables splits a large element list over ~64 KiB netlink messages. The kernel reports every
# refused message with a copy of it, and once those copies fill the socket's receive buffer the
# rest are lost: the batch then fails with ENOBUFS rather than the errno that refused it. The
# transaction is still aborted whole.


def test_overfilling_a_set_by_thousands_is_set_full_although_the_kernel_says_enobufs(
    rig: Rig,
) -> None:
    assert rig.cfg.firewall.set_size_ipv4 == 65_536
    kept = _elements(rig, "198.18.20.1", 5, "req-kept")
    rig.table.apply(kept)
    before = our_table(rig)
    flood = _elements(rig, "198.18.128.0", 70_000, "req-flood")
    raw = render.encode_element_batch(TABLE, deletes=[kept[0].key], creates=flood).encode()
    with pytest.raises(KernelError) as kernel_said:
        rig.table.nft.apply(raw)
    assert kernel_said.value.errno == errno.ENOBUFS  # the case this test is about

    with pytest.raises(SetFull) as failure:
        rig.table.apply(flood, [kept[0].key])

    assert (failure.value.reason, failure.value.kind) == ("set_full", ErrorKind.RESOURCE_EXHAUSTED)
    assert_unchanged(before, our_table(rig))


def test_thousands_of_stale_creates_end_as_refreshes_although_the_kernel_says_enobufs(
    rig: Rig,
) -> None:
    first = _elements(rig, "198.18.128.0", 20_000, "req-first")
    rig.table.apply(first, present=set())
    again = [Element(e.key, 7200, element_comment("again", "req-again")) for e in first]
    raw = render.encode_element_batch(TABLE, creates=again).encode()
    with pytest.raises(KernelError) as kernel_said:
        rig.table.nft.apply(raw)
    assert kernel_said.value.errno == errno.ENOBUFS  # every message refused with EEXIST

    applied = rig.table.apply(again, present=set())  # the caller believes the set empty

    assert (len(applied.plan.refreshes), applied.plan.adds, applied.attempts) == (20_000, (), 2)
    seen = rig.table.read_elements()
    assert {(e.timeout_s, e.comment) for e in seen.values()} == {(7200, again[0].comment)}
    assert set(seen) == {e.key for e in first}


def test_full_set_still_takes_refreshes_and_swaps(lab: Lab) -> None:
    rig = open_rig(lab, "set_size_ipv4 = 4")
    filled = _elements(rig, "198.18.20.1", 4, "req-fill")
    rig.table.apply(filled)

    refreshed = rig.table.apply([Element(filled[0].key, 7200, "refreshed")])
    swapped = rig.table.apply([rig.element(ADDR.client4)], [filled[1].key])

    assert (refreshed.plan.refreshes[0].key, swapped.plan.adds[0].key) == (
        filled[0].key,
        rig.key(ADDR.client4),
    )
    seen = rig.table.read_elements()
    assert set(seen) == {filled[0].key, filled[2].key, filled[3].key, rig.key(ADDR.client4)}
    assert seen[filled[0].key].timeout_s == 7200


# --- another owner's table -------------------------------------------------------------------


def test_no_operation_touches_another_owners_table(lab: Lab) -> None:
    lab.srv.nft_script(OTHER_TABLE)
    other = lab.srv.nft("-j", "list", "table", "inet", "other")
    rig = open_rig(lab, "set_size_ipv4 = 4")  # install + probe
    element = rig.element(ADDR.client4, 60)

    def overflow(r: Rig) -> None:
        with pytest.raises(SetFull):
            r.table.apply(_elements(r, "198.18.40.1", 5, "req-overflow"))

    steps: list[tuple[str, Callable[[Rig], object]]] = [
        ("install again", lambda r: r.table.install()),
        ("probe again", lambda r: r.table.probe()),
        ("add", lambda r: r.table.apply([element])),
        ("refresh", lambda r: r.table.apply([Element(element.key, 600, "again")])),
        ("remove", lambda r: r.table.apply(removals=[element.key])),
        ("replace_all", lambda r: r.table.replace_all([r.element(ADDR.client6)])),
        ("full-set failure", overflow),
        ("delete our table", lambda r: r.table.delete()),
    ]
    after = {"install + probe": rig.other_table()}
    for name, step in steps:
        step(rig)
        after[name] = rig.other_table()

    assert after == dict.fromkeys(after, other)


def test_delete_removes_only_our_table(rig: Rig) -> None:
    rig.lab.srv.nft_script(OTHER_TABLE)
    rig.table.apply([rig.element(ADDR.client4)])
    other = rig.other_table()
    assert rig.tables() == ["inet other", f"inet {TABLE}"]

    rig.table.delete()

    assert rig.tables() == ["inet other"]
    assert rig.other_table() == other


def test_exists_is_true_once_installed(rig: Rig) -> None:
    assert rig.table.exists() is True


def test_exists_is_true_for_our_table_without_chains(lab: Lab) -> None:
    """An empty table of our name (left by hand) shows only in the table list, not in chains."""
    lab.srv.nft("add", "table", "inet", TABLE)
    lab.srv.nft_script(OTHER_TABLE)  # chains of another table must not count

    assert FirewallTable(config().firewall, lab.srv.call(NftAdapter)).exists() is True


@pytest.mark.parametrize(
    "how", ["never-installed", "only-other-tables", "flush-ruleset-by-hand", "deleted-by-agent"]
)
def test_exists_is_false_without_our_table(lab: Lab, how: str) -> None:
    if how == "never-installed":
        table = FirewallTable(config().firewall, lab.srv.call(NftAdapter))
    elif how == "only-other-tables":
        lab.srv.nft_script(OTHER_TABLE)
        lab.srv.nft_script(
            f"table ip {TABLE} {{\n chain input {{\n type filter hook input priority 0\n }}\n}}\n"
        )
        table = FirewallTable(config().firewall, lab.srv.call(NftAdapter))
    else:
        table = open_rig(lab).table
        if how == "deleted-by-agent":
            table.delete()
        else:
            lab.srv.nft("flush", "ruleset")

    assert table.exists() is False


def test_delete_of_an_absent_table_is_fine(rig: Rig) -> None:
    rig.lab.srv.nft("flush", "ruleset")  # what Debian's nftables.service does on reload

    rig.table.delete()

    assert rig.tables() == []
