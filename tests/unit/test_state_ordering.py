"""Ordering of operations (PROTOCOL.md "Ordering memory", "Sync"), on the pure state machine.

A Sync states the whole dynamic set as of its ``issued_at``: after it, an Allow or Revoke
issued before it is STALE on every address, whether the Sync named the address or not, so the
outcome does not depend on which of the two arrived first. On-host grants, which a Sync never
touches, are ordered by their own per-address marks only.
"""

from __future__ import annotations

import pytest

from agent.model import Address, AllowEntry
from agent.state import (
    AllowCmd,
    Command,
    Limits,
    RequestMeta,
    RevokeCmd,
    StateView,
    Status,
    SyncCmd,
    decide,
)

T = 1_790_000_000_000
LIMITS = Limits(max_entries=100, set_size={4: 100, 6: 100})
PROFILES = ("sip",)


def _meta(request_id: str, issued: int, rpc: str = "Allow") -> RequestMeta:
    return RequestMeta(request_id, rpc, issued, issued + 60_000, b"digest")


def _entry(address: str) -> AllowEntry:
    return AllowEntry(Address(address), "sip", 600, "alice")


def _apply(view: StateView, cmd: Command) -> list[tuple[str, Status]]:
    decision = decide(view, cmd, T, LIMITS, PROFILES)
    view.fold(decision)
    return [(r.address, r.status) for r in decision.results]


@pytest.fixture
def synced() -> StateView:
    """A state after a Sync issued at ``T`` that named 198.51.100.1 only."""
    view = StateView()
    sync = SyncCmd(_meta("sync-0001", T, "Sync"), (_entry("198.51.100.1"),))
    assert _apply(view, sync) == [("198.51.100.1", Status.ADDED)]
    return view


@pytest.mark.parametrize("address", ["198.51.100.1", "198.51.100.2"], ids=["named", "unnamed"])
def test_an_allow_issued_before_the_last_sync_is_stale_on_any_address(
    synced: StateView, address: str
) -> None:
    before = dict(synced.entries), synced.state_version
    late = AllowCmd(_meta("allow-0001", T - 1), (_entry(address),))
    assert _apply(synced, late) == [(address, Status.STALE)]
    assert (dict(synced.entries), synced.state_version) == before


def test_a_revoke_issued_before_the_last_sync_is_stale(synced: StateView) -> None:
    late = RevokeCmd(_meta("revoke-0001", T - 1, "Revoke"), (Address("198.51.100.1"),))
    assert _apply(synced, late) == [("198.51.100.1", Status.STALE)]
    assert Address("198.51.100.1") in {k.address for k in synced.entries}


def test_an_operation_issued_after_the_last_sync_applies(synced: StateView) -> None:
    allow = AllowCmd(_meta("allow-0002", T + 1), (_entry("198.51.100.2"),))
    assert _apply(synced, allow) == [("198.51.100.2", Status.ADDED)]
    revoke = RevokeCmd(_meta("revoke-0002", T + 1, "Revoke"), (Address("198.51.100.1"),))
    assert _apply(synced, revoke) == [("198.51.100.1", Status.REMOVED)]


def test_an_on_host_grant_is_not_ordered_by_the_sync(synced: StateView) -> None:
    """The control plane's clock may run ahead of the host's by the allowed skew."""
    local = AllowCmd(_meta("local-0001", T - 5_000), (_entry("198.51.100.2"),))
    assert _apply(synced, local) == [("198.51.100.2", Status.ADDED)]


def test_a_sync_leaves_no_ordering_mark_per_address(synced: StateView) -> None:
    assert synced.last_issued == {}
    assert synced.last_sync_issued_at_ms == T
