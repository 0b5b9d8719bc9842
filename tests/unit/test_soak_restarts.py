"""The restart soak's judgement (bench/soak_restarts.py): what is lost, what is not judged."""

from __future__ import annotations

from bench.soak_restarts import Ledger, lost

A, B, C = "198.18.64.1", "198.18.64.2", "198.18.64.3"


def test_an_acknowledged_allow_missing_from_state_or_kernel_is_lost() -> None:
    ledger = Ledger()
    ledger.acked(A, allowed=True)
    assert lost(ledger, {A}, {A}) == []
    assert lost(ledger, set(), {A}) == [A]
    assert lost(ledger, {A}, set()) == [A]


def test_an_acknowledged_revoke_still_present_is_lost() -> None:
    ledger = Ledger()
    ledger.acked(B, allowed=False)
    assert lost(ledger, set(), set()) == []
    assert lost(ledger, set(), {B}) == [B]


def test_a_failed_call_leaves_its_address_unjudged_until_the_next_acknowledgement() -> None:
    ledger = Ledger()
    ledger.acked(C, allowed=True)
    ledger.failed(C)  # a revoke the daemon died under: it may or may not have applied
    assert lost(ledger, set(), set()) == []
    assert lost(ledger, {C}, {C}) == []
    ledger.acked(C, allowed=False)
    assert lost(ledger, {C}, {C}) == [C]
    ledger.stale()  # acknowledged, changed nothing: the judged state holds
    assert lost(ledger, {C}, {C}) == [C]
    assert (ledger.acknowledged, ledger.uncertain) == (3, 1)
